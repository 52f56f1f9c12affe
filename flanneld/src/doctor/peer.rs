//! Every peer, in every family of the network (IPv4, IPv6 or both): its
//! route, ARP/NDP and FDB entries against its lease, then a probe through the
//! data path. Peers are counted as nodes: a dual-stack peer is reachable when
//! both its families are.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::time::Instant;

use flannel_shared::IpNet;
use flannel_shared::Mac;
use flannel_shared::lease::Lease;
use flannel_shared::netconf::NetConfig;
use flannel_shared::netlink::{Link, Netlink, RT_TABLE_MAIN, Route};
use flannel_shared::subnet_env::SubnetEnv;

use super::probe::{self, Target};
use super::report::{self, Level, PeerProblem, Report};
use crate::backend::hostgw;
use crate::backend::hostgw::HostGw;
use crate::backend::{Backend, FamilyNet, Uplink, vxlan, wireguard};
use crate::peers::PeerTable;
use crate::reconcile::{self, Desired, Peer, RTPROT_FLANNEL};
use crate::subnet::LeaseEvent;

/// How this node reaches its peers, as doctor reads it off the config and the
/// devices it found (the agent's backends compute the same [`Desired`]).
#[derive(Clone, Debug)]
enum Mode {
    Vxlan { vtep: u32, uplink: u32, direct_on: Option<IpNet> },
    HostGw { uplink: u32 },
    WireGuard { dev: u32, network: IpNet },
}

impl Mode {
    fn desired(&self, peers: &[Peer<Mac>]) -> Desired {
        match *self {
            Mode::Vxlan { vtep, uplink, direct_on } => vxlan::desired(vtep, uplink, direct_on, peers),
            Mode::HostGw { uplink } => hostgw::desired(uplink, peers),
            Mode::WireGuard { dev, network } => {
                let mut d = Desired::on(None);
                d.routes.push(wireguard::network_route(network, dev));
                d
            }
        }
    }
}

/// One family's peers as this node should reach them.
struct Family {
    v6: bool,
    mode: Mode,
    peers: Vec<Peer<Mac>>,
    state: Kernel,
}

