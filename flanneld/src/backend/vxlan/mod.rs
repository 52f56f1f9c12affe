//! The vxlan backend: one `flannel.<VNI>` device per family (`flannel-v6.<VNI>`
//! for IPv6), learning off, addressed `<subnet>.0/32`; peers are reached
//! through it with an onlink route, a permanent ARP/NDP entry and an FDB
//! entry each (see [`crate::reconcile`]). With `DirectRouting`, peers on the
//! uplink's own network get a plain route instead.

mod config;

use std::net::IpAddr;

use serde_json::Value;
use tracing::{info, warn};

use flannel_shared::IpNet;
use flannel_shared::Mac;
use flannel_shared::lease::Lease;
use flannel_shared::netconf::{Backend as BackendConfig, NetConfigError};
use flannel_shared::netlink::{Address, Link, Route, VxlanSpec};
use serde::{Deserialize, Serialize};

pub use config::Config;

use super::uplink::usable_v6;
use super::{Backend, BackendError, FamilyNet, Uplink};
use crate::kernel::Kernel;
use crate::reconcile::{Desired, Peer, RTPROT_FLANNEL};
use crate::subnet::SubnetManager;

/// The backend data a vxlan lease carries, as upstream's (`BackendData`, and
/// `BackendV6Data` for the IPv6 VTEP).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VxlanData {
    #[serde(rename = "VNI")]
    pub vni: u32,
    #[serde(rename = "VtepMAC")]
    pub vtep_mac: Mac,
}

/// VXLAN header + UDP + outer IPv4 + inner Ethernet.
pub const VXLAN_OVERHEAD: u32 = 50;
/// The same with an outer IPv6 header.
pub const VXLAN6_OVERHEAD: u32 = 70;

/// The MTU of the network the tunnel runs over: `Backend.MTU` when given
/// (upstream's meaning: the underlay's MTU, so a copied `"MTU":1400` makes a
/// 1350 device), else the uplink's.
pub fn underlay_mtu(cfg: &Config, uplink: &Uplink) -> u32 {
    cfg.mtu.unwrap_or(uplink.mtu)
}

/// The device's name for a family.
pub fn device_name(vni: u32, v6: bool) -> String {
    if v6 { format!("flannel-v6.{vni}") } else { format!("flannel.{vni}") }
}

/// A VTEP as set up: what it should be and its current link index.
#[derive(Clone, Debug)]
struct Vtep {
    spec: VtepSpec,
    index: u32,
}

pub struct Vxlan {
    cfg: Config,
    /// By family: `[IPv4, IPv6]`.
    vteps: [Option<Vtep>; 2],
}

impl Vxlan {
    fn spec(&self, fam: &FamilyNet, uplink: &Uplink) -> Result<VtepSpec, BackendError> {
        let local = fam.local.ok_or_else(|| {
            BackendError::Config(format!(
                "network config: EnableIPv6: the IPv6 VXLAN device needs an IPv6 address on {}",
                uplink.name
            ))
        })?;
        let overhead = if fam.v6 { VXLAN6_OVERHEAD } else { VXLAN_OVERHEAD };
        Ok(VtepSpec {
            name: device_name(self.cfg.vni, fam.v6),
            local,
            vni: self.cfg.vni,
            port: self.cfg.port,
            gbp: self.cfg.gbp,
            learning: self.cfg.learning,
            mtu: underlay_mtu(&self.cfg, uplink).saturating_sub(overhead),
        })
    }
}

impl Backend for Vxlan {
    const TYPE: &'static str = "vxlan";
    type Config = Config;
    /// The peer's VtepMAC.
    type PeerData = Mac;

    fn peer_data(lease: &Lease, v6: bool) -> Option<Mac> {
        lease.backend_data::<VxlanData>(v6).map(|d| d.vtep_mac)
    }

    fn config(section: &BackendConfig, warn: &mut dyn FnMut(String)) -> Result<Config, NetConfigError> {
        Config::parse(section, warn)
    }

