//! The wireguard backend as doctor reads it: each family's device present, up,
//! at the MTU, on its port, and each peer on it as its lease says (key,
//! endpoint, allowed IPs). The peers come from the kernel's WireGuard over
//! generic netlink, or from the userspace device's `wg show` socket.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use flannel_shared::IpNet;
use flannel_shared::lease::Lease;
use flannel_shared::netconf::NetConfig;
use flannel_shared::netlink::{Link, Netlink};

use super::report::Report;
use crate::backend::Uplink;
use crate::backend::wireguard::device::kernel::{Genl, GenlSocket, parse_dump};
use crate::backend::wireguard::device::{PeerSet, uapi};
use crate::backend::wireguard::{self, Config, OVERHEAD, WgPeer, device_for, port_for};

/// A WireGuard device of this node as found.
pub struct Device {
    pub name: &'static str,
    pub link: Link,
    /// Its peers, when they could be read.
    pub peers: Option<PeerSet>,
}

pub fn config(cfg: &NetConfig) -> Config {
    Config::parse(&cfg.backend, &mut |_| {}).unwrap_or_default()
}

async fn read_peers(link: &Link) -> Result<(u16, PeerSet), String> {
    match link.kind.as_deref() {
        Some("wireguard") => {
            let d = parse_dump(&GenlSocket::default().get(&link.name).await?);
            Ok((d.port.unwrap_or(0), d.peers))
        }
        _ => {
            let path = uapi::socket_path(&uapi::socket_dir(), &link.name);
            let text = uapi::get(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            uapi::parse_get(&text).ok_or_else(|| format!("{}: not an answer: {text:?}", path.display()))
        }
    }
}

/// Checks each family's device; `[IPv4, IPv6]` (the same device twice in the single-device modes).
pub async fn devices(r: &mut Report, nl: &Netlink, cfg: &NetConfig, uplink: &Uplink) -> [Option<Device>; 2] {
    let wc = config(cfg);
    let mut out: [Option<Device>; 2] = [None, None];
    for (v6, on) in [(false, cfg.ipv4.is_some()), (true, cfg.ipv6.is_some())] {
        if !on {
            continue;
        }
        let name = device_for(wc.mode, v6);
        if v6 && name == wireguard::DEVICE && cfg.ipv4.is_some() {
            if let Some(d) = &out[0] {
                out[1] = Some(Device { name, link: d.link.clone(), peers: d.peers.clone() });
            }
            continue;
        }
        let what = format!("WireGuard {name}");
        let link = match nl.link_by_name(name).await {
            Ok(Some(l)) => l,
            _ => {
                r.fail(
                    &what,
                    "missing",
                    "the agent makes it at start (and removes it on exit): start the agent and read its log",
                );
                continue;
            }
        };
        let implementation = match link.kind.as_deref() {
            Some("wireguard") => "kernel",
            Some("tun") => "userspace (TUN)",
            other => {
                r.fail(&what, format!("is a {other:?} device, not WireGuard"), "delete it; the agent recreates it");
                continue;
            }
        };
        let mut wrong = Vec::new();
        let want_mtu = wireguard::device_mtu(&wc, uplink);
        if link.mtu != want_mtu {
            wrong.push(format!("MTU {} (want {want_mtu} = underlay {} - {OVERHEAD})", link.mtu, want_mtu + OVERHEAD));
        }
        if !link.up {
            wrong.push("down".into());
        }
        let want_port = port_for(&wc, v6);
        let peers = match read_peers(&link).await {
            Ok((port, peers)) => {
                if port != want_port {
                    wrong.push(format!("UDP port {port} (config {want_port})"));
                }
                Some(peers)
            }
            Err(e) => {
                r.warn(
                    &format!("{what} peers"),
                    format!("cannot be read: {e}"),
                    "run doctor as root in the agent's network namespace (and with the agent's FLANNEL_WG_SOCKET_DIR)",
                );
                None
            }
        };
        if wrong.is_empty() {
            let n = peers.as_ref().map(|p| format!(", {} peers", p.len())).unwrap_or_default();
            r.ok(&what, format!("{implementation}, UDP port {want_port}, MTU {}, up{n}", link.mtu));
        } else {
            r.fail(&what, wrong.join("; "), "restart the agent: it makes the device again as the config says");
        }
        out[usize::from(v6)] = Some(Device { name, link, peers });
    }
    out
}

/// Each family's subnet of every lease -> what the wireguard backend reads of it.
pub fn keys(leases: &[Lease]) -> HashMap<IpNet, WgPeer> {
    let mut out = HashMap::new();
    for l in leases {
        for (v6, subnet) in [(false, Some(l.subnet).filter(|_| l.has_ipv4())), (true, l.subnet6)] {
            if let (Some(s), Some(d)) = (subnet, wireguard::peer_data(l, v6)) {
                out.insert(s, d);
            }
        }
    }
    out
}

/// How the device differs from what the peer's lease says; empty when it matches.
pub fn mismatches(dev: &Device, key: Option<&WgPeer>, subnet: IpNet, public_ip: IpAddr, own_port: u16) -> Vec<String> {
    let Some(peers) = &dev.peers else { return Vec::new() };
    let Some(k) = key else { return vec!["its lease has no WireGuard PublicKey".into()] };
    let Some(have) = peers.get(&k.key) else {
        return vec![format!("its key {} is not a peer of {}", k.key, dev.name)];
    };
    let mut out = Vec::new();
    if !have.allowed.contains(&subnet) {
        let allowed: Vec<String> = have.allowed.iter().map(|n| n.to_string()).collect();
        out.push(format!("{} allows it {} (want {subnet})", dev.name, allowed.join(",")));
    }
    let want = SocketAddr::new(public_ip, k.port.unwrap_or(own_port));
    // WireGuard follows a peer that roams; only a missing endpoint cannot send.
    if have.endpoint.is_none() {
        out.push(format!("{} has no endpoint for it (its lease says {want})", dev.name));
    }
    out
}
