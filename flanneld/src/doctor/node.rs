//! Checks of this node: the agent, subnet.env against the network config,
//! kernel settings, the VXLAN device, cni0, the firewall and the IP store.
//! Reads only: nothing here changes the node.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::time::Duration;

use flannel_shared::IpNet;
use flannel_shared::netconf::NetConfig;
use flannel_shared::netlink::{Address, Link, Netlink};
use flannel_shared::subnet_env::SubnetEnv;

use super::report::{Level, Report};
use crate::backend::Backend;
use crate::backend::Uplink;
use crate::backend::vxlan::{self, VXLAN_OVERHEAD, device_name, underlay_mtu};
use crate::config::Opts;

/// A GET on the agent's health port: (status, body), or why not.
pub fn http_get(opts: &Opts, path: &str) -> Result<(u16, String), String> {
    use std::io::{Read, Write};
    let ip = if opts.healthz_ip.is_unspecified() { IpAddr::V4(Ipv4Addr::LOCALHOST) } else { opts.healthz_ip };
    let addr = std::net::SocketAddr::new(ip, opts.healthz_port);
    let mut s =
        std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| format!("{addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| e.to_string())?;
    let code = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).ok_or("not HTTP")?;
    Ok((code, out.split_once("\r\n\r\n").map(|x| x.1.to_string()).unwrap_or_default()))
}

/// The agent: running, healthy, ready, and what its metrics say.
pub fn agent(r: &mut Report, opts: &Opts) {
    if opts.healthz_port == 0 {
        r.warn(
            "agent",
            "--healthz-port is 0: the agent's health, readiness and errors cannot be read",
            "run flanneld (and doctor) with --healthz-port=8081, as the manifest does",
        );
        return;
    }
    match http_get(opts, "/healthz") {
        Err(e) => {
            r.fail(
                "agent",
                format!("not running here (nothing answers on {e})"),
                "start flanneld (kubectl -n kube-flannel get pods -o wide; its logs say why it stopped)",
            );
            return;
        }
        Ok((200, _)) => r.ok("agent", format!("running, /healthz on port {}", opts.healthz_port)),
        Ok((c, b)) => r.fail("agent", format!("/healthz answered {c}: {}", b.trim()), "see the agent's log"),
    }
    match http_get(opts, "/readyz") {
        Ok((200, _)) => r.ok("agent ready", "lease held, subnet.env written, rules in place, peers programmed"),
        Ok((c, b)) => r.fail(
            "agent ready",
            format!("/readyz answered {c}: {}", b.trim()),
            "see the agent's log for what it waits on",
        ),
        Err(e) => r.fail("agent ready", e, "see the agent's log"),
    }
    let Ok((200, metrics)) = http_get(opts, "/metrics") else { return };
    let value =
        |name: &str| metrics.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse::<f64>().ok());
    match value("flannel_reconcile_errors_total") {
        Some(n) if n > 0.0 => r.warn(
            "reconcile",
            format!(
                "{n} failed pass(es) since start (last pass {:.1} ms)",
                value("flannel_reconcile_last_duration_seconds").unwrap_or(0.0) * 1e3
            ),
            "grep the agent's log for 'reconcile'",
        ),
        _ => r.ok(
            "reconcile",
            format!("no failed pass; {} pass(es) so far", value("flannel_reconcile_runs_total").unwrap_or(0.0)),
        ),
    }
    if let Some(n) = value("flannel_peers_skipped").filter(|n| *n > 0.0) {
        r.warn(
            "skipped peers",
            format!("{n} peer(s) the agent cannot program"),
            "grep the agent's log for 'not programmed'",
        );
    }
    let expiry = value("flannel_lease_expiry_timestamp_seconds").unwrap_or(0.0);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
    if expiry > 0.0 && expiry < now + 3600.0 {
        r.warn(
            "lease",
            format!("expires in {:.0} s", expiry - now),
            "the agent renews it; if it cannot, check etcd/API access",
        );
    }
}

