//! The host side of the backends: which interface carries inter-node traffic
//! (the uplink) and, for vxlan, the `flannel.<VNI>` device. Per-peer state is
//! in [`crate::reconcile`].

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use regex_lite::Regex;
use tracing::{info, warn};

use flannel_shared::IpNet;
use flannel_shared::netlink::{Address, Link, Netlink, NetlinkError, RT_TABLE_MAIN, VxlanSpec};

use crate::config::Opts;

/// VXLAN header + UDP + outer IPv4 + inner Ethernet.
pub const VXLAN_OVERHEAD: u32 = 50;
/// The same with an outer IPv6 header.
pub const VXLAN6_OVERHEAD: u32 = 70;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("{0}")]
    Netlink(#[from] NetlinkError),
    #[error("uplink: {0}")]
    Uplink(String),
}

/// The interface used for inter-node traffic and the address this node is known by.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Uplink {
    pub index: u32,
    pub name: String,
    pub mtu: u32,
    /// This node's address on the uplink (VXLAN `local`).
    pub ip: Ipv4Addr,
    /// The uplink's IPv4 networks: peers inside are on-link (host-gw, DirectRouting).
    pub nets: Vec<IpNet>,
    /// What peers are told to send to (`--public-ip`, else `ip`).
    pub public_ip: Ipv4Addr,
    /// This node's global IPv6 address on the uplink, if any (the IPv6 VTEP's `local`).
    pub ip6: Option<Ipv6Addr>,
    /// The uplink's IPv6 networks (on-link peers for IPv6 host-gw and DirectRouting).
    pub nets6: Vec<IpNet>,
    /// What peers are told to send IPv6 to (`--public-ipv6`, else `ip6`).
    pub public_ipv6: Option<Ipv6Addr>,
}

fn usable_v6(a: &Address) -> Option<Ipv6Addr> {
    match a.net.addr() {
        // Not loopback, not link-local (fe80::/10).
        IpAddr::V6(v6) if !v6.is_loopback() && (v6.segments()[0] & 0xffc0) != 0xfe80 => Some(v6),
        _ => None,
    }
}

fn usable_v4(a: &Address) -> Option<Ipv4Addr> {
    match a.net.addr() {
        IpAddr::V4(v4) if !v4.is_loopback() && !v4.is_link_local() => Some(v4),
        _ => None,
    }
}

/// Picks the uplink as upstream does: `--iface` (names or IPs, first found
/// wins), else `--iface-regex`, else the interface of the route to
/// `--iface-can-reach`, else the interface of the default route.
pub async fn find_uplink(nl: &Netlink, opts: &Opts) -> Result<Uplink, BackendError> {
    let links = nl.links().await?;
    let addrs = nl.addresses(None).await?;
    let v4_of = |index: u32| addrs.iter().filter(move |a| a.index == index).filter_map(usable_v4);

    let mut chosen: Option<(&Link, Option<Ipv4Addr>)> = None;
    if !opts.iface.is_empty() {
        for want in &opts.iface {
            chosen = match want.parse::<IpAddr>() {
                Ok(ip) => addrs
                    .iter()
                    .find(|a| a.net.addr() == ip)
                    .and_then(|a| links.iter().find(|l| l.index == a.index))
                    .map(|l| (l, if let IpAddr::V4(v4) = ip { Some(v4) } else { None })),
                Err(_) => links.iter().find(|l| &l.name == want).map(|l| (l, None)),
            };
            if chosen.is_some() {
                break;
            }
        }
        if chosen.is_none() {
            return Err(BackendError::Uplink(format!("none of --iface {} exists here", opts.iface.join(","))));
        }
    } else if !opts.iface_regex.is_empty() {
        for pat in &opts.iface_regex {
            let re = Regex::new(pat).map_err(|e| BackendError::Uplink(format!("--iface-regex {pat:?}: {e}")))?;
            // Addresses first, then names; an interface without a usable IPv4 address cannot carry traffic.
            chosen = links
                .iter()
                .find_map(|l| v4_of(l.index).find(|ip| re.is_match(&ip.to_string())).map(|ip| (l, Some(ip))))
                .or_else(|| {
                    links
                        .iter()
                        .find(|l| l.name != "lo" && re.is_match(&l.name) && v4_of(l.index).next().is_some())
                        .map(|l| (l, None))
                });
            if chosen.is_some() {
                break;
            }
        }
        if chosen.is_none() {
            return Err(BackendError::Uplink(format!(
                "no interface name or address matches --iface-regex {}",
                opts.iface_regex.join(",")
            )));
        }
    } else {
        let (dst, what) = match opts.iface_can_reach {
            Some(ip) => (ip, format!("--iface-can-reach {ip}")),
            None => (IpAddr::V4(Ipv4Addr::UNSPECIFIED), "the default route".to_string()),
        };
        let routes = nl.routes(dst.is_ipv4(), Some(RT_TABLE_MAIN)).await?;
        let best = routes
            .iter()
            .filter(|r| {
                r.oif.is_some() && r.dst.contains(dst) && (opts.iface_can_reach.is_some() || r.dst.prefix() == 0)
            })
            .max_by_key(|r| (r.dst.prefix(), std::cmp::Reverse(r.metric)));
        let oif = best.and_then(|r| r.oif).ok_or_else(|| {
            BackendError::Uplink(format!("no route for {what}; pass --iface to name the interface for node traffic"))
        })?;
        chosen = links.iter().find(|l| l.index == oif).map(|l| (l, None));
    }
    let (link, ip) = chosen.ok_or_else(|| BackendError::Uplink("the chosen interface vanished".into()))?;
    let ip = ip.or_else(|| v4_of(link.index).next()).ok_or_else(|| {
        BackendError::Uplink(format!("{} has no IPv4 address; give --public-ip or another --iface", link.name))
    })?;
    let nets =
        addrs.iter().filter(|a| a.index == link.index && usable_v4(a).is_some()).map(|a| a.net.network()).collect();
    let v6: Vec<&Address> = addrs.iter().filter(|a| a.index == link.index && usable_v6(a).is_some()).collect();
    let ip6 = v6.first().and_then(|a| usable_v6(a));
    Ok(Uplink {
        index: link.index,
        name: link.name.clone(),
        mtu: link.mtu,
        ip,
        nets,
        public_ip: opts.public_ip.unwrap_or(ip),
        ip6,
        nets6: v6.iter().map(|a| a.net.network()).collect(),
        public_ipv6: opts.public_ipv6.or(ip6),
    })
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
        if v.learning {
            diffs.push("learning on".into());
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
pub async fn ensure_vtep(
    nl: &Netlink,
    spec: &VtepSpec,
    uplink: &Uplink,
    mac: Option<[u8; 6]>,
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
    if !link.up {
        nl.set_up(link.index).await?;
    }
    Ok((link, created))
}