    fn new(cfg: Config) -> Vxlan {
        Vxlan { cfg, vteps: [None, None] }
    }

    async fn teardown<K: Kernel>(k: &K, section: &BackendConfig) -> Result<(), BackendError> {
        teardown(k, section).await
    }

    async fn setup<K: Kernel, M: SubnetManager>(
        &mut self,
        k: &K,
        mgr: &mut M,
        fam: &FamilyNet,
        uplink: &Uplink,
    ) -> Result<Value, BackendError> {
        let spec = self.spec(fam, uplink)?;
        // A device that is gone (node rebuilt) comes back with the MAC peers already know.
        let mac = if k.link_by_name(&spec.name).await?.is_none() {
            let before = mgr.previous_lease(fam.public_ip).await;
            let data = before.and_then(|a| if fam.v6 { a.backend_v6_data } else { Some(a.backend_data) });
            data.and_then(|d| serde_json::from_value::<VxlanData>(d).ok()).map(|d| d.vtep_mac)
        } else {
            None
        };
        if let Some(m) = mac {
            info!("recreating {} with its previous VtepMAC {m}", spec.name);
        }
        let (link, _) = ensure_vtep(k, &spec, uplink, mac, None).await?;
        let mac = link.mac.ok_or_else(|| BackendError::Config(format!("{} has no MAC address", spec.name)))?;
        let data = serde_json::to_value(VxlanData { vni: spec.vni, vtep_mac: mac })
            .map_err(|e| BackendError::Config(e.to_string()))?;
        self.vteps[fam.v6 as usize] = Some(Vtep { spec, index: link.index });
        Ok(data)
    }

    async fn ensure<K: Kernel>(
        &mut self,
        k: &K,
        fam: &FamilyNet,
        uplink: &Uplink,
        subnet: Option<IpNet>,
        advertised: Option<&Value>,
    ) -> Result<bool, BackendError> {
        let Some(vtep) = &mut self.vteps[fam.v6 as usize] else { return Ok(false) };
        let addr = subnet.and_then(|s| IpNet::new(s.network_addr(), if fam.v6 { 128 } else { 32 }).ok());
        let mac = advertised.and_then(|d| d.get("VtepMAC")).and_then(|v| v.as_str()).and_then(Mac::parse);
        let (link, created) = ensure_vtep(k, &vtep.spec, uplink, mac, addr).await?;
        if created {
            warn!("{} was missing or wrong and has been rebuilt; replaying every peer into it", vtep.spec.name);
        }
        vtep.index = link.index;
        Ok(created)
    }

    fn mtu(&self, fam: &FamilyNet, uplink: &Uplink) -> u32 {
        self.vteps[fam.v6 as usize].as_ref().map_or(uplink.mtu, |v| v.spec.mtu)
    }

    fn desired(&self, fam: &FamilyNet, uplink: &Uplink, peers: &[Peer<Mac>]) -> Option<Desired> {
        let vtep = self.vteps[fam.v6 as usize].as_ref()?.index;
        let direct_on = if self.cfg.direct_routing { fam.nets.first().copied() } else { None };
        Some(desired(vtep, uplink.index, direct_on, peers))
    }

    fn devices(&self) -> (Vec<String>, Vec<u32>) {
        let vteps = self.vteps.iter().flatten();
        (vteps.clone().map(|v| v.spec.name.clone()).collect(), vteps.map(|v| v.index).collect())
    }
}