/// subnet.env as the plugin will read it, against the network config.
pub fn subnet_env(r: &mut Report, opts: &Opts, cfg: Option<&NetConfig>) -> Option<SubnetEnv> {
    let env = match SubnetEnv::read(&opts.subnet_file) {
        Ok(e) => e,
        Err(e) => {
            r.fail("subnet.env", e.to_string(), "the agent writes it once it holds a lease: check the agent");
            return None;
        }
    };
    let Some(cfg) = cfg else { return Some(env) };
    let want4 = cfg.ipv4.as_ref().map(|f| f.network);
    let want6 = cfg.ipv6.as_ref().map(|f| f.network);
    let show = |n: Option<IpNet>| n.map_or_else(|| "-".to_string(), |n| n.to_string());
    if env.network != want4 || env.ipv6_network != want6 {
        r.fail(
            "subnet.env",
            format!(
                "FLANNEL_NETWORK {} / FLANNEL_IPV6_NETWORK {}, but the network config says {} / {}",
                show(env.network),
                show(env.ipv6_network),
                show(want4),
                show(want6)
            ),
            "restart the agent so it claims a subnet in the current Network (pods started before keep old addresses)",
        );
    } else {
        r.ok(
            "subnet.env",
            format!(
                "subnet {}, MTU {}, consistent with the network config",
                show(env.subnet.or(env.ipv6_subnet)),
                env.mtu
            ),
        );
    }
    Some(env)
}

fn sysctl(proc: &Path, key: &str) -> Option<String> {
    std::fs::read_to_string(proc.join("sys").join(key.replace('.', "/"))).ok().map(|s| s.trim().to_string())
}

/// A per-device IPv4 setting (device names may hold dots: `flannel.1`).
fn dev_sysctl(proc: &Path, dev: &str, key: &str) -> Option<String> {
    let p = proc.join("sys/net/ipv4/conf").join(dev).join(key);
    std::fs::read_to_string(p).ok().map(|s| s.trim().to_string())
}

/// Forwarding, br_netfilter, rp_filter where it drops our traffic.
pub fn kernel(r: &mut Report, proc: &Path, cfg: &NetConfig, devices: &[&str]) {
    if cfg.ipv4.is_some() {
        match sysctl(proc, "net.ipv4.ip_forward").as_deref() {
            Some("1") => r.ok("ip_forward", "net.ipv4.ip_forward = 1"),
            v => r.fail(
                "ip_forward",
                format!("net.ipv4.ip_forward = {}: this node routes no pod traffic", v.unwrap_or("?")),
                "sysctl -w net.ipv4.ip_forward=1 (and in /etc/sysctl.d)",
            ),
        }
    }
    if cfg.ipv6.is_some() {
        match sysctl(proc, "net.ipv6.conf.all.forwarding").as_deref() {
            Some("1") => r.ok("ipv6 forwarding", "net.ipv6.conf.all.forwarding = 1"),
            v => r.fail(
                "ipv6 forwarding",
                format!("net.ipv6.conf.all.forwarding = {}", v.unwrap_or("?")),
                "sysctl -w net.ipv6.conf.all.forwarding=1",
            ),
        }
    }
    match sysctl(proc, "net.bridge.bridge-nf-call-iptables").as_deref() {
        Some("1") => r.ok("bridge-nf-call-iptables", "1: bridged pod traffic passes iptables"),
        Some(v) => r.warn(
            "bridge-nf-call-iptables",
            format!("{v}: a Service reply between two pods of this node skips kube-proxy's reverse NAT and hangs"),
            "sysctl -w net.bridge.bridge-nf-call-iptables=1",
        ),
        None if !cfg.enable_nftables => {
            r.fail("bridge-nf-call-iptables", "missing: br_netfilter is not loaded", "modprobe br_netfilter")
        }
        None => {}
    }
    // Strict reverse-path filtering drops packets whose source is not routed back
    // out the interface they came in on (the kernel uses the larger of all and the device).
    let all = sysctl(proc, "net.ipv4.conf.all.rp_filter").and_then(|v| v.parse::<u8>().ok()).unwrap_or(0);
    let strict: Vec<&str> = devices
        .iter()
        .copied()
        .filter(|d| dev_sysctl(proc, d, "rp_filter").and_then(|v| v.parse::<u8>().ok()).map(|v| v.max(all)) == Some(1))
        .collect();
    if strict.is_empty() {
        r.ok("rp_filter", format!("not strict on {}", devices.join(", ")));
    } else {
        r.warn(
            "rp_filter",
            format!(
                "strict (1) on {}: asymmetric pod traffic (DirectRouting, several uplinks, Services) is dropped",
                strict.join(", ")
            ),
            &format!(
                "sysctl -w net.ipv4.conf.all.rp_filter=2 and net.ipv4.conf.<dev>.rp_filter=2 for {}",
                strict.join(", ")
            ),
        );
    }
}

