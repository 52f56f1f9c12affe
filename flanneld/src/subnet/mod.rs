//! Subnet managers: where leases live (etcd here; the Kubernetes API behind
//! the same trait). The agent claims and renews its own lease through
//! [`SubnetManager`] and learns its peers from a stream of [`LeaseEvent`]s.

pub mod etcd;
pub mod kube;

use std::net::IpAddr;
use std::sync::Arc;

use std::time::SystemTime;

use flannel_shared::IpNet;
use flannel_shared::lease::{Lease, LeaseAttrs};
use flannel_shared::netconf::Family;
use tokio::sync::mpsc;

use crate::metrics::Metrics;

/// A change in the set of leases. `Snapshot` replaces everything known (the
/// first listing and every re-list after a broken watch).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseEvent {
    Snapshot(Vec<Lease>),
    Added(Lease),
    Removed(IpNet),
}

/// The lease this node holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnLease {
    /// The IPv4 subnet; `0.0.0.0/0` on an IPv6-only network (upstream's key form).
    pub subnet: IpNet,
    /// This node's IPv6 subnet when the network is dual-stack.
    pub subnet6: Option<IpNet>,
    pub attrs: LeaseAttrs,
    pub expiration: SystemTime,
    /// Manager-specific handle (the etcd lease ID).
    pub id: i64,
}

impl OwnLease {
    /// What the lease is known by: see [`flannel_shared::lease::lease_key`].
    pub fn key(&self) -> IpNet {
        flannel_shared::lease::lease_key(self.subnet, self.subnet6)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SubnetError {
    #[error("no network config at {0}: write net-conf.json there first")]
    NoConfig(String),
    #[error("no free subnet left in {network} between {min} and {max} ({taken} leased)")]
    Exhausted { network: IpNet, min: IpAddr, max: IpAddr, taken: usize },
    #[error("our lease on {0} is gone")]
    LeaseLost(IpNet),
    #[error("lease store: {0}")]
    Store(String),
    #[error("malformed lease {key}: {msg}")]
    BadLease { key: String, msg: String },
    /// A setup the agent must not run with (e.g. a podCIDR outside Network).
    #[error("{0}")]
    Refused(String),
}

impl SubnetError {
    /// Errors that a retry may cure (the store being away, a lost race).
    pub fn is_transient(&self) -> bool {
        matches!(self, SubnetError::Store(_) | SubnetError::Exhausted { .. })
    }
}

/// What the agent asks a manager for.
#[derive(Clone, Copy, Debug)]
pub struct Claim<'a> {
    /// The IPv4 family; `None` on an IPv6-only network.
    pub family: Option<&'a Family>,
    /// Set when the network is dual-stack.
    pub family6: Option<&'a Family>,
    pub attrs: &'a LeaseAttrs,
    pub prefer: Option<IpNet>,
    pub prefer6: Option<IpNet>,
}

/// The agent runs on a single-threaded runtime, so these futures need not be `Send`.
#[allow(async_fn_in_trait)]
pub trait SubnetManager {
    /// The raw net-conf.json text.
    async fn network_config(&mut self) -> Result<String, SubnetError>;
    /// Claims a subnet (and an IPv6 one when the network is dual-stack) for
    /// `claim.attrs`: the preferred ones (our previous lease) when free or
    /// already ours, else free ones in the families' ranges.
    async fn acquire(&mut self, claim: &Claim<'_>) -> Result<OwnLease, SubnetError>;
    /// Extends the lease; `LeaseLost` when it no longer exists.
    async fn renew(&mut self, lease: &OwnLease) -> Result<OwnLease, SubnetError>;
    /// What this node (known by its public address) advertised before, so a
    /// backend that rebuilds its device can keep what peers know of it (vxlan:
    /// its VtepMAC). Each backend reads its own part.
    async fn previous_lease(&mut self, public_ip: IpAddr) -> Option<LeaseAttrs>;
    /// Public addresses stored for this node outside the flags (Kubernetes: our
    /// Node's `node-public-ip` / `node-public-ipv6` annotations); they pick the
    /// uplink and are advertised, as upstream's `GetStoredPublicIP`.
    async fn stored_public_ips(&mut self) -> crate::backend::PublicIps {
        crate::backend::PublicIps::default()
    }
    /// Starts the peer watch: the first listing as a `Snapshot`, then `Added` and
    /// `Removed` as leases change; a broken watch is listed again (another
    /// `Snapshot`) after a backoff. Runs until `tx` is closed.
    fn spawn_watch(&self, tx: mpsc::Sender<LeaseEvent>, metrics: Arc<Metrics>) -> tokio::task::JoinHandle<()>;
    /// Called once the data path is programmed (Kubernetes: clear `NetworkUnavailable`).
    async fn network_up(&mut self) -> Result<(), SubnetError> {
        Ok(())
    }
}