/// The backend's devices doctor found, by family (`[IPv4, IPv6]`).
pub struct Devices<'a> {
    /// The VXLAN devices when the backend is vxlan.
    pub vteps: [Option<&'a Link>; 2],
    /// The WireGuard devices when the backend is wireguard.
    pub wireguard: [Option<&'a super::wireguard::Device>; 2],
}

pub async fn check(
    r: &mut Report,
    nl: &Netlink,
    cfg: &NetConfig,
    uplink: &Uplink,
    env: &SubnetEnv,
    devs: Devices<'_>,
    leases: Vec<Lease>,
) {
    let vteps = devs.vteps;
    let vxlan = cfg.backend.kind == vxlan::Vxlan::TYPE;
    let is_wg = cfg.backend.kind == <wireguard::WireGuard as Backend>::TYPE;
    let wg_cfg = super::wireguard::config(cfg);
    let wg_keys = if is_wg { super::wireguard::keys(&leases) } else { HashMap::new() };
    let own: HashSet<IpNet> = [env.subnet, env.ipv6_subnet].into_iter().flatten().map(|s| s.network()).collect();
    // Each family's subnet of a lease -> the lease (the peer node) it belongs to.
    let mut node_of: HashMap<IpNet, IpNet> = HashMap::new();
    for l in &leases {
        if l.has_ipv4() {
            node_of.insert(l.subnet, l.key());
        }
        if let Some(s6) = l.subnet6 {
            node_of.insert(s6, l.key());
        }
    }
    let node = |s: &IpNet| node_of.get(s).copied().unwrap_or(*s);
    let mut table = PeerTable::new(<vxlan::Vxlan as Backend>::peer_data);
    let _ = table.apply(LeaseEvent::Snapshot(leases), None);
    let mut nodes: HashSet<IpNet> = HashSet::new();
    let mut families = Vec::new();
    for (v6, config) in [(false, &cfg.ipv4), (true, &cfg.ipv6)] {
        let Some(config) = config.clone() else { continue };
        let fam = if v6 { FamilyNet::v6(config, uplink) } else { FamilyNet::v4(config, uplink) };
        let Some(fam) = fam else {
            let what = if v6 { "IPv6" } else { "IPv4" };
            r.fail(
                &format!("peers ({what})"),
                format!("{} has no usable {what} address: no {what} peer can be reached", uplink.name),
                "give the uplink an address of the family (or --iface / --public-ip(v6)) and restart the agent",
            );
            continue;
        };
        let mode = match (vxlan, vteps[usize::from(v6)]) {
            (true, Some(v)) => Mode::Vxlan {
                vtep: v.index,
                uplink: uplink.index,
                direct_on: if vxlan::Config::lenient(&cfg.backend).direct_routing {
                    fam.nets.first().copied()
                } else {
                    None
                },
            },
            // The VTEP check has said why.
            (true, None) => continue,
            (false, _) if is_wg => match devs.wireguard[usize::from(v6)] {
                Some(d) => Mode::WireGuard { dev: d.link.index, network: fam.config.network },
                // The device check has said why.
                None => continue,
            },
            (false, _) => Mode::HostGw { uplink: uplink.index },
        };
        let refuse = |ip: IpAddr| if vxlan || is_wg { None } else { HostGw.refuse(&fam, uplink, ip) };
        let (mut peers, skipped) = table.for_family(&fam, &cfg.backend.kind, refuse);
        peers.retain(|p| !own.contains(&p.subnet));
        for (subnet, why) in skipped.iter().filter(|(s, _)| !own.contains(s)) {
            nodes.insert(node(subnet));
            r.peer_problems.push(PeerProblem {
                subnet: subnet.to_string(),
                public_ip: table.get(&node(subnet)).map(|k| k.lease.attrs.public_ip.to_string()).unwrap_or_default(),
                level: Level::Warn,
                problem: "cannot be programmed".into(),
                detail: why.clone(),
                fix: "see the reason; the agent logs it too".into(),
            });
        }
        nodes.extend(peers.iter().map(|p| node(&p.subnet)));
        let vtep = vteps[usize::from(v6)].filter(|_| vxlan).map(|l| l.index);
        let state = Kernel::read(nl, v6, vtep).await;
        families.push(Family { v6, mode, peers, state });
    }
    r.peers = nodes.len();

    let targets: Vec<Target> = families
        .iter()
        .flat_map(|f| f.peers.iter().map(|p| Target { ip: probe_target(&f.mode, p), mtu: env.mtu }))
        .collect();
    let started = Instant::now();
    let answers = probe::probe(&targets);
    let took = started.elapsed();
    r.probe_seconds = Some(took.as_secs_f64());
    match &answers {
        Err(e) => r.warn(
            "peer probes",
            format!("no raw ICMP socket: {e}"),
            "run doctor with NET_RAW (the DaemonSet grants it)",
        ),
        Ok(a) => {
            let count = |v6: bool| targets.iter().filter(|t| t.ip.is_ipv6() == v6).count();
            let answered = a.iter().filter(|a| a.small).count();
            let families: Vec<String> = [(false, "IPv4"), (true, "IPv6")]
                .iter()
                .filter(|(v6, _)| families.iter().any(|f| f.v6 == *v6))
                .map(|(v6, name)| format!("{} {name}", report::count(count(*v6))))
                .collect();
            r.ok(
                "peer probes",
                format!(
                    "{} address(es) echoed small and at {} bytes with DF: {} answered ({:.1} s)",
                    families.join(" + "),
                    env.mtu,
                    report::count(answered),
                    took.as_secs_f64()
                ),
            );
        }
    }

    let port = vxlan::Config::lenient(&cfg.backend).port;
    let mut failing: HashSet<IpNet> = HashSet::new();
    let mut k = 0;
    for f in &families {
        for p in &f.peers {
            let (t, a) = (targets[k].ip, answers.as_ref().ok().map(|a| a[k]));
            k += 1;
            let ip = p.public_ip.to_string();
            let mut push = |problem: &str, detail: String, fix: String| {
                failing.insert(node(&p.subnet));
                r.peer_problems.push(PeerProblem {
                    subnet: p.subnet.to_string(),
                    public_ip: ip.clone(),
                    level: Level::Fail,
                    problem: problem.into(),
                    detail,
                    fix,
                })
            };
            let mut wrong = f.state.mismatches(&f.mode, p);
            if let (Mode::WireGuard { .. }, Some(dev)) = (&f.mode, devs.wireguard[usize::from(f.v6)]) {
                let own_port = wireguard::port_for(&wg_cfg, f.v6);
                wrong.extend(super::wireguard::mismatches(
                    dev,
                    wg_keys.get(&p.subnet),
                    p.subnet,
                    p.public_ip,
                    own_port,
                ));
            }
            if !wrong.is_empty() {
                push(
                    "kernel entries do not match its lease",
                    wrong.join("; "),
                    "the agent repairs these within seconds: if it is stopped, start it (a stale VtepMAC means the peer was reinstalled while this agent was down)".into(),
                );
                continue;
            }
            let Some(a) = a else { continue };
            let ping = if f.v6 { "ping -6" } else { "ping" };
            if !a.small {
                let (problem, fix) = if matches!(f.mode, Mode::Vxlan { .. }) && !direct(&f.mode, p) {
                    (
                        "no answer through the VXLAN tunnel",
                        format!("allow UDP {port} between the nodes (both ways); run flanneld doctor on {ip}"),
                    )
                } else if matches!(f.mode, Mode::WireGuard { .. }) {
                    let port =
                        wg_keys.get(&p.subnet).and_then(|k| k.port).unwrap_or(wireguard::port_for(&wg_cfg, f.v6));
                    (
                        "no answer through the WireGuard tunnel",
                        format!(
                            "allow UDP {port} between the nodes (both ways) and give every node the same PSK (a mismatch never completes a handshake); run flanneld doctor on {ip}"
                        ),
                    )
                } else {
                    (
                        "no answer via its address",
                        "the node must be on this L2 network and forward pod traffic; run flanneld doctor there".into(),
                    )
                };
                push(problem, format!("{ping} {t}"), fix);
            } else if !a.full {
                let why = if a.full_too_big_here {
                    "this node's route to it is smaller"
                } else {
                    "the path's MTU is smaller"
                };
                push(
                    &format!("{}-byte packets with DF do not arrive", env.mtu),
                    format!("{why}; small ones do ({ping} {t})"),
                    if matches!(f.mode, Mode::WireGuard { .. }) {
                        "set Backend.MTU in net-conf.json to the underlay's real MTU (the WireGuard device gets MTU - 80) and restart the agents, or raise the underlay's MTU".into()
                    } else {
                        "set Backend.MTU in net-conf.json to the underlay's real MTU (the VTEP gets MTU - 50, - 70 over IPv6) and restart the agents, or raise the underlay's MTU".into()
                    },
                );
            }
        }
    }
    let programmed: HashSet<IpNet> = families.iter().flat_map(|f| f.peers.iter().map(|p| node(&p.subnet))).collect();
    r.peers_ok = programmed.iter().filter(|n| !failing.contains(n)).count();
}

fn direct(mode: &Mode, p: &Peer<Mac>) -> bool {
    matches!(mode, Mode::Vxlan { direct_on: Some(n), .. } if n.contains(p.public_ip))
}

/// Where a peer answers through our data path: its VTEP's `<subnet>.0`
/// (`<subnet>::` over IPv6) over VXLAN, its WireGuard device's (the same
/// address) over WireGuard, its cni0 gateway `<subnet>.1` (`<subnet>::1`) over
/// a plain route.
fn probe_target(mode: &Mode, p: &Peer<Mac>) -> IpAddr {
    let tunnel = matches!(mode, Mode::Vxlan { .. }) && !direct(mode, p) || matches!(mode, Mode::WireGuard { .. });
    let off = if tunnel { 0 } else { 1 };
    p.subnet.nth(off).unwrap_or(p.subnet.network_addr())
}

/// The kernel's routes, neighbour and FDB entries of one family as the agent
/// programs them, indexed so that thousands of peers are compared in linear time.
struct Kernel {
    routes: HashMap<IpNet, Vec<Route>>,
    neighbours: HashMap<IpAddr, Mac>,
    fdb: HashSet<(Mac, IpAddr)>,
}

impl Kernel {
    async fn read(nl: &Netlink, v6: bool, vtep: Option<u32>) -> Kernel {
        let mut routes: HashMap<IpNet, Vec<Route>> = HashMap::new();
        for r in nl.routes(!v6, Some(RT_TABLE_MAIN)).await.unwrap_or_default() {
            if r.protocol == RTPROT_FLANNEL {
                routes.entry(r.dst).or_default().push(r);
            }
        }
        let (mut neighbours, mut fdb) = (HashMap::new(), HashSet::new());
        if let Some(v) = vtep {
            for n in nl.neighbours(v, false).await.unwrap_or_default() {
                if let (Some(ip), Some(mac), true) = (n.ip, n.mac, n.permanent) {
                    neighbours.insert(ip, mac);
                }
            }
            for n in nl.neighbours(v, true).await.unwrap_or_default() {
                if let (Some(ip), Some(mac)) = (n.ip, n.mac) {
                    fdb.insert((mac, ip));
                }
            }
        }
        Kernel { routes, neighbours, fdb }
    }

    /// What of the peer's desired entries (the reconciler's own) the kernel lacks.
    fn mismatches(&self, mode: &Mode, p: &Peer<Mac>) -> Vec<String> {
        let want = mode.desired(std::slice::from_ref(p));
        let mac = |m: &Mac| m.to_string();
        let nd = |ip: &IpAddr| if ip.is_ipv4() { "ARP" } else { "NDP" };
        let mut out = Vec::new();
        for r in &want.routes {
            let have = self.routes.get(&r.dst).map(Vec::as_slice).unwrap_or_default();
            if !have.iter().any(|h| reconcile::same_route(h, r)) {
                out.push(match have.first() {
                    Some(h) => format!("route to {} via {:?} (want via {:?})", r.dst, h.gateway, r.gateway),
                    None => format!("no route to {}", r.dst),
                });
            }
        }
        for (ip, m) in &want.neighbours {
            match self.neighbours.get(ip) {
                Some(have) if have == m => {}
                Some(have) => out.push(format!("{} {ip} -> {} (its lease says {})", nd(ip), mac(have), mac(m))),
                None => out.push(format!("no {} entry for {ip}", nd(ip))),
            }
        }
        for (m, dst) in &want.fdb {
            if !self.fdb.contains(&(*m, *dst)) {
                out.push(format!("no FDB entry {} -> {dst}", mac(m)));
            }
        }
        out
    }
}