/// The VXLAN device as the config and the uplink call for.
pub async fn vtep(r: &mut Report, nl: &Netlink, cfg: &NetConfig, uplink: &Uplink, v6: bool) -> Option<Link> {
    let b = &vxlan::Config::lenient(&cfg.backend);
    let name = device_name(b.vni, v6);
    let what = format!("VTEP {name}");
    let link = match nl.link_by_name(&name).await {
        Ok(Some(l)) => l,
        _ => {
            r.fail(&what, "missing", "the agent creates it at start: restart the agent and read its log");
            return None;
        }
    };
    let Some(v) = &link.vxlan else {
        r.fail(&what, format!("is a {:?} device, not vxlan", link.kind), "delete it; the agent recreates it");
        return None;
    };
    let local = if v6 { uplink.ip6.map(IpAddr::V6) } else { uplink.ip.map(IpAddr::V4) };
    let mut wrong = Vec::new();
    if v.vni != b.vni {
        wrong.push(format!("VNI {} (config {})", v.vni, b.vni));
    }
    if v.port != b.port {
        wrong.push(format!("port {} (config {})", v.port, b.port));
    }
    if v.local != local {
        wrong.push(format!("local {:?} (uplink {} has {local:?})", v.local, uplink.name));
    }
    let want_mtu = underlay_mtu(b, uplink).saturating_sub(if v6 { 70 } else { VXLAN_OVERHEAD });
    if link.mtu != want_mtu {
        wrong.push(format!("MTU {} (want {want_mtu} = underlay {} - overhead)", link.mtu, underlay_mtu(b, uplink)));
    }
    if !link.up {
        wrong.push("down".into());
    }
    if wrong.is_empty() {
        r.ok(
            &what,
            format!(
                "VNI {}, port {}, local {}, MTU {}, up",
                v.vni,
                v.port,
                local.map(|l| l.to_string()).unwrap_or_default(),
                link.mtu
            ),
        );
    } else {
        r.fail(&what, wrong.join("; "), "restart the agent: it rebuilds a wrong VTEP with the same MAC");
    }
    Some(link)
}

/// cni0: the gateway of this node's subnet, nothing else, at the pods' MTU.
pub fn cni0(r: &mut Report, link: Option<&Link>, addrs: &[Address], env: &SubnetEnv) {
    let Some(link) = link else {
        r.ok("cni0", "not created yet (no pod on this node so far)");
        return;
    };
    let Some(subnet) = env.subnet else { return };
    let v4: Vec<IpNet> = addrs.iter().filter(|a| a.index == link.index && a.net.is_ipv4()).map(|a| a.net).collect();
    let stale: Vec<String> = v4.iter().filter(|a| **a != subnet).map(|a| a.to_string()).collect();
    if !stale.is_empty() {
        r.fail(
            "cni0",
            format!("carries {} but this node's subnet is {subnet} (an old subnet: new pods get addresses other nodes do not route here)", stale.join(", ")),
            &format!("ip addr del {} dev cni0 (the next pod ADD puts {subnet} back)", stale[0]),
        );
    } else if link.mtu != env.mtu {
        r.warn(
            "cni0",
            format!("MTU {} but FLANNEL_MTU is {}", link.mtu, env.mtu),
            "delete cni0 when no pod runs, or restart the pods",
        );
    } else {
        r.ok("cni0", format!("{subnet}, MTU {}", link.mtu));
    }
}

