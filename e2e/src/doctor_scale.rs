//! `e2e doctor-scale [--peers 5000] [--runs 3]`: how long `flanneld doctor`
//! takes on a node whose agent has converged on N fake vxlan peers, leased
//! in a real etcd the way `e2e scale` leases them (public IPs in
//! 198.18.0.0/15 that nothing holds). No peer answers, the worst case: every
//! probe target waits out both its attempts. Prints each run's wall time, the
//! table of the last run (its peer list cut to 20 lines) and the JSON's counts.
//!
//! Every namespace and process goes with the run, also on a panic (the panic
//! hook of `main` removes the `demo-` namespaces and what runs in them).
//! Nothing here asserts a time: the figures are for reading.

use std::process::Stdio;
use std::time::{Duration, Instant};

use e2e::cluster::{Cluster, HEALTHZ_PORT, PREFIX, bin_path};
use serde_json::Value;

const NETCONF: &str = r#"{"Network":"10.0.0.0/8","SubnetLen":24,"Backend":{"Type":"vxlan"}}"#;
const USAGE: &str = "e2e doctor-scale [--peers 5000] [--runs 3]";

/// The `i`-th fake peer: subnet, public IP, VTEP MAC (`e2e scale`'s layout).
fn peer(i: usize) -> (String, String, String) {
    let n = i + 1;
    (
        format!("10.{}.{}.0", n / 256, n % 256),
        format!("198.18.{}.{}", n / 256, n % 256),
        format!("0e:00:00:00:{:02x}:{:02x}", n / 256, n % 256),
    )
}

/// Puts the `n` leases with `etcdctl txn`, 128 at a time (etcd's default --max-txn-ops).
fn write_leases(c: &Cluster, n: usize) {
    let puts: Vec<(String, String)> = (0..n)
        .map(|i| {
            let (subnet, public, mac) = peer(i);
            (
                format!("{PREFIX}/subnets/{subnet}-24"),
                format!(
                    r#"{{"PublicIP":"{public}","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{mac}"}}}}"#
                ),
            )
        })
        .collect();
    e2e::cluster::etcd_puts(&c.underlay, &puts).unwrap_or_else(|e| panic!("{e}"));
}

fn parse(mut args: impl Iterator<Item = String>) -> Result<(usize, usize), String> {
    let (mut peers, mut runs) = (5000, 3);
    while let Some(a) = args.next() {
        let mut num = |what: &str| -> Result<usize, String> {
            args.next().and_then(|v| v.parse().ok()).ok_or_else(|| format!("{what} needs a number"))
        };
        match a.as_str() {
            "--peers" => peers = num("--peers")?,
            "--runs" => runs = num("--runs")?.max(1),
            "--help" | "-h" => {
                println!("usage: {USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if !(1..=60_000).contains(&peers) {
        return Err("--peers: between 1 and 60000".into());
    }
    Ok((peers, runs))
}

pub fn run(args: impl Iterator<Item = String>) {
    let (n, runs) = match parse(args) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("e2e doctor-scale: {e}\nusage: {USAGE}");
            std::process::exit(2);
        }
    };
    let mut c = Cluster::with_prefix("demo-dscale", crate::NS_PREFIX);
    c.put_config(NETCONF);
    write_leases(&c, n);
    let i = c.add_node();
    let started = Instant::now();
    c.start_agent(i, &["-v=0"]);
    assert!(c.wait_ready(i, Duration::from_secs(60)), "agent not ready:\n{}", c.nodes[i].log());
    let converged = e2e::wait_until(Duration::from_secs(120), || c.nodes[i].flannel_routes().len() >= n);
    assert!(converged, "agent never held {n} routes:\n{}", c.nodes[i].log());
    println!("agent converged on {n} fake peers (none answers) in {:.2} s", started.elapsed().as_secs_f64());

    let node = &c.nodes[i];
    let doctor = |json: bool| {
        let mut cmd = node.ns.command(bin_path("flanneld").to_str().expect("utf-8 path"));
        cmd.arg("doctor")
            .arg(format!("--etcd-endpoints={}", c.endpoint()))
            .arg(format!("--subnet-file={}", node.subnet_file().display()))
            .arg(format!("--healthz-port={HEALTHZ_PORT}"))
            .arg("--ip-masq")
            .arg(format!("--ipam-dir={}", node.dir.join("ipam/cbr0").display()))
            .stdin(Stdio::null());
        if json {
            cmd.arg("--json");
        }
        let t = Instant::now();
        let out = cmd.output().expect("run flanneld doctor");
        (t.elapsed(), out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let mut times = Vec::new();
    let mut last = String::new();
    for k in 0..runs {
        let (took, code, text) = doctor(false);
        println!(
            "doctor run {}: {:.2} s wall, exit {code}, {} lines of output",
            k + 1,
            took.as_secs_f64(),
            text.lines().count()
        );
        times.push(took);
        last = text;
    }
    println!("the last run's output:");
    for l in last.lines() {
        println!("  {l}");
    }
    let (took, code, text) = doctor(true);
    let r: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("doctor --json: {e}: {text}"));
    println!(
        "doctor --json: {:.2} s wall, exit {code}: peers {}, reachable {}, peer problems {}",
        took.as_secs_f64(),
        r["peers"],
        r["peers_ok"],
        r["peer_problems"].as_array().map_or(0, Vec::len)
    );
    times.sort();
    let secs: Vec<String> = times.iter().map(|t| format!("{:.2}", t.as_secs_f64())).collect();
    let median = times[times.len() / 2].as_secs_f64();
    // The probes wait by design (paced sending, two attempts per silent target); the
    // rest is listing the leases, reading the node and comparing the kernel's entries.
    let probing = r["probe_seconds"].as_f64().unwrap_or(0.0);
    println!(
        "doctor against {n} silent peers: {} s over {runs} run(s) (median {median:.2} s); in the --json run \
         probing took {probing:.2} s of {:.2} s, everything else {:.2} s",
        secs.join(", "),
        took.as_secs_f64(),
        took.as_secs_f64() - probing
    );
}
