//! `e2e scale [--kube]`: how fast one agent programs many peers. Writes N simulated
//! vxlan leases into a real etcd (with `--kube`, also in the same run: N annotated
//! Nodes with a realistic status served by the e2e stand-in API server), starts
//! one flanneld, and times until the
//! kernel holds every route, ARP and FDB entry; then reports peak RSS, CPU
//! seconds, and idle CPU afterwards. The reference, measured in the same run,
//! is `ip -batch` writing the same entries into a fresh namespace (the
//! kernel's own floor, with no lease store involved).

use std::io::Write;
use std::process::Stdio;
use std::time::{Duration, Instant};

use e2e::Netns;
use e2e::cluster::{Cluster, PREFIX};
use e2e::kube_api::{self, FakeApi};

fn peer(i: usize) -> (String, String, String) {
    let n = i + 1;
    let subnet = format!("10.{}.{}.0", n / 256, n % 256);
    let public = format!("198.18.{}.{}", n / 256, n % 256);
    let mac = format!("0e:00:00:00:{:02x}:{:02x}", n / 256, n % 256);
    (subnet, public, mac)
}

fn write_leases(c: &Cluster, n: usize) {
    // etcd's default --max-txn-ops is 128.
    for chunk in (0..n).collect::<Vec<_>>().chunks(128) {
        let mut body = String::from("\n");
        for &i in chunk {
            let (subnet, public, mac) = peer(i);
            body.push_str(&format!(
                "put {PREFIX}/subnets/{subnet}-24 {{\"PublicIP\":\"{public}\",\"BackendType\":\"vxlan\",\"BackendData\":{{\"VNI\":1,\"VtepMAC\":\"{mac}\"}}}}\n"
            ));
        }
        body.push_str("\n\n");
        let mut child = c
            .underlay
            .command("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", e2e::cluster::ETCD_URL, "txn"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("etcdctl txn");
        child.stdin.take().expect("stdin").write_all(body.as_bytes()).expect("write txn");
        assert!(child.wait().expect("etcdctl").success(), "etcdctl txn failed");
    }
}

fn count(ns: &Netns, args: &[&str]) -> usize {
    ns.ip(args).lines().count()
}

fn proc_stat(pid: u32) -> (f64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit_once(") ").map(|x| x.1).unwrap_or_default().split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let cpu = (ticks(11) + ticks(12)) as f64 / hz;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let hwm_kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    (cpu, hwm_kb)
}

/// Current resident memory split into (anonymous, file-backed) KB: the
/// file-backed part is mostly the agent's own code pages.
fn rss_split(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    (kb("RssAnon:"), kb("RssFile:"))
}

/// The same entries through `ip -batch`: one process, one netlink request per entry.
fn reference(n: usize) -> Duration {
    let ns = Netns::new("ref");
    ns.ip(&["link", "add", "eth0", "type", "veth", "peer", "name", "eth1"]);
    ns.ip(&["addr", "add", "192.0.2.1/24", "dev", "eth0"]);
    ns.ip(&["link", "set", "eth0", "up"]);
    ns.ip(&[
        "link",
        "add",
        "flannel.1",
        "type",
        "vxlan",
        "id",
        "1",
        "local",
        "192.0.2.1",
        "dev",
        "eth0",
        "dstport",
        "8472",
        "nolearning",
    ]);
    ns.ip(&["link", "set", "flannel.1", "up"]);
    let mut ip_cmds = String::new();
    let mut fdb_cmds = String::new();
    for i in 0..n {
        let (subnet, public, mac) = peer(i);
        ip_cmds.push_str(&format!("neigh replace {subnet} lladdr {mac} dev flannel.1 nud permanent\n"));
        ip_cmds.push_str(&format!("route replace {subnet}/24 via {subnet} dev flannel.1 onlink\n"));
        fdb_cmds.push_str(&format!("fdb replace {mac} dev flannel.1 dst {public} self permanent\n"));
    }
    let run = |prog: &str, input: &str| {
        let mut child = ns.command(prog).args(["-batch", "-"]).stdin(Stdio::piped()).spawn().expect(prog);
        child.stdin.take().expect("stdin").write_all(input.as_bytes()).expect("batch");
        assert!(child.wait().expect(prog).success(), "{prog} -batch failed");
    };
    let t = Instant::now();
    run("ip", &ip_cmds);
    run("bridge", &fdb_cmds);
    t.elapsed()
}

const NETCONF: &str = r#"{"Network":"10.0.0.0/8","SubnetLen":24,"Backend":{"Type":"vxlan"}}"#;

/// `n` peer Nodes (annotated by their agents, realistic status) and our own, unannotated.
fn fake_api(n: usize) -> FakeApi {
    let api = FakeApi::default();
    api.0.0.lock().expect("fake API state").status = Some(kube_api::realistic_status());
    api.put_node("self", "10.255.0.0/24", serde_json::json!({}));
    for i in 0..n {
        let (subnet, public, mac) = peer(i);
        api.put_node(&format!("peer-{i:05}"), &format!("{subnet}/24"), kube_api::vxlan_annotations(&public, &mac));
    }
    api
}

fn one(n: usize, idle: u64, kube: bool) {
    println!("\n== {n} peers from {}", if kube { "the Kubernetes API (Nodes)" } else { "etcd (leases)" });
    let mut c = Cluster::with_prefix("demo-scale", crate::NS_PREFIX);
    let api = kube.then(|| fake_api(n));
    if !kube {
        c.put_config(NETCONF);
        write_leases(&c, n);
    }
    c.add_node();
    let started;
    if let Some(api) = &api {
        api.serve(c.nodes[0].ns.tcp_listen(kube_api::ADDR.parse().expect("addr")).expect("listen"));
        let netconf = c.dir().join("net-conf.json");
        std::fs::write(&netconf, NETCONF).expect("net-conf.json");
        let kubeconfig = kube_api::kubeconfig(c.dir());
        started = Instant::now();
        c.start_agent_env(
            0,
            &[
                "--iptables-resync=5",
                "-v=0",
                "--kube-subnet-mgr",
                &format!("--kubeconfig-file={}", kubeconfig.display()),
                &format!("--net-config-path={}", netconf.display()),
            ],
            &[("NODE_NAME", "self")],
        );
    } else {
        started = Instant::now();
        c.start_agent(0, &["--iptables-resync=5", "-v=0"]);
    }
    let node = &c.nodes[0];
    let fdb_count = |ns: &Netns| {
        e2e::cluster::run_in(ns, "bridge", &["fdb", "show", "dev", "flannel.1"])
            .lines()
            .filter(|l| l.contains(" dst "))
            .count()
    };
    // Routes go in last (after the ARP and FDB entries they use), so they are polled first.
    let converged = loop {
        if node.ns.links().iter().any(|l| l == "flannel.1")
            && count(&node.ns, &["route", "show", "proto", "76"]) >= n
            && count(&node.ns, &["neigh", "show", "dev", "flannel.1"]) >= n
            && fdb_count(&node.ns) >= n
        {
            break started.elapsed();
        }
        assert!(started.elapsed() < Duration::from_secs(120), "not converged: {}", node.log());
        std::thread::sleep(Duration::from_millis(25));
    };
    let neigh = count(&node.ns, &["neigh", "show", "dev", "flannel.1"]);
    let fdb = fdb_count(&node.ns);
    let pid = node.agent_pid().expect("agent pid");
    let (cpu, hwm) = proc_stat(pid);
    println!(
        "agent start -> all {n} routes in the kernel: {:.3} s (neighbours {neigh}, fdb {fdb})",
        converged.as_secs_f64()
    );
    let (anon, file) = rss_split(pid);
    println!(
        "agent CPU so far: {cpu:.2} s; peak RSS {:.1} MB (now {:.1} MB anonymous + {:.1} MB file-backed)",
        hwm as f64 / 1024.0,
        anon as f64 / 1024.0,
        file as f64 / 1024.0
    );
    // Our own writes come back as kernel notifications and wake one more pass,
    // over the converged state: its duration is the cost of a pass that changes nothing.
    std::thread::sleep(Duration::from_secs(3));
    let passes_before = node.metric("flannel_reconcile_runs_total").unwrap_or(0.0);
    let last_pass = node.metric("flannel_reconcile_last_duration_seconds").unwrap_or(0.0);
    println!("steady-state reconcile pass (no changes, {n} peers): {:.1} ms", last_pass * 1e3);
    if idle > 0 {
        std::thread::sleep(Duration::from_secs(idle));
        let (cpu2, _) = proc_stat(pid);
        let passes = node.metric("flannel_reconcile_runs_total").unwrap_or(0.0) - passes_before;
        // The periodic safety-net pass (--reconcile-interval, 60 s) may fall inside the window.
        println!(
            "idle {idle} s: {:.2} CPU s ({:.2}% of one core), {passes} reconcile passes",
            cpu2 - cpu,
            (cpu2 - cpu) / idle as f64 * 100.0
        );
    }
    let r = reference(n);
    println!(
        "reference `ip -batch` + `bridge -batch` of the same {} entries: {:.3} s; ratio agent/reference {:.2}",
        3 * n,
        r.as_secs_f64(),
        converged.as_secs_f64() / r.as_secs_f64()
    );
    assert!(neigh >= n && fdb >= n, "not every ARP/FDB entry programmed");
}

pub fn run(args: impl Iterator<Item = String>) {
    let mut peers = vec![1000, 5000];
    let mut idle = 60;
    let mut kube = false;
    let mut it = args.peekable();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--peers" => {
                peers = it.next().unwrap_or_default().split(',').filter_map(|p| p.parse().ok()).collect();
            }
            "--idle" => idle = it.next().and_then(|v| v.parse().ok()).unwrap_or(60),
            "--kube" => kube = true,
            other => {
                eprintln!("e2e scale: unknown argument {other} (use --peers 1000,5000 --idle 60 [--kube])");
                std::process::exit(2);
            }
        }
    }
    for n in peers {
        one(n, idle, false);
        // With --kube the same peers also come as Nodes, in the same run.
        if kube {
            one(n, idle, true);
        }
    }
}