/// The plugin's IP store: how full it is, and reservations whose pod is gone
/// (no host veth of that attachment on this node: a leak, freed by the
/// runtime's DEL or the plugin's GC).
pub fn ip_store(r: &mut Report, dir: &Path, env: &SubnetEnv, links: &[Link]) {
    let Some(subnet) = env.subnet else { return };
    let mut count = 0usize;
    let mut leaks = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let Ok(ip) = e.file_name().to_string_lossy().parse::<IpAddr>() else { continue };
        if !subnet.contains(ip) {
            continue;
        }
        count += 1;
        let text = std::fs::read_to_string(e.path()).unwrap_or_default();
        let mut parts = text.split(['\r', '\n']).map(str::trim).filter(|p| !p.is_empty());
        let (Some(id), ifname) = (parts.next(), parts.next().unwrap_or("eth0")) else { continue };
        let veth = flannel_shared::attachment::host_veth_name(id, ifname);
        if !links.iter().any(|l| l.name == veth) {
            leaks.push(format!("{ip} ({})", id.chars().take(12).collect::<String>()));
        }
    }
    let capacity = (1u128 << subnet.host_bits()).saturating_sub(3);
    let what = "IP store";
    if !leaks.is_empty() {
        let shown: Vec<&str> = leaks.iter().take(5).map(String::as_str).collect();
        r.warn(
            what,
            format!("{} of {count} reservation(s) have no pod here (no veth): {}", leaks.len(), shown.join(", ")),
            "the runtime's DEL frees them (crictl rmp <pod>); the plugin's GC frees all but the listed attachments",
        );
    } else if capacity > 0 && count as u128 * 10 >= capacity * 9 {
        r.warn(
            what,
            format!("{count} of {capacity} addresses of {subnet} reserved in {}", dir.display()),
            "the node runs out soon: fewer pods, or a larger SubnetLen",
        );
    } else {
        r.ok(what, format!("{count} of {capacity} addresses of {subnet} reserved, each with its pod"));
    }
}

