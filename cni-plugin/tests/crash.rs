//! The plugin SIGKILLed at random points of ADD and DEL, as runtimes do
//! (deadlines, the OOM killer, node shutdown), each followed by the DEL the
//! CNI spec prescribes: nothing may leak. Seeded; the seed is printed so a
//! failure can be replayed with `FLANNEL_CRASH_SEED=<seed>`.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// xorshift64*: enough randomness for delays, reproducible from the seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn spawn(node: &Node, command: &str, cid: &str, netns: &str, conf: &Value) -> Child {
    let mut cmd: Command = node.ns.command(BIN);
    cmd.env_remove("CNI_ARGS")
        .env_remove("FLANNEL_CNI_BOOT_ID_FILE")
        .env("CNI_COMMAND", command)
        .env("CNI_PATH", "/usr/lib/cni")
        .env("CNI_CONTAINERID", cid)
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0")
        // DEL's veth teardown in-process, so a kill can land in it too.
        .env("FLANNEL_CNI_SYNC_DEL", "1");
    let mut child =
        cmd.stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("spawn plugin");
    use std::io::Write;
    // A kill can land before the plugin read its config; a broken pipe is part of the game.
    let _ = child.stdin.take().expect("stdin").write_all(conf.to_string().as_bytes());
    child
}

/// Runs to the end, or is SIGKILLed after `after`; returns whether it was killed.
fn run_killed_after(mut child: Child, after: Duration) -> bool {
    let start = Instant::now();
    loop {
        if child.try_wait().expect("wait").is_some() {
            return false;
        }
        if start.elapsed() >= after {
            let _ = child.kill();
            let _ = child.wait();
            return true;
        }
        std::thread::sleep(Duration::from_micros(100));
    }
}

/// The two tests run one at a time: each measures how long an ADD takes here
/// to spread its kills over that, which the other's 20 streams would distort.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn masq_chains(node: &Node) -> Vec<String> {
    let out = node.ns.run("iptables-save", &["-t", "nat"]);
    String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.starts_with(":CNI-")).map(String::from).collect()
}

