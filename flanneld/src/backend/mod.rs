//! Backends: how this node reaches the others. Each one is a module behind
//! [`Backend`]: what it sets up on the node for an address family (a device,
//! the MTU it leaves pods, the backend data peers find in our lease), how
//! peers are reached (the [`Mode`] the reconciler turns into routes, ARP and
//! FDB entries), which peers it cannot program, and what it leaves behind
//! that another backend must remove.
//!
//! Adding a backend: a module here implementing [`Backend`], one arm in
//! `agent::run` and one line in [`teardown_others`].

pub mod hostgw;
mod uplink;
pub mod vxlan;

use std::net::IpAddr;

use serde_json::Value;

use flannel_shared::IpNet;
use flannel_shared::netconf::{Backend as BackendConfig, BackendType, Family};
use flannel_shared::netlink::NetlinkError;

use crate::kernel::Kernel;
use crate::reconcile::Mode;
use crate::subnet::{OwnLease, SubnetManager};

pub use uplink::{PublicIps, Uplink, find_uplink};

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("{0}")]
    Netlink(#[from] NetlinkError),
    #[error("uplink: {0}")]
    Uplink(String),
    /// The network config asks for something this node cannot do.
    #[error("{0}")]
    Config(String),
}

/// One address family of the pod network as a backend sees it on this node.
#[derive(Clone, Debug)]
pub struct FamilyNet {
    pub v6: bool,
    pub config: Family,
    /// This node's address of the family on the uplink (a tunnel's source), if it has one.
    pub local: Option<IpAddr>,
    /// What peers are told to send to.
    pub public_ip: IpAddr,
    /// The uplink's networks of the family: peers inside are on-link.
    pub nets: Vec<IpNet>,
}

impl FamilyNet {
    /// IPv4 from the uplink; `None` without an IPv4 address.
    pub fn v4(config: Family, uplink: &Uplink) -> Option<FamilyNet> {
        Some(FamilyNet {
            v6: false,
            config,
            local: uplink.ip.map(IpAddr::V4),
            public_ip: IpAddr::V4(uplink.public_ip?),
            nets: uplink.nets.clone(),
        })
    }

    /// IPv6 from the uplink; `None` without a public IPv6 address.
    pub fn v6(config: Family, uplink: &Uplink) -> Option<FamilyNet> {
        Some(FamilyNet {
            v6: true,
            config,
            local: uplink.ip6.map(IpAddr::V6),
            public_ip: IpAddr::V6(uplink.public_ipv6?),
            nets: uplink.nets6.clone(),
        })
    }

    /// Our lease's subnet in this family.
    pub fn subnet_of(&self, own: &OwnLease) -> Option<IpNet> {
        if self.v6 { own.subnet6 } else { Some(own.subnet).filter(|s| s.prefix() != 0) }
    }

    /// For log lines: empty for IPv4.
    pub fn label(&self) -> &'static str {
        if self.v6 { " (IPv6)" } else { "" }
    }
}

/// A backend. The agent runs on a single-threaded runtime, so these futures need not be `Send`.
#[allow(async_fn_in_trait)]
pub trait Backend {
    fn kind(&self) -> BackendType;

    /// Sets the node up for `fam` before the first lease; returns the backend
    /// data to advertise for that family. `mgr` is asked for what we advertised
    /// before when a device has to be rebuilt.
    async fn setup<K: Kernel, M: SubnetManager>(
        &mut self,
        k: &K,
        mgr: &mut M,
        fam: &FamilyNet,
        uplink: &Uplink,
    ) -> Result<Value, BackendError>;

    /// Before every pass: puts back what [`Backend::setup`] made, as advertised in
    /// `advertised` and addressed for `subnet` (our lease in `fam`, once known).
    /// Returns whether anything had to be rebuilt.
    async fn ensure<K: Kernel>(
        &mut self,
        k: &K,
        fam: &FamilyNet,
        uplink: &Uplink,
        subnet: Option<IpNet>,
        advertised: Option<&Value>,
    ) -> Result<bool, BackendError>;

    /// The largest pod MTU this backend carries in `fam`.
    fn mtu(&self, fam: &FamilyNet, uplink: &Uplink) -> u32;

    /// How peers are reached in `fam`; `None` while the family is not set up.
    fn mode(&self, fam: &FamilyNet, uplink: &Uplink) -> Option<Mode>;

    /// Why a peer at `public_ip` cannot be programmed, if it cannot.
    fn refuse(&self, _fam: &FamilyNet, _uplink: &Uplink, _public_ip: IpAddr) -> Option<String> {
        None
    }

    /// The devices it owns (names and link indices), for the kernel watch.
    fn devices(&self) -> (Vec<String>, Vec<u32>) {
        (Vec::new(), Vec::new())
    }
}

/// Removes what the other backends leave on a node, after a switch to `cfg.kind`.
pub async fn teardown_others<K: Kernel>(k: &K, cfg: &BackendConfig) -> Result<(), BackendError> {
    if cfg.kind != BackendType::Vxlan {
        vxlan::teardown(k, cfg).await?;
    }
    // host-gw leaves routes only; the reconciler replaces or removes them as ours.
    Ok(())
}