/// Firewall rules that break pod traffic, ours missing or foreign ones in the way.
pub fn firewall(r: &mut Report, cfg: &NetConfig, opts: &Opts) {
    if cfg.enable_nftables {
        let out = std::process::Command::new("nft").args(["list", "tables"]).output();
        match out {
            Ok(o) if String::from_utf8_lossy(&o.stdout).contains("flannel-ipv") => {
                r.ok("firewall", "nftables mode: flannel's tables present")
            }
            Ok(_) => r.fail(
                "firewall",
                "nftables mode but no flannel-ipv4/ipv6 table",
                "check the agent's log (EnableNFTables needs the nft binary)",
            ),
            Err(e) => r.warn("firewall", format!("nft: {e}"), "install nftables"),
        }
        return;
    }
    // Each family of the network has its own tables (IPv6 in ip6tables).
    let save = |bin: &str, table: &str| -> Option<String> {
        let o = std::process::Command::new(bin).args(["-t", table]).output().ok()?;
        Some(String::from_utf8_lossy(&o.stdout).into_owned())
    };
    let mut fams = Vec::new();
    for (bin, f) in [("iptables", &cfg.ipv4), ("ip6tables", &cfg.ipv6)] {
        let Some(f) = f else { continue };
        let save_bin = format!("{bin}-save");
        let (Some(filter), Some(nat)) = (save(&save_bin, "filter"), save(&save_bin, "nat")) else {
            r.warn("firewall", format!("{save_bin} not available"), "install iptables");
            return;
        };
        fams.push((bin, f.network, filter, nat));
    }
    let dual = fams.len() > 1;
    // "(ip6tables)" after evidence of IPv6 rules; nothing for IPv4 alone, as before.
    let which = |bin: &str| if bin == "ip6tables" || dual { format!(" ({bin})") } else { String::new() };
    let port = vxlan::Config::lenient(&cfg.backend).port.to_string();
    let mut drops: Vec<(String, &str)> = Vec::new();
    for (bin, _, filter, _) in &fams {
        drops.extend(
            filter
                .lines()
                .filter(|l| l.starts_with("-A INPUT ") || l.starts_with("-A OUTPUT "))
                .filter(|l| {
                    l.contains("-p udp")
                        && l.contains(&format!("--dport {port}"))
                        && (l.contains("-j DROP") || l.contains("-j REJECT"))
                })
                .map(|l| (l.to_string(), *bin)),
        );
    }
    if cfg.backend.kind == vxlan::Vxlan::TYPE && !drops.is_empty() {
        let shown: Vec<String> = drops.iter().map(|(l, bin)| format!("{l}{}", which(bin))).collect();
        r.fail(
            "firewall: VXLAN port",
            format!("UDP {port} is dropped here: {}", shown.join(" | ")),
            &format!("remove the rule ({} -D {})", drops[0].1, drops[0].0.trim_start_matches("-A ")),
        );
    }
    for (bin, _, filter, _) in &fams {
        let fwd_drop = filter.lines().any(|l| l.starts_with(":FORWARD DROP"));
        let ours = filter.lines().any(|l| l == "-A FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD");
        match (fwd_drop, ours) {
            (true, false) => r.fail(
                "firewall: FORWARD",
                format!(
                    "policy DROP and flannel's accept rules are not there{}: pod traffic between nodes is dropped",
                    which(bin)
                ),
                "run the agent with --iptables-forward-rules=true (the default), or accept the cluster network in FORWARD",
            ),
            (true, true) => r.ok(
                "firewall: FORWARD",
                format!("policy DROP, flannel's FLANNEL-FWD accepts the cluster network{}", which(bin)),
            ),
            _ => r.ok("firewall: FORWARD", format!("policy ACCEPT{}", which(bin))),
        }
    }
    if opts.ip_masq {
        for (bin, _, _, nat) in &fams {
            if nat.lines().any(|l| l.starts_with("-A POSTROUTING ") && l.contains("-j FLANNEL-POSTRTG")) {
                r.ok("firewall: masquerade", format!("FLANNEL-POSTRTG in place{}", which(bin)));
            } else {
                r.fail(
                    "firewall: masquerade",
                    format!("--ip-masq is on but FLANNEL-POSTRTG is not jumped to from POSTROUTING{}", which(bin)),
                    "check the agent's log for iptables errors",
                );
            }
        }
    }
    // Someone else's MASQUERADE of the whole pod network rewrites pod-to-pod sources.
    for (bin, net, _, nat) in &fams {
        let foreign: Vec<&str> = nat
            .lines()
            .take_while(|l| !l.contains("-j FLANNEL-POSTRTG"))
            .filter(|l| {
                l.starts_with("-A POSTROUTING ")
                    && l.contains("MASQUERADE")
                    && l.contains(&format!("-s {net}"))
                    && !l.contains(&format!("! -d {net}"))
            })
            .collect();
        if !foreign.is_empty() {
            r.fail(
                "firewall: foreign masquerade",
                format!(
                    "{}{} masquerades pod-to-pod traffic (peers see this node's address, not the pod's)",
                    foreign[0],
                    which(bin)
                ),
                &format!("remove it: {bin} -t nat -D {}", foreign[0].trim_start_matches("-A ")),
            );
        }
    }
}

