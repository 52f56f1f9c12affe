//! `e2e demo [--backend vxlan|host-gw] [--nodes N] [--keep]`: builds a cluster
//! of namespace nodes on an underlay bridge with a real etcd, runs the real
//! `flanneld` on each, starts pods through the real `flannel` plugin, and
//! shows what an operator would look at (seeds 002/003): leases and
//! subnet.env, the route table, a cross-node ping with its ttl, tcpdump on the
//! uplink, and a Service answered by a pod on another node.
//!
//! `e2e down` removes what `--keep` (or an interrupted run) left behind.
//! `e2e doctor-scale` times `flanneld doctor` against thousands of peers.

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use e2e::cluster::{Cluster, PREFIX, capture, request};
use e2e::kubeproxy::{self, Service};

mod compare;
mod cri_bench;
mod doctor_scale;
mod scale;
mod wg_bench;

/// Every demo namespace starts with this, so `down` can find them.
pub(crate) const NS_PREFIX: &str = "demo-";

fn step(msg: &str) {
    println!("\n\x1b[1m==> {msg}\x1b[0m");
}

fn show(title: &str, text: &str) {
    println!("$ {title}");
    for l in text.lines() {
        println!("  {l}");
    }
}

struct Args {
    backend: String,
    nodes: usize,
    keep: bool,
}

