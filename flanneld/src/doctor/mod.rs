//! `flanneld doctor`: why pods on this node cannot reach pods elsewhere, and
//! what to do. It reads the node's configuration the way the agent does (the
//! same flags and environment, subnet.env, the network config from etcd or
//! the file), inspects the agent, the kernel and the firewall, compares every
//! peer's route, ARP and FDB entries with its lease, and probes every peer
//! through the data path. It changes nothing on the node: reads and ICMP
//! echoes only.

mod node;
mod probe;
pub mod report;

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::time::Duration;

use clap::Parser;
use flannel_shared::IpNet;
use flannel_shared::netconf::{BackendType, NetConfig};
use flannel_shared::netlink::{Netlink, RT_TABLE_MAIN, Route};
use tokio::sync::mpsc;

use crate::backend::hostgw::HostGw;
use crate::backend::{self, Backend, FamilyNet};
use crate::config::Opts;
use crate::metrics::Metrics;
use crate::peers::PeerTable;
use crate::reconcile::{self, Mode, Peer, RTPROT_FLANNEL};
use crate::subnet::{LeaseEvent, SubnetManager};
use report::{Level, PeerProblem, Report};

/// `flanneld doctor [flags]`: the agent's own flags, plus `--json`.
#[derive(Debug, Parser)]
#[command(
    name = "flanneld doctor",
    about = "Explains why pods on this node can't reach pods elsewhere. Read-only: it changes nothing \
             on the node (it reads the kernel, the firewall, the agent and the lease store, and sends \
             ICMP echoes to the peers). Give it the agent's flags (or environment). \
             Exit 0: all OK, 1: warnings only, 2: something fails."
)]
pub struct DoctorArgs {
    #[command(flatten)]
    pub opts: Opts,
    /// The same report as JSON, for tools.
    #[arg(long)]
    pub json: bool,
    /// The plugin's IP store of this network (the conflist's `ipam.dataDir`/<name>).
    #[arg(long, default_value = "/var/lib/cni/networks/cbr0")]
    pub ipam_dir: std::path::PathBuf,
}

/// Runs every check and prints the report; returns the exit code.
pub async fn run(args: DoctorArgs) -> u8 {
    let report = diagnose(&args.opts, &args.ipam_dir, Path::new("/proc")).await;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report).unwrap_or_default());
    } else {
        // SAFETY: isatty only inspects the descriptor.
        let colour = unsafe { libc::isatty(1) } == 1;
        print!("{}", report.render(colour));
    }
    report.exit_code()
}

/// The network config and the peers' leases, from where the agent gets them.
async fn store(
    opts: &Opts,
    r: &mut Report,
) -> Option<(NetConfig, Vec<flannel_shared::lease::Lease>, crate::backend::PublicIps)> {
    async fn read<M: SubnetManager>(
        mut mgr: M,
        r: &mut Report,
    ) -> Option<(String, Vec<flannel_shared::lease::Lease>, crate::backend::PublicIps)> {
        let text = match mgr.network_config().await {
            Ok(t) => t,
            Err(e) => {
                r.fail("network config", e.to_string(), "write net-conf.json where the agent reads it");
                return None;
            }
        };
        let stored = mgr.stored_public_ips().await;
        let (tx, mut rx) = mpsc::channel(4);
        let watch = mgr.spawn_watch(tx, std::sync::Arc::new(Metrics::default()));
        let first = tokio::time::timeout(Duration::from_secs(15), rx.recv()).await;
        watch.abort();
        match first {
            Ok(Some(LeaseEvent::Snapshot(all))) => Some((text, all, stored)),
            _ => {
                r.fail(
                    "lease store",
                    "could not list the peers' leases within 15 s",
                    "check access to etcd or the API server",
                );
                None
            }
        }
    }
    let got = if opts.kube_subnet_mgr {
        let client = match crate::subnet::kube::connect(opts).await {
            Ok(c) => c,
            Err(e) => {
                r.fail("lease store", e.to_string(), "check the kubeconfig / in-cluster credentials");
                return None;
            }
        };
        let node = match crate::subnet::kube::node_name(&client).await {
            Ok(n) => n,
            Err(e) => {
                r.fail("lease store", e.to_string(), "set NODE_NAME");
                return None;
            }
        };
        let mgr = match crate::subnet::kube::KubeManager::new(client, node, opts) {
            Ok(m) => m,
            Err(e) => {
                r.fail("flags", e.to_string(), "fix the flag");
                return None;
            }
        };
        read(mgr, r).await?
    } else {
        let client = match crate::subnet::etcd::connect(opts).await {
            Ok(c) => c,
            Err(e) => {
                r.fail("lease store", e.to_string(), "check --etcd-endpoints and etcd's health");
                return None;
            }
        };
        read(crate::subnet::etcd::EtcdManager::new(client, &opts.etcd_prefix, opts.subnet_lease_ttl), r).await?
    };
    let (text, leases, stored) = got;
    match NetConfig::parse(&text, |_| {}) {
        Ok(cfg) => {
            let net = cfg.ipv4.as_ref().or(cfg.ipv6.as_ref()).map(|f| f.network.to_string()).unwrap_or_default();
            r.ok("network config", format!("backend {}, Network {net}", cfg.backend.kind.as_str()));
            Some((cfg, leases, stored))
        }
        Err(e) => {
            r.fail("network config", e.to_string(), "fix net-conf.json");
            None
        }
    }
}

