//! The host-gw backend: no device, no encapsulation; a peer's subnet is
//! routed via the peer's public IP on the uplink, so every node must be on
//! one L2 network.

use std::net::IpAddr;

use serde_json::Value;

use flannel_shared::IpNet;
use flannel_shared::netconf::{Backend as BackendConfig, NetConfigError};

use super::{Backend, BackendError, FamilyNet, Uplink};
use crate::kernel::Kernel;
use crate::reconcile::Mode;
use crate::subnet::SubnetManager;

pub struct HostGw;

impl Backend for HostGw {
    const TYPE: &'static str = "host-gw";
    /// host-gw has no keys of its own.
    type Config = ();

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

    fn mode(&self, _fam: &FamilyNet, uplink: &Uplink) -> Option<Mode> {
        Some(Mode::HostGw { uplink: uplink.index })
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