/// Each peer through the VTEP `vtep`, as upstream lays it out: an onlink route
/// `<subnet> via <subnet>.0 dev <vtep>`, a permanent ARP/NDP entry for that
/// gateway with the peer's VtepMAC, an FDB entry sending that MAC to the peer's
/// public IP. With `direct_on` (DirectRouting), peers whose public IP lies in
/// that (uplink) network get a plain route on the uplink instead.
pub fn desired(vtep: u32, uplink: u32, direct_on: Option<IpNet>, peers: &[Peer<Mac>]) -> Desired {
    let mut d = Desired::on(Some(vtep));
    for p in peers {
        let subnet = p.subnet.network();
        if direct_on.is_some_and(|n| n.contains(p.public_ip)) {
            d.routes.push(super::hostgw::route(uplink, p));
            continue;
        }
        let Some(mac) = p.data else {
            d.skipped.push((subnet, "lease has no VtepMAC".to_string()));
            continue;
        };
        let gw = subnet.network_addr();
        d.routes.push(Route::new(subnet).via(gw).dev(vtep).onlink().protocol(RTPROT_FLANNEL));
        d.neighbours.insert(gw, mac);
        d.fdb.insert(mac, p.public_ip);
    }
    d
}

/// Removes the VTEPs of an earlier vxlan run (and with them every route, ARP and FDB entry on them).
pub async fn teardown<K: Kernel>(k: &K, section: &BackendConfig) -> Result<(), BackendError> {
    let vni = Config::lenient(section).vni;
    for name in [device_name(vni, false), device_name(vni, true)] {
        if let Some(l) = k.link_by_name(&name).await?
            && l.vxlan.is_some()
        {
            k.del_link(l.index).await?;
            info!("backend is {}: removed the VXLAN device {name} left from an earlier vxlan run", section.kind);
        }
    }
    Ok(())
}

/// The VXLAN device as the backend wants it.
#[derive(Clone, Debug)]
pub struct VtepSpec {
    pub name: String,
    /// The tunnel's source address: the uplink's IPv4 address, or its IPv6 one for the IPv6 VTEP.
    pub local: IpAddr,
    pub vni: u32,
    pub port: u16,
    pub gbp: bool,
    pub learning: bool,
    pub mtu: u32,
}

impl VtepSpec {
    /// Whether an existing device can be reused as is (keeping its MAC, so
    /// peers' FDB entries stay valid across restarts).
    fn matches(&self, link: &Link, uplink: &Uplink) -> Result<(), String> {
        let Some(v) = &link.vxlan else { return Err(format!("is a {:?} device, not vxlan", link.kind)) };
        let mut diffs = Vec::new();
        if v.vni != self.vni {
            diffs.push(format!("VNI {} (want {})", v.vni, self.vni));
        }
        if v.port != self.port {
            diffs.push(format!("port {} (want {})", v.port, self.port));
        }
        if v.local != Some(self.local) {
            diffs.push(format!("local {:?} (want {})", v.local, self.local));
        }
        if v.uplink.is_some_and(|i| i != uplink.index) {
            diffs.push(format!("dev #{:?} (want {})", v.uplink, uplink.name));
        }
        if v.learning != self.learning {
            diffs.push(format!("learning {}", if v.learning { "on" } else { "off" }));
        }
        if v.gbp != self.gbp {
            diffs.push(format!("gbp {}", v.gbp));
        }
        if diffs.is_empty() { Ok(()) } else { Err(diffs.join(", ")) }
    }
}