/// Every check, in the order a person would go.
pub async fn diagnose(opts: &Opts, ipam_dir: &Path, proc: &Path) -> Report {
    let mut r = Report::default();
    node::agent(&mut r, opts);
    let stored = store(opts, &mut r).await;
    let env = node::subnet_env(&mut r, opts, stored.as_ref().map(|s| &s.0));
    let (Some((cfg, leases, public)), Some(env)) = (stored, env) else {
        r.conclude();
        return r;
    };
    let nl = match Netlink::connect() {
        Ok(n) => n,
        Err(e) => {
            r.fail("netlink", e.to_string(), "run doctor as root or with NET_ADMIN");
            r.conclude();
            return r;
        }
    };
    let uplink = match backend::find_uplink(&nl, opts, public, cfg.ipv4.is_some()).await {
        Ok(u) => {
            r.ok("uplink", format!("{} (MTU {})", u.name, u.mtu));
            u
        }
        Err(e) => {
            r.fail("uplink", e.to_string(), "pass --iface (or fix the default route)");
            r.conclude();
            return r;
        }
    };
    let vxlan = cfg.backend.kind == BackendType::Vxlan;
    let mut vtep4 = None;
    if vxlan && cfg.ipv4.is_some() {
        vtep4 = node::vtep(&mut r, &nl, &cfg, &uplink, false).await;
    }
    let mut devices = vec![uplink.name.as_str(), "cni0"];
    let vtep_name = crate::backend::vxlan::device_name(cfg.backend.vni, false);
    if vtep4.is_some() {
        node::checksum_offload(&mut r, &vtep_name);
        devices.push(&vtep_name);
    }
    node::kernel(&mut r, proc, &cfg, &devices);
    let links = nl.links().await.unwrap_or_default();
    let addrs = nl.addresses(None).await.unwrap_or_default();
    node::cni0(&mut r, links.iter().find(|l| l.name == "cni0"), &addrs, &env);
    node::ip_store(&mut r, ipam_dir, &env, &links);
    node::firewall(&mut r, &cfg, opts);

    // The peers: kernel entries against the leases, then probes.
    let own = env.subnet.map(|s| s.network()).or(env.ipv6_subnet.map(|s| s.network()));
    let mut table = PeerTable::default();
    let _ = table.apply(LeaseEvent::Snapshot(leases), None);
    let Some(config) = cfg.ipv4.clone() else {
        r.ok("peers", "IPv6-only network: per-peer checks cover IPv4 (not probed here)");
        r.conclude();
        return r;
    };
    let Some(fam) = FamilyNet::v4(config, &uplink) else {
        r.conclude();
        return r;
    };
    let mode = match (vxlan, &vtep4) {
        (true, Some(v)) => Mode::Vxlan {
            vtep: v.index,
            uplink: uplink.index,
            direct_on: if cfg.backend.direct_routing { fam.nets.first().copied() } else { None },
        },
        (true, None) => {
            r.conclude();
            return r;
        }
        (false, _) => Mode::HostGw { uplink: uplink.index },
    };
    let refuse = |ip: IpAddr| if vxlan { None } else { HostGw.refuse(&fam, &uplink, ip) };
    let (mut peers, skipped) = table.for_family(&fam, cfg.backend.kind.as_str(), refuse);
    peers.retain(|p| Some(p.subnet) != own);
    for (subnet, why) in skipped.iter().filter(|(s, _)| Some(*s) != own) {
        r.peer_problems.push(PeerProblem {
            subnet: subnet.to_string(),
            public_ip: table.get(subnet).map(|k| k.lease.attrs.public_ip.to_string()).unwrap_or_default(),
            level: Level::Warn,
            problem: "cannot be programmed".into(),
            detail: why.clone(),
            fix: "see the reason; the agent logs it too".into(),
        });
    }
    r.peers = peers.len() + skipped.len();
    let state = Kernel::read(&nl, vtep4.as_ref().map(|v| v.index)).await;
    let targets: Vec<Ipv4Addr> = peers.iter().map(|p| probe_target(&mode, p)).collect();
    let answers = probe::probe(&targets, env.mtu);
    if let Err(e) = &answers {
        r.warn("probes", format!("no raw ICMP socket: {e}"), "run doctor with NET_RAW (the DaemonSet grants it)");
    }
    let port = cfg.backend.port;
    for (i, p) in peers.iter().enumerate() {
        let ip = p.public_ip.to_string();
        let mut push = |problem: &str, detail: String, fix: String| {
            r.peer_problems.push(PeerProblem {
                subnet: p.subnet.to_string(),
                public_ip: ip.clone(),
                level: Level::Fail,
                problem: problem.into(),
                detail,
                fix,
            })
        };
        let wrong = state.mismatches(&mode, p);
        if !wrong.is_empty() {
            push(
                "kernel entries do not match its lease",
                wrong.join("; "),
                "the agent repairs these within seconds: if it is stopped, start it (a stale VtepMAC means the peer was reinstalled while this agent was down)".into(),
            );
            continue;
        }
        let Ok(answers) = &answers else { continue };
        let a = answers[i];
        let t = targets[i];
        if !a.small {
            let (problem, fix) = if matches!(mode, Mode::Vxlan { .. }) && !direct(&mode, p) {
                (
                    "no answer through the VXLAN tunnel",
                    format!("allow UDP {port} between the nodes (both ways); run flanneld doctor on {ip}"),
                )
            } else {
                (
                    "no answer via its address",
                    "the node must be on this L2 network and forward pod traffic; run flanneld doctor there".into(),
                )
            };
            push(problem, format!("ping {t}"), fix);
        } else if !a.full {
            let why =
                if a.full_too_big_here { "this node's route to it is smaller" } else { "the path's MTU is smaller" };
            push(
                &format!("{}-byte packets with DF do not arrive", env.mtu),
                format!("{why}; small ones do (ping {t})"),
                "set Backend.MTU in net-conf.json to the underlay's real MTU (the VTEP gets MTU - 50) and restart the agents, or raise the underlay's MTU".into(),
            );
        }
    }
    let failing: std::collections::HashSet<&str> =
        r.peer_problems.iter().filter(|p| p.level == Level::Fail).map(|p| p.subnet.as_str()).collect();
    r.peers_ok = peers.iter().filter(|p| !failing.contains(p.subnet.to_string().as_str())).count();
    r.conclude();
    r
}

