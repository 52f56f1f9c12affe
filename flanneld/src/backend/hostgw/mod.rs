//! The host-gw backend: no device, no encapsulation; a peer's subnet is
//! routed via the peer's public IP on the uplink, so every node must be on
//! one L2 network.

use std::net::IpAddr;

use serde_json::Value;

use flannel_shared::IpNet;
use flannel_shared::lease::Lease;
use flannel_shared::netconf::{Backend as BackendConfig, NetConfigError};

use super::{Backend, BackendError, FamilyNet, Uplink};
use crate::kernel::Kernel;
use crate::reconcile::{Desired, Peer, RTPROT_FLANNEL};
use crate::subnet::SubnetManager;
use flannel_shared::netlink::Route;

pub struct HostGw;

impl Backend for HostGw {
    const TYPE: &'static str = "host-gw";
    /// host-gw has no keys of its own.
    type Config = ();
    /// It needs nothing of a peer but its address.
    type PeerData = ();

    fn peer_data(_lease: &Lease, _v6: bool) -> Option<()> {
        Some(())
    }

    fn config(section: &BackendConfig, warn: &mut dyn FnMut(String)) -> Result<(), NetConfigError> {
        section.warn_unknown(&[], warn);
        Ok(())
    }

    fn new(_: ()) -> HostGw {
        HostGw
    }

    async fn setup<K: Kernel, M: SubnetManager>(
        &mut self,
        _k: &K,
        _mgr: &mut M,
        _fam: &FamilyNet,
        _uplink: &Uplink,
    ) -> Result<Value, BackendError> {
        Ok(Value::Null)
    }

    async fn ensure<K: Kernel>(
        &mut self,
        _k: &K,
        _fam: &FamilyNet,
        _uplink: &Uplink,
        _subnet: Option<IpNet>,
        _advertised: Option<&Value>,
    ) -> Result<bool, BackendError> {
        Ok(false)
    }

    fn mtu(&self, _fam: &FamilyNet, uplink: &Uplink) -> u32 {
        uplink.mtu
    }

    fn desired(&self, _fam: &FamilyNet, uplink: &Uplink, peers: &[Peer]) -> Option<Desired> {
        Some(desired(uplink.index, peers))
    }

    fn refuse(&self, fam: &FamilyNet, uplink: &Uplink, public_ip: IpAddr) -> Option<String> {
        let nets = &fam.nets;
        (!nets.iter().any(|n| n.contains(public_ip))).then(|| {
            format!(
                "{public_ip} is not on-link via {} ({nets:?}): host-gw needs every node on one L2 network",
                uplink.name
            )
        })
    }
}

/// A plain route to each peer's subnet via its public IP on the uplink.
pub fn desired<D>(uplink: u32, peers: &[Peer<D>]) -> Desired {
    let mut d = Desired::on(None);
    d.routes.extend(peers.iter().map(|p| route(uplink, p)));
    d
}

/// The host-gw route to one peer (also vxlan's DirectRouting for peers on the uplink's network).
pub fn route<D>(uplink: u32, p: &Peer<D>) -> Route {
    Route::new(p.subnet.network()).via(p.public_ip).dev(uplink).protocol(RTPROT_FLANNEL)
}