/// `ETHTOOL_GTXCSUM`: whether any transmit checksum offload is on (what
/// `ethtool -k` shows as `tx-checksumming`; a VXLAN device has
/// `tx-checksum-ip-generic`).
const ETHTOOL_GTXCSUM: u32 = 0x16;

/// `struct ethtool_value`.
#[repr(C)]
struct EthtoolValue {
    cmd: u32,
    data: u32,
}

/// Reads `dev`'s transmit checksum offload with the SIOCETHTOOL ioctl (a GET:
/// no privilege needed, nothing changed), in the caller's network namespace.
pub fn tx_checksumming(dev: &str) -> std::io::Result<bool> {
    use std::os::fd::AsRawFd;
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    if dev.len() >= ifr.ifr_name.len() {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{dev}: name too long")));
    }
    for (d, s) in ifr.ifr_name.iter_mut().zip(dev.bytes()) {
        *d = s as libc::c_char;
    }
    let mut value = EthtoolValue { cmd: ETHTOOL_GTXCSUM, data: 0 };
    ifr.ifr_ifru.ifru_data = (&mut value as *mut EthtoolValue).cast();
    // SAFETY: SIOCETHTOOL with an ifreq naming the device and pointing at an
    // ethtool_value that lives across the call; the kernel writes only `data`.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCETHTOOL as _, &mut ifr) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(value.data != 0)
}

/// The running kernel's release (`uname -r`).
fn kernel_release() -> Option<String> {
    // SAFETY: utsname is plain old data; uname fills it.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: uname writes into the struct we own.
    if unsafe { libc::uname(&mut u) } != 0 {
        return None;
    }
    let bytes: Vec<u8> = u.release.iter().take_while(|c| **c != 0).map(|c| *c as u8).collect();
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

/// `6.1.0-28-amd64` -> (6, 1).
pub fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut it = release.split(|c: char| !c.is_ascii_digit());
    let major = it.next()?.parse().ok()?;
    let minor = it.next()?.parse().ok()?;
    Some((major, minor))
}

/// The first kernel whose NAT leaves a zero UDP checksum alone ("netfilter:
/// nat: never update the UDP checksum when it's 0").
pub const NAT_CSUM_FIXED: (u32, u32) = (5, 7);

/// Whether transmit checksum offload on a VTEP exposes this kernel to the
/// NAT checksum bug (upstream #1279): offload on, and a kernel before 5.7
/// (or one whose version cannot be read).
pub fn offload_bites(tx_csum: bool, kernel: Option<(u32, u32)>) -> bool {
    tx_csum && kernel.is_none_or(|k| k < NAT_CSUM_FIXED)
}

/// UDP checksum offload on the VTEP `dev` against the running kernel.
pub fn checksum_offload(r: &mut Report, dev: &str) {
    let what = format!("tx checksum {dev}");
    match tx_checksumming(dev) {
        Ok(on) => {
            let (level, evidence, fix) = offload_finding(dev, on, &kernel_release().unwrap_or_default());
            r.add(&what, level, evidence, fix.as_deref());
        }
        Err(e) => r.warn(&what, format!("cannot read the offload state: {e}"), &format!("ethtool -k {dev}")),
    }
}