fn direct(mode: &Mode, p: &Peer) -> bool {
    matches!(mode, Mode::Vxlan { direct_on: Some(n), .. } if n.contains(p.public_ip))
}

/// Where a peer answers through our data path: its VTEP's `<subnet>.0` over
/// VXLAN, its cni0 gateway `<subnet>.1` over a plain route.
fn probe_target(mode: &Mode, p: &Peer) -> Ipv4Addr {
    let off = if matches!(mode, Mode::Vxlan { .. }) && !direct(mode, p) { 0 } else { 1 };
    match p.subnet.nth(off) {
        Some(IpAddr::V4(a)) => a,
        _ => Ipv4Addr::UNSPECIFIED,
    }
}

/// The kernel's routes, ARP and FDB entries as the agent programs them.
struct Kernel {
    routes: Vec<Route>,
    neighbours: Vec<(IpAddr, [u8; 6])>,
    fdb: Vec<([u8; 6], IpAddr)>,
}

impl Kernel {
    async fn read(nl: &Netlink, vtep: Option<u32>) -> Kernel {
        let routes = nl.routes(true, Some(RT_TABLE_MAIN)).await.unwrap_or_default();
        let routes = routes.into_iter().filter(|r| r.protocol == RTPROT_FLANNEL).collect();
        let (mut neighbours, mut fdb) = (Vec::new(), Vec::new());
        if let Some(v) = vtep {
            for n in nl.neighbours(v, false).await.unwrap_or_default() {
                if let (Some(ip), Some(mac), true) = (n.ip, n.mac, n.permanent) {
                    neighbours.push((ip, mac));
                }
            }
            for n in nl.neighbours(v, true).await.unwrap_or_default() {
                if let (Some(ip), Some(mac)) = (n.ip, n.mac) {
                    fdb.push((mac, ip));
                }
            }
        }
        Kernel { routes, neighbours, fdb }
    }

    /// What of the peer's desired entries (the reconciler's own) the kernel lacks.
    fn mismatches(&self, mode: &Mode, p: &Peer) -> Vec<String> {
        let want = reconcile::desired(mode, std::slice::from_ref(p));
        let mac = |m: &[u8; 6]| flannel_shared::netlink::format_mac(m);
        let mut out = Vec::new();
        for r in &want.routes {
            if !self.routes.iter().any(|h| reconcile::same_route(h, r)) {
                let have = self.routes.iter().find(|h| h.dst == r.dst);
                out.push(match have {
                    Some(h) => format!("route to {} via {:?} (want via {:?})", r.dst, h.gateway, r.gateway),
                    None => format!("no route to {}", r.dst),
                });
            }
        }
        for (ip, m) in &want.neighbours {
            match self.neighbours.iter().find(|(i, _)| i == ip) {
                Some((_, have)) if have == m => {}
                Some((_, have)) => out.push(format!("ARP {ip} -> {} (its lease says {})", mac(have), mac(m))),
                None => out.push(format!("no ARP entry for {ip}")),
            }
        }
        for (m, dst) in &want.fdb {
            if !self.fdb.iter().any(|(hm, hd)| hm == m && hd == dst) {
                out.push(format!("no FDB entry {} -> {dst}", mac(m)));
            }
        }
        out
    }
}

/// Used by tests: the peers doctor would check and their probe targets.
pub fn targets_for(mode: &Mode, peers: &[Peer]) -> Vec<(IpNet, Ipv4Addr)> {
    peers.iter().map(|p| (p.subnet, probe_target(mode, p))).collect()
}