#[test]
fn sigkilled_adds_and_dels_leak_nothing() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let seed = std::env::var("FLANNEL_CRASH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5eed_f1a7_u64);
    println!("seed {seed} (replay with FLANNEL_CRASH_SEED={seed})");
    let mut rng = Rng(seed | 1);
    let node = Node::new("10.244.7.1/24");
    let mut conf = node.conf("1.0.0");
    // Per-pod masquerade chains too, so a kill can land between rules.
    conf["delegate"]["ipMasq"] = Value::Bool(true);
    let pods: Vec<Netns> = (0..24).map(|_| Netns::new("ck")).collect();

    // How long an ADD and a DEL take here: the kills are spread over that. The
    // first ADD also creates cni0 and is several times slower, so it is left
    // out; then the median of three, and, as the run goes, of the ADDs that
    // finished before their kill (the machine's load changes under a test).
    let p0 = pods[0].path().to_string_lossy().into_owned();
    let cycle = |cid: &str| {
        let t = Instant::now();
        assert!(!run_killed_after(spawn(&node, "ADD", cid, &p0, &conf), Duration::from_secs(30)));
        let add = t.elapsed();
        let t = Instant::now();
        assert!(!run_killed_after(spawn(&node, "DEL", cid, &p0, &conf), Duration::from_secs(30)));
        e2e::wait_until(Duration::from_secs(5), || !pods[0].links().iter().any(|l| l == "eth0"));
        (add, t.elapsed())
    };
    cycle("warm-up");
    let mut adds: Vec<Duration> = Vec::new();
    let mut dels: Vec<Duration> = Vec::new();
    for k in 0..3 {
        let (a, d) = cycle(&format!("probe-{k}"));
        adds.push(a);
        dels.push(d);
    }
    node.assert_clean();
    let median = |v: &[Duration]| {
        let mut v = v.to_vec();
        v.sort();
        v[v.len() / 2]
    };
    let del_time = median(&dels);
    println!("ADD {:?}, DEL {del_time:?} (median of three, after a warm-up)", median(&adds));

    let rounds = 150;
    let (mut adds_killed, mut dels_killed) = (0, 0);
    for i in 0..rounds {
        let pod = &pods[i % pods.len()];
        let netns = pod.path().to_string_lossy().into_owned();
        let cid = format!("crash-{i:04}");
        let add_time = median(&adds[adds.len().saturating_sub(9)..]);
        let add_for = Duration::from_micros(rng.below(add_time.as_micros() as u64 * 12 / 10));
        let t = Instant::now();
        let killed = run_killed_after(spawn(&node, "ADD", &cid, &netns, &conf), add_for);
        if !killed {
            adds.push(t.elapsed());
        }
        adds_killed += killed as usize;
        // One DEL in four is killed too, then sent again.
        if rng.below(4) == 0 {
            let del_for = Duration::from_micros(rng.below(del_time.as_micros() as u64 * 12 / 10));
            dels_killed += run_killed_after(spawn(&node, "DEL", &cid, &netns, &conf), del_for) as usize;
        }
        let out = node.cni("DEL", &cid, Some(&netns), "eth0", &conf);
        assert!(out.ok, "round {i} (seed {seed}): DEL after a killed ADD failed: {out:?}");
        // The pod namespace is reused: its interface must be gone before the next ADD.
        e2e::wait_until(Duration::from_secs(5), || !pod.links().iter().any(|l| l == "eth0"));
    }
    println!("{rounds} rounds: {adds_killed} ADDs and {dels_killed} DELs killed mid-way");
    assert!(adds_killed > rounds / 4, "too few kills landed to prove anything ({adds_killed})");

    node.assert_clean();
    assert_eq!(masq_chains(&node), Vec::<String>::new(), "masquerade chains left (seed {seed})");
    let stray: Vec<String> = std::fs::read_dir(node.ipam_dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(stray.is_empty() || stray.iter().all(|n| n.starts_with(".reserve-")), "{stray:?}");
    // cni0 kept its gateway; the whole range is free again: a new pod gets an address.
    let cni0 = node.ns.ip_json(&["addr", "show", "dev", "cni0"]);
    assert!(cni0.to_string().contains("10.244.7.1"), "{cni0}");
    let res = node.cni("ADD", "after", Some(&p0), "eth0", &conf).expect_ok().json();
    assert!(res["ips"][0]["address"].as_str().unwrap().starts_with("10.244.7."), "{res}");
    node.cni("DEL", "after", Some(&p0), "eth0", &conf).expect_ok();
    node.assert_clean();
}

/// The same with 20 streams at once, each its own pods, fighting over the
/// store's lock while kills land: the lock holder may die mid-write too.
#[test]
fn concurrent_killed_streams_leak_nothing() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let seed = std::env::var("FLANNEL_CRASH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0xc0c0_a11e_u64);
    println!("seed {seed} (replay with FLANNEL_CRASH_SEED={seed})");
    let node = Node::new("10.244.8.1/24");
    let mut conf = node.conf("1.0.0");
    conf["delegate"]["ipMasq"] = Value::Bool(true);
    let (streams, rounds) = (20, 8);
    let pods: Vec<Netns> = (0..streams).map(|_| Netns::new("cc")).collect();
    let killed = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for (k, pod) in pods.iter().enumerate() {
            let (node, conf, killed) = (&node, &conf, &killed);
            s.spawn(move || {
                let mut rng = Rng((seed ^ (k as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1);
                let netns = pod.path().to_string_lossy().into_owned();
                for i in 0..rounds {
                    let cid = format!("cc-{k:02}-{i:02}");
                    // Under contention an ADD takes up to most of a second: kill anywhere in that.
                    let add_for = Duration::from_micros(rng.below(800_000));
                    if run_killed_after(spawn(node, "ADD", &cid, &netns, conf), add_for) {
                        killed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    if rng.below(4) == 0 {
                        let del_for = Duration::from_micros(rng.below(200_000));
                        run_killed_after(spawn(node, "DEL", &cid, &netns, conf), del_for);
                    }
                    let out = node.cni("DEL", &cid, Some(&netns), "eth0", conf);
                    assert!(out.ok, "stream {k} round {i} (seed {seed}): {out:?}");
                    e2e::wait_until(Duration::from_secs(5), || !pod.links().iter().any(|l| l == "eth0"));
                }
            });
        }
    });
    println!("{} of {} ADDs killed", killed.into_inner(), streams * rounds);
    node.assert_clean();
    assert_eq!(masq_chains(&node), Vec::<String>::new(), "masquerade chains left (seed {seed})");
}
