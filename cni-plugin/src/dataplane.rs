//! Kernel side of an attachment: the node bridge, the veth pair and the pod's
//! addresses and routes. Everything goes through [`Kernel`] (the shared
//! netlink layer in production).

use std::fs::File;
use std::net::IpAddr;

use flannel_shared::IpNet;
use flannel_shared::Mac;
use flannel_shared::netlink::{Idempotent, Link, Route, VethSpec};

use crate::error::{CniError, Result, code};
use crate::kernel::{Kernel, sysctl_path};

/// The node bridge as one ADD needs it.
pub struct BridgeSpec<'a> {
    pub name: &'a str,
    /// Gateway addresses in gateway form (`10.244.1.1/24`), one per family.
    pub gateways: &'a [IpNet],
    pub mtu: u32,
    pub promisc: bool,
}

/// A stable, locally administered MAC for the bridge, derived from its first
/// gateway (`0a:58:` + the IPv4 address, as Kubernetes networks commonly do).
/// Pinning it keeps pods' ARP entries for the gateway valid as ports come and go.
pub fn bridge_mac(gateways: &[IpNet]) -> Mac {
    let tail: [u8; 4] = match gateways.first().map(|g| g.addr()) {
        Some(IpAddr::V4(a)) => a.octets(),
        Some(IpAddr::V6(a)) => {
            let o = a.octets();
            [o[12], o[13], o[14], o[15]]
        }
        None => [0, 0, 0, 1],
    };
    Mac([0x0a, 0x58, tail[0], tail[1], tail[2], tail[3]])
}

/// Ensures the bridge exists, is up, has the gateway addresses and the MTU.
/// Safe against concurrent ADDs: whoever loses the creation race uses the winner's bridge.
/// An address from an old node subnet is replaced rather than reported
/// (a node that re-joined with a new lease must not be stuck).
pub async fn ensure_bridge(nl: &impl Kernel, spec: &BridgeSpec<'_>, mut warn: impl FnMut(String)) -> Result<Link> {
    let mut link = match nl.link_by_name(spec.name).await? {
        Some(l) => l,
        None => {
            nl.create_bridge(spec.name, bridge_mac(spec.gateways), spec.mtu, spec.promisc).await.ignore_exists()?;
            let l = nl.link_by_name(spec.name).await?.ok_or_else(|| {
                CniError::new(code::KERNEL_FAILURE, format!("bridge {} vanished right after creation", spec.name))
            })?;
            // An MTU given at creation is not "set by the user" for the bridge code:
            // the bridge would follow its ports (back to 1500 when the last pod
            // leaves). Setting it explicitly pins it.
            nl.set_mtu(l.index, spec.mtu).await?;
            l
        }
    };
    if link.kind.as_deref() != Some("bridge") {
        return Err(CniError::new(
            code::KERNEL_FAILURE,
            format!("{} exists but is not a bridge (kind {:?})", spec.name, link.kind.as_deref().unwrap_or("none")),
        ));
    }
    if link.mtu != spec.mtu {
        nl.set_mtu(link.index, spec.mtu).await?;
        link.mtu = spec.mtu;
    }
    if spec.promisc && !link.promisc {
        nl.set_promisc(link.index, true).await?;
    }
    let existing = nl.addresses(Some(link.index)).await?;
    for gw in spec.gateways {
        let mut have = false;
        for a in existing.iter().filter(|a| a.net.is_ipv4() == gw.is_ipv4()) {
            if a.net == *gw {
                have = true;
            } else if gw.is_ipv4() || !is_link_local(a.net.addr()) {
                // Only the family's global addresses: IPv6 link-local stays.
                warn(format!("{}: replacing stale address {} with {}", spec.name, a.net, gw));
                nl.del_address(link.index, a.net).await.ignore_not_found()?;
            }
        }
        if !have {
            nl.add_address(link.index, *gw).await.ignore_exists()?;
        }
    }
    if !link.up {
        if spec.gateways.iter().any(|g| !g.is_ipv4()) {
            skip_dad(nl, spec.name, &mut warn);
        }
        nl.set_up(link.index).await?;
        link.up = true;
    }
    Ok(link)
}

/// Turns off duplicate address detection on the bridge before it comes up.
/// Neighbour solicitations for forwarded packets (a pod on another node
/// reaching one here) go out from the bridge's link-local address, and the
/// kernel sends none while that address is tentative: without this, the first
/// IPv6 packets into a new node's pods wait 1-2 s. The addresses on the bridge
/// come from our IPAM and the kernel, so there is nothing to detect.
fn skip_dad(nl: &impl Kernel, bridge: &str, warn: &mut impl FnMut(String)) {
    let key = format!("net/ipv6/conf/{bridge}/accept_dad");
    if let Err(e) = nl.set_sysctl(&key, "0") {
        warn(format!("cannot turn off duplicate address detection on {bridge} ({}: {e})", sysctl_path(&key)));
    }
}

/// An IPv6 link-local address (the kernel's own, never one of ours).
pub fn is_link_local(ip: IpAddr) -> bool {
    ip.to_string().starts_with("fe80:")
}

pub use flannel_shared::attachment::host_veth_name;

/// Creates the veth pair: host end in `bridge`, up, hairpin as asked; pod end
/// named `ifname` inside `pod_ns`. Returns the host link.
pub async fn create_veth(
    host: &impl Kernel,
    host_name: &str,
    ifname: &str,
    pod_ns: &File,
    bridge: &Link,
    mtu: u32,
    hairpin: bool,
) -> Result<Link> {
    let spec =
        VethSpec { name: host_name, peer_name: ifname, peer_netns: pod_ns, mtu, master: Some(bridge.index), up: true };
    match host.create_veth(&spec).await {
        Ok(()) => {}
        Err(e) if e.is_exists() => {
            // A leftover from an earlier, interrupted ADD of this same attachment
            // (the name is derived from container ID and ifname): replace it.
            if let Some(old) = host.link_by_name(host_name).await? {
                host.del_link(old.index).await?;
            }
            host.create_veth(&spec).await?;
        }
        Err(e) => return Err(e.into()),
    }
    let link = host.link_by_name(host_name).await?.ok_or_else(|| {
        CniError::new(code::KERNEL_FAILURE, format!("veth {host_name} vanished right after creation"))
    })?;
    if hairpin {
        host.set_hairpin(link.index, true).await?;
    }
    Ok(link)
}

/// Brings up the pod interface and loopback, assigns the addresses and installs the routes.
pub async fn configure_pod(pod: &impl Kernel, ifname: &str, addrs: &[IpNet], routes: &[Route]) -> Result<Link> {
    let link = pod.link_by_name(ifname).await?.ok_or_else(|| {
        CniError::new(code::KERNEL_FAILURE, format!("{ifname} did not appear in the pod's namespace"))
    })?;
    for a in addrs {
        pod.add_address(link.index, *a).await.ignore_exists()?;
    }
    pod.set_up(link.index).await?;
    if let Some(lo) = pod.link_by_name("lo").await?
        && !lo.up
    {
        pod.set_up(lo.index).await?;
    }
    for r in routes {
        let r = r.clone().dev(link.index);
        pod.replace_route(&r).await.map_err(|e| CniError::new(code::KERNEL_FAILURE, e.to_string()))?;
    }
    Ok(link)
}

pub fn mac_string(link: &Link) -> String {
    link.mac.map(|m| m.to_string()).unwrap_or_default()
}
