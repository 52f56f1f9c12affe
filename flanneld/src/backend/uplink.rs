//! Which interface carries inter-node traffic (the uplink), and the address
//! this node is known by.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use regex_lite::Regex;

use flannel_shared::IpNet;
use flannel_shared::netlink::{Address, Link, RT_TABLE_MAIN};

use tracing::info;

use super::BackendError;
use crate::config::Opts;
use crate::kernel::Kernel;

/// The interface used for inter-node traffic and the address this node is known by.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Uplink {
    pub index: u32,
    pub name: String,
    pub mtu: u32,
    /// This node's IPv4 address on the uplink (VXLAN `local`); none on an IPv6-only network.
    pub ip: Option<Ipv4Addr>,
    /// The uplink's IPv4 networks: peers inside are on-link (host-gw, DirectRouting).
    pub nets: Vec<IpNet>,
    /// What peers are told to send to (`--public-ip`, else `ip`).
    pub public_ip: Option<Ipv4Addr>,
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

/// An IPv4 address upstream would use on an interface: global or link-local unicast.
fn usable_v4(a: &Address) -> Option<Ipv4Addr> {
    match a.net.addr() {
        IpAddr::V4(v4) if !v4.is_loopback() && !v4.is_unspecified() && !v4.is_multicast() && !v4.is_broadcast() => {
            Some(v4)
        }
        _ => None,
    }
}

/// Where the public addresses come from: flags, or (Kubernetes) our Node's
/// `node-public-ip` / `node-public-ipv6` annotations, which win over the flags as upstream.
#[derive(Clone, Copy, Debug, Default)]
pub struct PublicIps {
    pub v4: Option<Ipv4Addr>,
    pub v6: Option<Ipv6Addr>,
}

