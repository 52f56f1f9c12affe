//! Which interface carries inter-node traffic (the uplink), and the address
//! this node is known by.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use regex_lite::Regex;

use flannel_shared::IpNet;
use flannel_shared::netlink::{Address, Link, RT_TABLE_MAIN};

use super::BackendError;
use crate::config::Opts;
use crate::kernel::Kernel;

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

pub(super) fn usable_v6(a: &Address) -> Option<Ipv6Addr> {
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
pub async fn find_uplink<K: Kernel>(nl: &K, opts: &Opts) -> Result<Uplink, BackendError> {
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
