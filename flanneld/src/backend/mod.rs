//! Backends: how this node reaches the others. Each one is a module behind
//! [`Backend`]: what it sets up on the node for an address family (a device,
//! the MTU it leaves pods, the backend data peers find in our lease), what
//! the kernel must hold to reach the peers (the [`Desired`] routes, ARP and FDB
//! entries the reconciler applies), which peers it cannot program, and what it
//! leaves behind that another backend must remove.
//!
//! Adding a backend: a folder here with a type implementing [`Backend`]
//! (its `TYPE`, its own config decoded from net-conf.json's `Backend` object,
//! what it sets up, how peers are reached, what it leaves behind), and its
//! line in [`registry!`] at the end of this file.

pub mod hostgw;
mod uplink;
pub mod vxlan;
pub mod wireguard;

use std::net::IpAddr;

use serde_json::Value;

use flannel_shared::IpNet;
use flannel_shared::lease::Lease;
use flannel_shared::netconf::{Backend as BackendConfig, Family, NetConfigError};
use flannel_shared::netlink::NetlinkError;

use crate::kernel::Kernel;
use crate::reconcile::{Desired, Peer};
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
pub trait Backend: Sized {
    /// net-conf.json's `Backend.Type`, and the lease's `BackendType`.
    const TYPE: &'static str;
    /// What it reads from net-conf.json's `Backend` object.
    type Config;
    /// What it needs of a peer's lease in one family, decoded once when the
    /// lease arrives ([`Backend::peer_data`]; vxlan: the VtepMAC).
    type PeerData: Clone + PartialEq + std::fmt::Debug;

    /// Decodes a peer's backend data for one family (`v6`: `BackendV6Data`);
    /// `None` when it has none this backend can use.
    fn peer_data(lease: &Lease, v6: bool) -> Option<Self::PeerData>;

    /// Decodes its config; `warn` gets the keys that do not apply to it.
    fn config(section: &BackendConfig, warn: &mut dyn FnMut(String)) -> Result<Self::Config, NetConfigError>;

    fn new(cfg: Self::Config) -> Self;

    fn kind(&self) -> &'static str {
        Self::TYPE
    }

    /// Removes what an earlier run of this backend left on the node, when
    /// `section` (the config now in force) names another backend.
    async fn teardown<K: Kernel>(_k: &K, _section: &BackendConfig) -> Result<(), BackendError> {
        Ok(())
    }

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

    /// What the kernel must hold to reach `peers` in `fam` (the full pass
    /// applies it for all peers, the incremental path diffs it for one);
    /// `None` while the family is not set up.
    fn desired(&self, fam: &FamilyNet, uplink: &Uplink, peers: &[Peer<Self::PeerData>]) -> Option<Desired>;

    /// Why a peer at `public_ip` cannot be programmed, if it cannot.
    fn refuse(&self, _fam: &FamilyNet, _uplink: &Uplink, _public_ip: IpAddr) -> Option<String> {
        None
    }

    /// Whether [`Backend::sync_peers`] does anything (the agent then hands it
    /// every peer after a change, not only the changed ones' entries).
    const SYNCS_PEERS: bool = false;

    /// Brings what the backend owns beyond routes, ARP and FDB entries in line
    /// with `peers` (wireguard: its device's peers), after every full pass and
    /// every peer change. `prune` as in [`crate::reconcile::apply_family`]: only
    /// once the lease listing is whole may what `peers` lacks be removed.
    async fn sync_peers<K: Kernel>(
        &mut self,
        _k: &K,
        _fam: &FamilyNet,
        _peers: &[Peer<Self::PeerData>],
        _prune: bool,
    ) -> Result<(), BackendError> {
        Ok(())
    }

    /// On SIGTERM/SIGINT: what the backend undoes before flanneld exits
    /// (vxlan and host-gw leave everything in place; wireguard removes its devices, as upstream).
    async fn stop<K: Kernel>(&mut self, _k: &K) {}

    /// The devices it owns (names and link indices), for the kernel watch.
    fn devices(&self) -> (Vec<String>, Vec<u32>) {
        (Vec::new(), Vec::new())
    }
}

