//! `flanneld doctor`: why pods on this node cannot reach pods elsewhere, and
//! what to do. It reads the node's configuration the way the agent does (the
//! same flags and environment, subnet.env, the network config from etcd or
//! the file), inspects the agent, the kernel and the firewall, compares every
//! peer's route, ARP and FDB entries with its lease, and probes every peer
//! through the data path. It changes nothing on the node: reads and ICMP
//! echoes only.

mod node;
mod peer;
mod probe;
pub mod report;
mod wireguard;

use std::path::Path;
use std::time::Duration;

use clap::Parser;
use flannel_shared::netconf::NetConfig;
use flannel_shared::netlink::Netlink;
use tokio::sync::mpsc;

use crate::backend;
use crate::config::Opts;
use crate::metrics::Metrics;
use crate::subnet::{LeaseEvent, SubnetManager};
use report::Report;

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
    /// List every peer with a problem in the table (without it, the first 20; the verdict counts all).
    #[arg(long)]
    pub all_peers: bool,
    /// The plugin's IP store of this network (the conflist's `ipam.dataDir`/<name>).
    #[arg(long, default_value = "/var/lib/cni/networks/cbr0")]
    pub ipam_dir: std::path::PathBuf,
}

/// Peers with problems the table lists unless `--all-peers`.
const PEER_LINES: usize = 20;

/// Runs every check and prints the report; returns the exit code.
pub async fn run(args: DoctorArgs) -> u8 {
    let report = diagnose(&args.opts, &args.ipam_dir, Path::new("/proc")).await;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report).unwrap_or_default());
    } else {
        // SAFETY: isatty only inspects the descriptor.
        let colour = unsafe { libc::isatty(1) } == 1;
        print!("{}", report.render(colour, if args.all_peers { usize::MAX } else { PEER_LINES }));
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
    match NetConfig::parse(&text, |_| {}).and_then(|c| crate::backend::check(&c.backend, &mut |_| {}).map(|()| c)) {
        Ok(cfg) => {
            let net = cfg.ipv4.as_ref().or(cfg.ipv6.as_ref()).map(|f| f.network.to_string()).unwrap_or_default();
            r.ok("network config", format!("backend {}, Network {net}", cfg.backend.kind));
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
    let vxlan = cfg.backend.kind == <crate::backend::vxlan::Vxlan as crate::backend::Backend>::TYPE;
    // Each family's VXLAN device; the checksum offload bug is one of VXLAN over IPv4.
    let mut vteps = [None, None];
    for (v6, on) in [(false, cfg.ipv4.is_some()), (true, cfg.ipv6.is_some())] {
        if vxlan && on {
            vteps[usize::from(v6)] = node::vtep(&mut r, &nl, &cfg, &uplink, v6).await;
        }
    }
    let wg = if cfg.backend.kind == <crate::backend::wireguard::WireGuard as crate::backend::Backend>::TYPE {
        wireguard::devices(&mut r, &nl, &cfg, &uplink).await
    } else {
        [None, None]
    };
    let mut devices = vec![uplink.name.as_str(), "cni0"];
    if let Some(v) = &vteps[0] {
        node::checksum_offload(&mut r, &v.name);
        devices.push(&v.name);
    }
    for d in wg.iter().flatten() {
        if !devices.contains(&d.name) {
            devices.push(d.name);
        }
    }
    node::kernel(&mut r, proc, &cfg, &devices);
    let links = nl.links().await.unwrap_or_default();
    let addrs = nl.addresses(None).await.unwrap_or_default();
    node::cni0(&mut r, links.iter().find(|l| l.name == "cni0"), &addrs, &env);
    node::ip_store(&mut r, ipam_dir, &env, &links);
    node::firewall(&mut r, &cfg, opts);

    let devs =
        peer::Devices { vteps: [vteps[0].as_ref(), vteps[1].as_ref()], wireguard: [wg[0].as_ref(), wg[1].as_ref()] };
    peer::check(&mut r, &nl, &cfg, &uplink, &env, devs, leases).await;
    r.conclude();
    r
}