/// One way of naming the uplink, tried in upstream's order.
enum Want<'a> {
    /// `--iface`: a name, or an address held by the interface.
    Iface(&'a str),
    /// `--iface-regex`: matched against interfaces' IPv4 addresses, then names.
    Regex(&'a str),
    /// `--iface-can-reach`: the interface of the route to it.
    CanReach(IpAddr),
    /// None of those: the interface holding the public IP, when one is given.
    PublicIp(IpAddr),
    /// None of those and no public IP: the interface of the default route.
    DefaultRoute,
}

/// Picks the uplink as upstream's `main.go` does: each `--iface` in order
/// (a name, or an address on it), then each `--iface-regex`, then
/// `--iface-can-reach`, each falling through to the next when nothing
/// matches (a bad regex is one that matches nothing). Without any of them:
/// the interface holding `--public-ip` (or `--public-ipv6`) when given,
/// else the interface of the default route. Values are never split on commas:
/// a regex like `^eth[0-9]{1,3}$` is one pattern. On an IPv6-only network
/// (`v4` false) addresses and the default route are IPv6 ones, as upstream.
pub async fn find_uplink<K: Kernel>(nl: &K, opts: &Opts, stored: PublicIps, v4: bool) -> Result<Uplink, BackendError> {
    let links = nl.links().await?;
    let addrs = nl.addresses(None).await?;
    let family = if v4 { "IPv4" } else { "IPv6" };
    let usable = move |a: &Address| if v4 { usable_v4(a).map(IpAddr::V4) } else { usable_v6(a).map(IpAddr::V6) };
    let addr_of = |index: u32| addrs.iter().filter(move |a| a.index == index).filter_map(usable);

    // Annotated addresses win over the flags (upstream's GetStoredPublicIP).
    let public = PublicIps { v4: stored.v4.or(opts.public_ip), v6: stored.v6.or(opts.public_ipv6) };
    let named = !opts.iface.is_empty() || !opts.iface_regex.is_empty() || opts.iface_can_reach.is_some();
    let mut wants: Vec<(Want, String)> = Vec::new();
    let public_ip = public.v4.map(IpAddr::V4).or(public.v6.map(IpAddr::V6));
    if !named {
        match public_ip {
            Some(ip) => wants.push((Want::PublicIp(ip), format!("the public IP {ip}"))),
            None => wants.push((Want::DefaultRoute, "the default route".into())),
        }
    }
    wants.extend(opts.iface.iter().map(|i| (Want::Iface(i), format!("--iface {i}"))));
    wants.extend(opts.iface_regex.iter().map(|r| (Want::Regex(r), format!("--iface-regex {r}"))));
    wants.extend(opts.iface_can_reach.map(|ip| (Want::CanReach(ip), format!("--iface-can-reach {ip}"))));

    let mut chosen: Option<(&Link, IpAddr)> = None;
    let mut tried = Vec::new();
    for (want, what) in &wants {
        let found: Result<(&Link, Option<IpAddr>), String> = match want {
            Want::PublicIp(ip) => {
                by_address(&links, &addrs, *ip, v4).ok_or_else(|| format!("no interface here has {ip}"))
            }
            Want::Iface(name) => match name.parse::<IpAddr>() {
                Ok(ip) => by_address(&links, &addrs, ip, v4).ok_or_else(|| format!("no interface here has {ip}")),
                Err(_) => {
                    links.iter().find(|l| &l.name == name).map(|l| (l, None)).ok_or_else(|| "no such interface".into())
                }
            },
            Want::Regex(pat) => match Regex::new(pat) {
                Err(e) => Err(format!("not a valid regex: {e}")),
                // Addresses first, then names, as upstream; among matching names the
                // first with an IPv4 address (upstream takes the first and gives up
                // when it has none: a veth pair `ext0`/`ext1` would stop it).
                Ok(re) => links
                    .iter()
                    .find_map(|l| addr_of(l.index).find(|ip| re.is_match(&ip.to_string())).map(|ip| (l, Some(ip))))
                    .or_else(|| {
                        let mut names = links.iter().filter(|l| re.is_match(&l.name));
                        names.clone().find(|l| addr_of(l.index).next().is_some()).or(names.next()).map(|l| (l, None))
                    })
                    .ok_or_else(|| {
                        let all: Vec<String> = links
                            .iter()
                            .map(|l| format!("{}:{:?}", l.name, addr_of(l.index).collect::<Vec<_>>()))
                            .collect();
                        format!("matches none of the interfaces ({})", all.join(", "))
                    }),
            },
            Want::CanReach(dst) => route_oif(nl, &links, *dst, false).await?,
            Want::DefaultRoute => {
                let any = if v4 { IpAddr::V4(Ipv4Addr::UNSPECIFIED) } else { IpAddr::V6(Ipv6Addr::UNSPECIFIED) };
                route_oif(nl, &links, any, true).await?
            }
        };
        match found {
            Ok((link, ip)) => match ip.or_else(|| addr_of(link.index).next()) {
                Some(ip) => {
                    info!("uplink {} ({ip}) from {what}", link.name);
                    chosen = Some((link, ip));
                    break;
                }
                None => tried.push(format!("{what}: {} has no {family} address", link.name)),
            },
            Err(why) => tried.push(format!("{what}: {why}")),
        }
        if named {
            info!("could not use {}", tried.last().map(String::as_str).unwrap_or_default());
        }
    }
    let (link, ip) = chosen.ok_or_else(|| {
        let hint = if named {
            "no interface matches the interfaces, regexes or address given"
        } else {
            "no interface to use; pass --iface to name the interface for node traffic"
        };
        BackendError::Uplink(format!("{hint} ({})", tried.join("; ")))
    })?;
    let nets =
        addrs.iter().filter(|a| a.index == link.index && usable_v4(a).is_some()).map(|a| a.net.network()).collect();
    let v6: Vec<&Address> = addrs.iter().filter(|a| a.index == link.index && usable_v6(a).is_some()).collect();
    let (ip4, ip6) = match ip {
        IpAddr::V4(a) => (Some(a), v6.first().and_then(|a| usable_v6(a))),
        IpAddr::V6(a) => (None, Some(a)),
    };
    Ok(Uplink {
        index: link.index,
        name: link.name.clone(),
        mtu: link.mtu,
        ip: ip4,
        nets,
        public_ip: public.v4.or(ip4),
        ip6,
        nets6: v6.iter().map(|a| a.net.network()).collect(),
        public_ipv6: public.v6.or(ip6),
    })
}

/// The interface holding `ip`, and `ip` when it is of the network's family (the tunnel's source).
fn by_address<'a>(links: &'a [Link], addrs: &[Address], ip: IpAddr, v4: bool) -> Option<(&'a Link, Option<IpAddr>)> {
    let a = addrs.iter().find(|a| a.net.addr() == ip)?;
    let link = links.iter().find(|l| l.index == a.index)?;
    Some((link, (ip.is_ipv4() == v4).then_some(ip)))
}

/// The interface of the most specific main-table route to `dst` (`default`: the default route only).
async fn route_oif<'a, K: Kernel>(
    nl: &K,
    links: &'a [Link],
    dst: IpAddr,
    default: bool,
) -> Result<Result<(&'a Link, Option<IpAddr>), String>, BackendError> {
    let routes = nl.routes(dst.is_ipv4(), Some(RT_TABLE_MAIN)).await?;
    let best = routes
        .iter()
        .filter(|r| r.oif.is_some() && r.dst.contains(dst) && (!default || r.dst.prefix() == 0))
        .max_by_key(|r| (r.dst.prefix(), std::cmp::Reverse(r.metric)));
    Ok(match best.and_then(|r| r.oif) {
        None => Err("no route".into()),
        Some(oif) => {
            links.iter().find(|l| l.index == oif).map(|l| (l, None)).ok_or_else(|| "route's interface vanished".into())
        }
    })
}