/// What is done with the backend net-conf.json names, once it is known (the
/// agent runs with it); generic over the backend's type.
#[allow(async_fn_in_trait)]
pub trait WithBackend {
    type Out;
    async fn run<B: Backend>(self, b: B) -> Self::Out;
}

/// The backends, by their `Type`: one line each. It makes [`TYPES`],
/// [`check`], [`with_backend`] and [`teardown_others`].
macro_rules! registry {
    ($($ty:ty),+ $(,)?) => {
        /// The `Backend.Type`s this agent runs.
        pub const TYPES: &[&str] = &[$(<$ty as Backend>::TYPE),+];

        /// Checks net-conf.json's `Backend` object against its Type's backend.
        pub fn check(section: &BackendConfig, warn: &mut dyn FnMut(String)) -> Result<(), NetConfigError> {
            $(if section.kind == <$ty as Backend>::TYPE {
                return <$ty as Backend>::config(section, warn).map(|_| ());
            })+
            Err(unsupported(section))
        }

        /// Builds the backend `section` names and hands it to `w`.
        pub async fn with_backend<W: WithBackend>(section: &BackendConfig, w: W) -> Result<W::Out, NetConfigError> {
            $(if section.kind == <$ty as Backend>::TYPE {
                let cfg = <$ty as Backend>::config(section, &mut |_| {})?;
                return Ok(w.run(<$ty as Backend>::new(cfg)).await);
            })+
            Err(unsupported(section))
        }

        /// Removes what the other backends leave on a node, after a switch to `section.kind`.
        pub async fn teardown_others<K: Kernel>(k: &K, section: &BackendConfig) -> Result<(), BackendError> {
            $(if section.kind != <$ty as Backend>::TYPE {
                <$ty as Backend>::teardown(k, section).await?;
            })+
            Ok(())
        }
    };
}

fn unsupported(section: &BackendConfig) -> NetConfigError {
    let known: Vec<String> = TYPES.iter().map(|t| format!("{t:?}")).collect();
    let (last, rest) = known.split_last().expect("a backend");
    let known = if rest.is_empty() { last.clone() } else { format!("{} or {last}", rest.join(", ")) };
    NetConfigError::new("Backend.Type", format!("{:?} is not supported (use {known})", section.kind))
}

registry!(vxlan::Vxlan, hostgw::HostGw, wireguard::WireGuard);

#[cfg(test)]
mod tests {
    use super::*;
    use flannel_shared::netconf::NetConfig;

    fn check_doc(doc: &str) -> Result<(), NetConfigError> {
        check(&NetConfig::parse(doc, |_| {}).unwrap().backend, &mut |_| {})
    }

    #[test]
    fn the_registry_checks_each_type_with_its_own_config() {
        assert_eq!(TYPES, ["vxlan", "host-gw", "wireguard"]);
        check_doc(r#"{"Network":"10.0.0.0/16"}"#).unwrap();
        check_doc(r#"{"Network":"10.0.0.0/16","Backend":{"Type":"host-gw"}}"#).unwrap();
        let e = check_doc(r#"{"Network":"10.0.0.0/16","Backend":{"Type":"udp"}}"#).unwrap_err();
        assert_eq!(
            e.to_string(),
            r#"network config: Backend.Type: "udp" is not supported (use "vxlan", "host-gw" or "wireguard")"#
        );
        let e = check_doc(r#"{"Network":"10.0.0.0/16","Backend":{"Type":"vxlan","VNI":-1}}"#).unwrap_err();
        assert_eq!(e.field, "Backend.VNI");
        // host-gw has no keys of its own: vxlan's are ignored there, with a warning.
        let mut warned = Vec::new();
        let b =
            NetConfig::parse(r#"{"Network":"10.0.0.0/16","Backend":{"Type":"host-gw","VNI":"x"}}"#, |_| {}).unwrap();
        check(&b.backend, &mut |w| warned.push(w)).unwrap();
        assert_eq!(warned, ["network config: Backend.vni does not apply to host-gw and is ignored"]);
    }
}