/// The verdict on `dev`'s offload state `on` under kernel `release`: level, evidence, fix.
pub fn offload_finding(dev: &str, on: bool, release: &str) -> (Level, String, Option<String>) {
    let version = kernel_version(release);
    let shown = version.map_or_else(|| format!("{release:?}"), |(a, b)| format!("{a}.{b}"));
    let state = if on { "on" } else { "off" };
    if offload_bites(on, version) {
        let evidence = format!(
            "tx-checksumming {state}, kernel {shown}: before 5.7, kube-proxy's NAT of VXLAN packets (a NodePort, a \
             ClusterIP reached from a node) writes a wrong UDP checksum over their zero one and the peer drops them: \
             connections stall ~63 s (upstream #1279)"
        );
        let fix = format!("ethtool -K {dev} tx-checksum-ip-generic off (again whenever the agent re-creates {dev})");
        (Level::Warn, evidence, Some(fix))
    } else if on {
        let evidence = format!(
            "tx-checksumming {state}, kernel {shown}: from 5.7 on NAT leaves VXLAN's zero UDP checksum alone, so the \
             63-second NodePort stall (upstream #1279) does not happen here"
        );
        (Level::Ok, evidence, None)
    } else {
        let evidence = format!(
            "tx-checksumming {state}, kernel {shown}: checksums are computed in software, NAT cannot break them"
        );
        (Level::Ok, evidence, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_versions_from_releases() {
        assert_eq!(kernel_version("6.1.0-28-amd64"), Some((6, 1)));
        assert_eq!(kernel_version("5.4.0-150-generic"), Some((5, 4)));
        assert_eq!(kernel_version("4.18.0-553.el8_10.x86_64"), Some((4, 18)));
        assert_eq!(kernel_version("6.18.44-fc-v1252"), Some((6, 18)));
        assert_eq!(kernel_version("5.7"), Some((5, 7)));
        assert_eq!(kernel_version("garbage"), None);
        assert_eq!(kernel_version(""), None);
    }

    #[test]
    fn offload_bites_only_when_on_before_5_7() {
        // On: the NAT checksum bug bites before 5.7 (and when the version is unknown).
        assert!(offload_bites(true, Some((4, 19))));
        assert!(offload_bites(true, Some((5, 6))));
        assert!(offload_bites(true, None));
        assert!(!offload_bites(true, Some((5, 7))));
        assert!(!offload_bites(true, Some((5, 10))));
        assert!(!offload_bites(true, Some((6, 1))));
        // Minor versions compare as numbers, not text: 5.10 is after 5.7.
        assert!(!offload_bites(true, Some((5, 10))));
        // Off: nothing to bite, whatever the kernel.
        assert!(!offload_bites(false, Some((4, 19))));
        assert!(!offload_bites(false, None));
    }

    #[test]
    fn findings_name_the_state_the_kernel_and_the_fix() {
        let (level, evidence, fix) = offload_finding("flannel.1", true, "5.4.0-150-generic");
        assert_eq!(level, Level::Warn);
        assert!(evidence.starts_with("tx-checksumming on, kernel 5.4: before 5.7"), "{evidence}");
        assert_eq!(
            fix.as_deref(),
            Some("ethtool -K flannel.1 tx-checksum-ip-generic off (again whenever the agent re-creates flannel.1)")
        );
        let (level, evidence, fix) = offload_finding("flannel.1", true, "6.1.0-28-amd64");
        assert_eq!((level, fix), (Level::Ok, None));
        assert!(evidence.starts_with("tx-checksumming on, kernel 6.1: from 5.7 on"), "{evidence}");
        let (level, evidence, _) = offload_finding("flannel-v6.1", false, "4.19.0");
        assert_eq!(level, Level::Ok);
        assert!(evidence.starts_with("tx-checksumming off, kernel 4.19: checksums are computed in software"));
    }

    #[test]
    fn the_check_reads_a_real_device() {
        // Loopback exists in every namespace; its offload state is whatever the kernel says,
        // and reading it must work without privileges.
        assert!(tx_checksumming("lo").is_ok());
        assert!(tx_checksumming("no-such-dev0").is_err());
        let mut r = Report::default();
        checksum_offload(&mut r, "no-such-dev0");
        assert_eq!(r.checks[0].level, Level::Warn);
        assert!(r.checks[0].evidence.starts_with("cannot read the offload state"), "{:?}", r.checks[0]);
    }
}
