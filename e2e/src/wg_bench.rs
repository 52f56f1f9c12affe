//! `e2e wg-bench [--seconds 5] [--runs 3]`: pod-to-pod TCP throughput between
//! two nodes of the test-bed, in the same run and between the same pods, over
//! (1) our wireguard backend (the userspace device on this kernel), (2)
//! Debian's wireguard-go carrying the same tunnel (same keys, port, MTU and
//! routes, our agents stopped), (3) our vxlan backend (the kernel's VXLAN,
//! unencrypted: the ceiling). For each: the median Gbit/s of the runs, and
//! CPU seconds per Gbit: the whole machine's (every core, user + system +
//! softirq, from /proc/stat) and the tunnel process's own (flanneld or
//! wireguard-go; 0 for the kernel's VXLAN). Both ends run on this one
//! machine, so every figure includes the sender's, the receiver's and both
//! tunnels' CPU. Nothing here asserts a figure: they are for reading.

use std::time::Duration;

use e2e::cluster::{Cluster, netconf};
use e2e::wireguard::{WireguardGo, public_key, start_node, stream};

const USAGE: &str = "e2e wg-bench [--seconds 5] [--runs 3]";
const PORT: u16 = 7100;

fn parse(args: impl Iterator<Item = String>) -> Result<(u64, usize), String> {
    let (mut secs, mut runs) = (5, 3);
    let mut args = args.peekable();
    while let Some(a) = args.next() {
        let mut val = |name: &str| args.next().ok_or_else(|| format!("{name} needs a value"));
        match a.as_str() {
            "--seconds" => secs = val("--seconds")?.parse().map_err(|e| format!("--seconds: {e}"))?,
            "--runs" => runs = val("--runs")?.parse().map_err(|e| format!("--runs: {e}"))?,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok((secs, runs.max(1)))
}

/// Busy jiffies of the whole machine (everything but idle and iowait).
fn machine_busy() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let cpu: Vec<u64> =
        stat.lines().next().unwrap_or_default().split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
    cpu.iter().enumerate().filter(|(i, _)| *i != 3 && *i != 4).map(|(_, v)| v).sum()
}

/// utime + stime jiffies of a process and its threads.
fn process_cpu(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|x| x.1).unwrap_or_default();
    let f: Vec<u64> = after.split_whitespace().filter_map(|v| v.parse().ok()).collect();
    // Fields 14 and 15 of stat(5), counted after the command name.
    f.get(10).copied().unwrap_or(0) + f.get(11).copied().unwrap_or(0)
}

fn hz() -> f64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
}

#[derive(Clone, Copy)]
struct Run {
    gbit: f64,
    machine_per_gbit: f64,
    process_per_gbit: f64,
}

/// One measured stream pod 0 -> pod 1; `pids` are the tunnel's processes.
fn measure(c: &Cluster, secs: u64, pids: &[u32], port: u16) -> Run {
    let (a, b) = (&c.pods[0], &c.pods[1]);
    let (m0, p0) = (machine_busy(), pids.iter().map(|p| process_cpu(*p)).sum::<u64>());
    let (bytes, took) = stream(&a.ns, &b.ns, b.ip, port, Duration::from_secs(secs));
    let (m1, p1) = (machine_busy(), pids.iter().map(|p| process_cpu(*p)).sum::<u64>());
    let gbits = bytes as f64 * 8.0 / 1e9;
    Run {
        gbit: gbits / took,
        machine_per_gbit: (m1 - m0) as f64 / hz() / gbits,
        process_per_gbit: (p1 - p0) as f64 / hz() / gbits,
    }
}

fn median(mut v: Vec<Run>) -> Run {
    v.sort_by(|a, b| a.gbit.total_cmp(&b.gbit));
    v[v.len() / 2]
}

fn series(c: &Cluster, what: &str, secs: u64, runs: usize, pids: &[u32], port: &mut u16) -> Run {
    // A short warm-up: handshakes done, ARP resolved, TCP windows open.
    stream(&c.pods[0].ns, &c.pods[1].ns, c.pods[1].ip, *port, Duration::from_millis(500));
    *port += 1;
    let mut all = Vec::new();
    for r in 0..runs {
        let run = measure(c, secs, pids, *port);
        *port += 1;
        println!(
            "  {what:<12} run {}: {:6.3} Gbit/s, machine {:.3} CPU-s/Gbit, tunnel process {:.3} CPU-s/Gbit",
            r + 1,
            run.gbit,
            run.machine_per_gbit,
            run.process_per_gbit
        );
        all.push(run);
    }
    median(all)
}