/// Makes sure the VTEP exists with `spec`, is up and has exactly `addr`
/// (`<subnet>.0/32`, when known). A device with other settings is replaced;
/// a recreated one gets `mac` (our advertised VtepMAC) when given.
/// Returns the device and whether it had to be (re)created.
pub async fn ensure_vtep<K: Kernel>(
    nl: &K,
    spec: &VtepSpec,
    uplink: &Uplink,
    mac: Option<Mac>,
    addr: Option<IpNet>,
) -> Result<(Link, bool), BackendError> {
    let mut created = false;
    let link = match nl.link_by_name(&spec.name).await? {
        Some(l) => match spec.matches(&l, uplink) {
            Ok(()) => Some(l),
            Err(why) => {
                warn!("{} exists but {why}; recreating it", spec.name);
                nl.del_link(l.index).await?;
                None
            }
        },
        None => None,
    };
    let link = match link {
        Some(l) => l,
        None => {
            nl.create_vxlan(&VxlanSpec {
                name: &spec.name,
                vni: spec.vni,
                port: spec.port,
                local: Some(spec.local),
                uplink: Some(uplink.index),
                mtu: Some(spec.mtu),
                gbp: spec.gbp,
                learning: spec.learning,
                mac,
            })
            .await?;
            created = true;
            info!(
                "created {} (VNI {}, port {}, local {}, dev {})",
                spec.name, spec.vni, spec.port, spec.local, uplink.name
            );
            nl.link_by_name(&spec.name)
                .await?
                .ok_or_else(|| BackendError::Uplink(format!("{} vanished right after creation", spec.name)))?
        }
    };
    if link.mtu != spec.mtu {
        nl.set_mtu(link.index, spec.mtu).await?;
    }
    if let Some(want) = addr {
        let have = nl.addresses(Some(link.index)).await?;
        // Only global addresses of the same family are ours to replace (the kernel adds an fe80:: one).
        let stale = |a: &&Address| {
            a.net.is_ipv4() == want.is_ipv4() && a.net != want && usable_v6(a).is_some() != want.is_ipv4()
        };
        for a in have.iter().filter(stale) {
            nl.del_address(link.index, a.net).await?;
        }
        if !have.iter().any(|a| a.net == want) {
            nl.add_address(link.index, want).await?;
        }
    }
    // As upstream: a VTEP takes no router advertisements. A read-only /proc/sys
    // (a container) is not worth failing the pass for: said once at debug level.
    match nl.disable_accept_ra(&spec.name) {
        Ok(true) => info!("{}: net.ipv6.conf.{}.accept_ra set to 0", spec.name, spec.name),
        Ok(false) => {}
        Err(e) => tracing::debug!("{}: accept_ra: {e}", spec.name),
    }
    if !link.up {
        nl.set_up(link.index).await?;
    }
    Ok((link, created))
}

#[cfg(test)]
mod tests {
    use super::*;
    use flannel_shared::Mac;

    fn peer(subnet: &str, ip: &str, mac: Option<Mac>) -> Peer<Mac> {
        Peer { subnet: subnet.parse().unwrap(), public_ip: ip.parse().unwrap(), data: mac }
    }

    #[test]
    fn desired_state_matches_upstream_layout() {
        let mac = Mac([0x0e, 0, 0, 0, 0, 2]);
        let peers = [
            peer("10.244.2.0/24", "192.0.2.2", Some(mac)),
            peer("10.244.3.0/24", "198.51.100.3", None),
            peer("10.244.4.0/24", "192.0.2.4", Some(Mac([0x0e, 0, 0, 0, 0, 4]))),
        ];
        let d = desired(7, 2, None, &peers);
        assert_eq!(d.device, Some(7));
        let r = &d.routes[0];
        assert_eq!(r.dst.to_string(), "10.244.2.0/24");
        assert_eq!(r.gateway, Some("10.244.2.0".parse().unwrap()));
        assert!(r.onlink && r.oif == Some(7) && r.protocol == RTPROT_FLANNEL);
        assert_eq!(d.neighbours[&"10.244.2.0".parse::<IpAddr>().unwrap()], mac);
        assert_eq!(d.fdb[&mac], "192.0.2.2".parse::<IpAddr>().unwrap());
        assert_eq!(d.skipped.len(), 1);
        assert_eq!(d.routes.len(), 2);

        // DirectRouting: same-L2 peers get a host-gw style route, others stay on the overlay.
        let d = desired(7, 2, Some("192.0.2.0/24".parse().unwrap()), &peers);
        assert!(d.routes.iter().any(|r| r.dst.to_string() == "10.244.2.0/24" && r.oif == Some(2) && !r.onlink));
        assert!(d.neighbours.is_empty());
    }
}