fn parse_args(mut it: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut a = Args { backend: "vxlan".into(), nodes: 3, keep: false };
    while let Some(arg) = it.next() {
        let (k, inline) = match arg.split_once('=') {
            Some((k, v)) => (k.to_string(), Some(v.to_string())),
            None => (arg.clone(), None),
        };
        let mut val = |name: &str| inline.clone().or_else(|| it.next()).ok_or(format!("{name} needs a value"));
        match k.as_str() {
            "--backend" => a.backend = val("--backend")?,
            "--nodes" => a.nodes = val("--nodes")?.parse().map_err(|e| format!("--nodes: {e}"))?,
            "--keep" => a.keep = true,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if !["vxlan", "host-gw", "wireguard"].contains(&a.backend.as_str()) {
        return Err(format!("--backend {}: must be vxlan, host-gw or wireguard", a.backend));
    }
    if !(2..=20).contains(&a.nodes) {
        return Err("--nodes: between 2 and 20".into());
    }
    Ok(a)
}

fn demo(args: Args) {
    let vxlan = args.backend == "vxlan";
    let wireguard = args.backend == "wireguard";
    step(&format!(
        "underlay bridge 192.0.2.0/24 with etcd on 192.0.2.254 ({} nodes, backend {})",
        args.nodes, args.backend
    ));
    let mut c = Cluster::with_prefix("demo", NS_PREFIX);
    let netconf = format!(r#"{{"Network":"10.244.0.0/16","Backend":{{"Type":"{}"}}}}"#, args.backend);
    c.put_config(&netconf);
    show(&format!("etcdctl put {PREFIX}/config"), &netconf);

    step("flanneld on every node");
    for i in 0..args.nodes {
        c.add_node();
        if wireguard {
            // Each node its own key file and `wg show` socket (the demo's nodes share a filesystem).
            e2e::wireguard::start_node(&mut c, i);
        } else {
            c.start_agent(i, &[]);
        }
    }
    for i in 0..args.nodes {
        if !c.wait_ready(i, Duration::from_secs(30)) {
            eprintln!("node{} did not become ready:\n{}", i + 1, c.nodes[i].log());
            std::process::exit(1);
        }
        println!("  node{} ({}) ready", i + 1, c.nodes[i].ip);
    }
    show(
        &format!("etcdctl get --prefix {PREFIX}/subnets/"),
        &c.etcdctl(&["get", "--prefix", &format!("{PREFIX}/subnets/")]),
    );
    for n in &c.nodes {
        show(&format!("cat /run/flannel/subnet.env   # node {}", n.ip), &n.subnet_env().unwrap_or_default());
    }

    step("two pods per node through the flannel CNI plugin (upstream conflist)");
    for i in 0..args.nodes {
        for _ in 0..2 {
            let p = c.add_pod(i);
            println!("  node{} pod {} -> {}", i + 1, p.cid, p.ip);
        }
    }

    step(
        "every node's route table (seed 003's `route -n`): cni0 for its own pods, flanneld's proto 76 routes to the others",
    );
    for n in &c.nodes {
        show(&format!("ip route   # node {}", n.ip), &n.ns.ip(&["route"]));
    }
    step("node1's data path to its peers");
    if vxlan {
        show("ip -d link show flannel.1", &c.nodes[0].ns.ip(&["-d", "link", "show", "flannel.1"]));
        show("ip neigh show dev flannel.1", &c.nodes[0].ns.ip(&["neigh", "show", "dev", "flannel.1"]));
        show(
            "bridge fdb show dev flannel.1",
            &e2e::cluster::run_in(&c.nodes[0].ns, "bridge", &["fdb", "show", "dev", "flannel.1"]),
        );
    }
    if wireguard {
        show("ip -d link show flannel-wg", &c.nodes[0].ns.ip(&["-d", "link", "show", "flannel-wg"]));
        // What `wg show flannel-wg` reads (the private key left out).
        let uapi = e2e::wireguard::uapi(&c.nodes[0], "flannel-wg").unwrap_or_default();
        let shown: Vec<&str> = uapi.lines().filter(|l| !l.starts_with("private_key=")).collect();
        show("wg show flannel-wg   # its userspace API: peers, endpoints, allowed IPs", &shown.join("\n"));
    }

    let (a, b) = (0, 2); // first pod on node1, first pod on node2
    let dst = c.pods[b].ip.to_string();
    step(&format!("ping from a pod on node1 ({}) to a pod on node2 ({dst}), tcpdump on node1's eth0", c.pods[a].ip));
    let filter = match args.backend.as_str() {
        "vxlan" => "udp port 8472",
        "wireguard" => "udp port 51820",
        _ => "icmp",
    };
    let mut ping = String::new();
    let dump = capture(&c.nodes[0].ns, "eth0", filter, 4, Duration::from_secs(5), || {
        ping = String::from_utf8_lossy(&c.pods[a].ns.run("ping", &["-c", "3", "-i", "0.3", &dst]).stdout).into_owned();
    });
    show(&format!("ping -c 3 {dst}"), &ping);
    show(&format!("tcpdump -nn -i eth0 {filter}"), &dump);
    if vxlan {
        println!("  (ICMP between pods inside VXLAN, UDP 8472, VNI 1: the overlay)");
    } else if wireguard {
        println!("  (only WireGuard's encrypted UDP 51820 on the wire: no pod address in clear)");
    } else {
        println!("  (plain pod-to-pod ICMP on the wire: host-gw routes via the peer node)");
    }

    step("a Service: ClusterIP 10.96.0.10:80 with endpoints on the other nodes, kube-proxy's iptables chains");
    let endpoints: Vec<(Ipv4Addr, u16)> = c.pods.iter().filter(|p| p.node != 0).map(|p| (p.ip, 8080)).collect();
    for p in c.pods.iter().filter(|p| p.node != 0) {
        p.serve(8080);
    }
    let svc = Service::web(endpoints);
    for n in &c.nodes {
        kubeproxy::install(&n.ns, std::slice::from_ref(&svc), "10.244.0.0/16");
    }
    let nat = e2e::cluster::run_in(&c.nodes[0].ns, "iptables-save", &["-t", "nat"]);
    show(
        "iptables-save -t nat | grep -E 'KUBE-(SVC|SEP)'   # node1",
        &nat.lines()
            .filter(|l| l.starts_with("-A KUBE-SVC") || l.starts_with("-A KUBE-SEP"))
            .collect::<Vec<_>>()
            .join("\n"),
    );
    let vip: SocketAddr = (svc.cluster_ip, svc.port).into();
    for _ in 0..4 {
        match request(&c.pods[a].ns, vip) {
            Ok(line) => println!("  pod {} -> {vip}: answered by \"{line}\"", c.pods[a].ip),
            Err(e) => println!("  pod {} -> {vip}: FAILED {e}", c.pods[a].ip),
        }
    }

    if args.keep {
        step("left running (--keep); remove with: e2e down");
        c.leak();
    } else {
        step("tearing down");
        drop(c);
        println!("  done");
    }
}

/// Removes every demo namespace (killing what runs in it) and the demo's files.
fn down() {
    let list = Command::new("ip").args(["netns", "list"]).output().expect("ip netns list");
    let mut n = 0;
    for line in String::from_utf8_lossy(&list.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        if !name.starts_with(NS_PREFIX) {
            continue;
        }
        if let Ok(out) = Command::new("ip").args(["netns", "pids", name]).output() {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
                // SAFETY: kill(2) on processes living in the demo's namespaces.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        let _ = Command::new("ip").args(["netns", "del", name]).status();
        n += 1;
    }
    if let Ok(dir) = std::fs::read_dir(std::env::temp_dir()) {
        for e in dir.flatten() {
            if e.file_name().to_string_lossy().starts_with("flt-demo-") {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    println!("removed {n} demo namespaces");
}

/// Runs the demo on a worker thread; SIGINT/SIGTERM on the main thread tear everything down.
fn run_with_cleanup(args: Args) {
    // SAFETY: plain libc signal-mask calls on a set we own, before any other thread exists.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGINT, libc::SIGTERM, libc::SIGUSR1] {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        let worker = std::thread::spawn(move || {
            let ok = std::panic::catch_unwind(|| demo(args)).is_ok();
            libc::kill(libc::getpid(), libc::SIGUSR1);
            ok
        });
        let mut sig = 0;
        libc::sigwait(&set, &mut sig);
        if sig == libc::SIGUSR1 {
            let ok = worker.join().unwrap_or(false);
            std::process::exit(if ok { 0 } else { 1 });
        }
        eprintln!("\ninterrupted: cleaning up");
        down();
        std::process::exit(130);
    }
}

fn main() {
    // Release builds abort on panic, so no destructor would clean up: do it here.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        eprintln!("e2e: failed; removing the demo's namespaces and processes");
        down();
    }));
    let mut args = std::env::args().skip(1);
    match args.next().as_deref() {
        Some("demo") => match parse_args(args) {
            Ok(a) => run_with_cleanup(a),
            Err(e) => {
                eprintln!("e2e demo: {e}");
                std::process::exit(2);
            }
        },
        Some("down") => down(),
        Some("scale") => scale::run(args),
        Some("doctor-scale") => doctor_scale::run(args),
        Some("cri-bench") => cri_bench::run(args),
        Some("wg-bench") => wg_bench::run(args),
        Some("compare-upstream") => compare::run(args),
        _ => {
            eprintln!(
                "usage: e2e demo [--backend vxlan|host-gw|wireguard] [--nodes N] [--keep]\n       e2e down\n       e2e scale [--peers 1000,5000] [--idle 60] [--kube] [--churn 20 --duration 40] (more: e2e scale --help)\n       e2e doctor-scale [--peers 5000] [--runs 3]\n       e2e cri-bench [--sequential 50] [--concurrent 20]\n       e2e wg-bench [--seconds 5] [--runs 3]\n       e2e compare-upstream --upstream-dir DIR [--case NAME,...] [--readme README.md]"
            );
            std::process::exit(2);
        }
    }
}