pub fn run(args: impl Iterator<Item = String>) {
    let (secs, runs) = match parse(args) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("e2e wg-bench: {e}\nusage: {USAGE}");
            std::process::exit(2);
        }
    };
    let mut c = Cluster::with_prefix("demo-wgbench", crate::NS_PREFIX);
    c.put_config(&netconf("wireguard"));
    for i in 0..2 {
        c.add_node();
        start_node(&mut c, i);
    }
    for i in 0..2 {
        assert!(c.wait_ready(i, Duration::from_secs(30)), "node{}:\n{}", i + 1, c.nodes[i].log());
    }
    c.add_pod(0);
    c.add_pod(1);
    let reach = |c: &Cluster| {
        e2e::wait_until(Duration::from_secs(15), || c.pods[0].ns.ping(&c.pods[1].ip.to_string()).is_some())
    };
    assert!(reach(&c), "pods cannot reach each other over wireguard");
    let mut port = PORT;

    println!("pod {} (node1) -> pod {} (node2), {secs} s per run, {runs} runs each", c.pods[0].ip, c.pods[1].ip);
    let pids: Vec<u32> = c.nodes.iter().filter_map(|n| n.agent_pid()).collect();
    let ours = series(&c, "ours", secs, runs, &pids, &mut port);

    // The same tunnel by wireguard-go: the agents stop (SIGTERM removes their devices),
    // each node's key, port, address, MTU and route go to a wireguard-go device.
    let subnets: Vec<String> = c.nodes.iter().map(|n| n.subnet().expect("subnet")).collect();
    for i in 0..2 {
        c.stop_agent(i);
    }
    let refs: Vec<WireguardGo> = (0..2)
        .map(|i| {
            let n = &c.nodes[i];
            let w = WireguardGo::start(n.ns.name(), &format!("wgb{}x{}", i + 1, std::process::id() % 100_000));
            let addr = subnets[i].split('/').next().unwrap().to_string();
            w.configure(&n.dir.join("wgkey"), &addr, "10.244.0.0/16");
            w
        })
        .collect();
    for (i, w) in refs.iter().enumerate() {
        let j = 1 - i;
        let key = std::fs::read_to_string(c.nodes[j].dir.join("wgkey")).expect("key file");
        w.add_peer(&public_key(&key), &format!("{}:51820", c.nodes[j].ip), &subnets[j]);
    }
    assert!(reach(&c), "pods cannot reach each other over wireguard-go");
    let pids: Vec<u32> = refs.iter().map(WireguardGo::pid).collect();
    let wgo = series(&c, "wireguard-go", secs, runs, &pids, &mut port);
    drop(refs);

    // vxlan on the same nodes and pods.
    c.put_config(&netconf("vxlan"));
    for i in 0..2 {
        c.start_agent(i, &[]);
    }
    for i in 0..2 {
        assert!(c.wait_ready(i, Duration::from_secs(30)), "node{}:\n{}", i + 1, c.nodes[i].log());
    }
    assert!(reach(&c), "pods cannot reach each other over vxlan");
    let pids: Vec<u32> = c.nodes.iter().filter_map(|n| n.agent_pid()).collect();
    let vx = series(&c, "vxlan", secs, runs, &pids, &mut port);

    println!("\nmedian of {runs} runs:");
    println!("  {:<28} {:>8}  {:>22}  {:>22}", "", "Gbit/s", "machine CPU-s per Gbit", "tunnel CPU-s per Gbit");
    for (what, r) in [("ours (userspace wireguard)", ours), ("wireguard-go", wgo), ("vxlan (kernel, clear)", vx)] {
        println!("  {what:<28} {:>8.3}  {:>22.3}  {:>22.3}", r.gbit, r.machine_per_gbit, r.process_per_gbit);
    }
    println!(
        "ours / wireguard-go: {:.2}x the throughput, {:.2}x the machine CPU per Gbit",
        ours.gbit / wgo.gbit,
        ours.machine_per_gbit / wgo.machine_per_gbit
    );
}
