//! Benchmark: N sequential ADDs and DELs through the `flannel` plugin and, in
//! the same run and the same node namespace, through Debian's reference
//! `bridge` + `host-local` configured the way upstream flannel delegates.
//! Prints ms per pod for both, the ratios, and peak RSS per invocation.
//!
//! Usage (root): `cargo build --release -p cni-plugin && target/release/cni-bench [N]`

use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const REF_DIR: &str = "/usr/lib/cni";

struct Sample {
    elapsed: Duration,
    max_rss_kb: i64,
}

/// Runs one plugin invocation; returns wall time and the child's peak RSS.
fn invoke(bin: &Path, command: &str, cid: &str, netns: &str, conf: &str) -> Result<Sample, String> {
    let start = Instant::now();
    let mut child = Command::new(bin)
        .env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", cid)
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", REF_DIR)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{}: {e}", bin.display()))?;
    child.stdin.take().expect("stdin").write_all(conf.as_bytes()).map_err(|e| e.to_string())?;
    let mut stdout = String::new();
    let mut stderr = String::new();
    use std::io::Read;
    child.stdout.take().expect("stdout").read_to_string(&mut stdout).map_err(|e| e.to_string())?;
    child.stderr.take().expect("stderr").read_to_string(&mut stderr).map_err(|e| e.to_string())?;
    let mut status = 0;
    // SAFETY: plain wait4 on our own child; rusage is written by the kernel.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = child.id() as libc::pid_t;
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
    let elapsed = start.elapsed();
    if r != pid || !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        return Err(format!("{} {command} {cid} failed: {stdout} {stderr}", bin.display()));
    }
    Ok(Sample { elapsed, max_rss_kb: ru.ru_maxrss })
}

/// veth devices in this (the node's) namespace.
fn veth_count() -> usize {
    Command::new("ip")
        .args(["-o", "link", "show", "type", "veth"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().count())
        .unwrap_or(0)
}

struct Stats {
    median_ms: f64,
    mean_ms: f64,
    max_rss_mb: f64,
}

fn stats(samples: &[Sample]) -> Stats {
    let mut ms: Vec<f64> = samples.iter().map(|s| s.elapsed.as_secs_f64() * 1e3).collect();
    ms.sort_by(|a, b| a.total_cmp(b));
    Stats {
        median_ms: ms[ms.len() / 2],
        mean_ms: ms.iter().sum::<f64>() / ms.len() as f64,
        max_rss_mb: samples.iter().map(|s| s.max_rss_kb).max().unwrap_or(0) as f64 / 1024.0,
    }
}

fn sh(args: &[&str]) {
    let ok = Command::new(args[0]).args(&args[1..]).status().map(|s| s.success()).unwrap_or(false);
    if !ok {
        eprintln!("cni-bench: {} failed", args.join(" "));
    }
}

struct Cleanup {
    netns: Vec<String>,
    dir: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for n in &self.netns {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn run_phase(bin: &Path, command: &str, conf: &str, pods: &[String], tag: &str) -> Result<Vec<Sample>, String> {
    pods.iter()
        .enumerate()
        .map(|(i, p)| invoke(bin, command, &format!("{tag}{i}"), &format!("/var/run/netns/{p}"), conf))
        .collect()
}

fn main() {
    let n: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(100);
    let ours = std::env::current_exe().expect("current exe").with_file_name("flannel");
    if !ours.exists() {
        eprintln!("cni-bench: {} not found; build it first (cargo build --release -p cni-plugin)", ours.display());
        std::process::exit(2);
    }
    let (bridge, host_local) = (Path::new(REF_DIR).join("bridge"), Path::new(REF_DIR).join("host-local"));
    if !bridge.exists() || !host_local.exists() {
        eprintln!("cni-bench: install containernetworking-plugins (need {} and host-local)", bridge.display());
        std::process::exit(2);
    }
    let pid = std::process::id();
    let dir = std::env::temp_dir().join(format!("cni-bench-{pid}"));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let node = format!("cnibn-{pid}");
    let mut cleanup = Cleanup { netns: vec![node.clone()], dir: dir.clone() };
    sh(&["ip", "netns", "add", &node]);
    let mut pods = Vec::new();
    for i in 0..n {
        let p = format!("cnibp-{pid}-{i}");
        sh(&["ip", "netns", "add", &p]);
        cleanup.netns.push(p.clone());
        pods.push(p);
    }
    // Both plugins run inside the node namespace; children inherit it.
    let ns = std::fs::File::open(format!("/var/run/netns/{node}")).expect("open node netns");
    // SAFETY: single-threaded at this point; setns affects only this thread (and children).
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        eprintln!("cni-bench: setns failed (run as root): {}", std::io::Error::last_os_error());
        std::process::exit(2);
    }
    let _ = std::fs::write("/proc/sys/net/ipv4/ip_forward", "1");

    std::fs::write(
        dir.join("subnet.env"),
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
    )
    .expect("subnet.env");
    let ours_conf = serde_json::json!({
        "cniVersion": "0.3.1", "name": "cbr0", "type": "flannel",
        "subnetFile": dir.join("subnet.env"), "dataDir": dir.join("flannel"),
        "ipam": {"dataDir": dir.join("ipam-ours")},
        "delegate": {"hairpinMode": true, "isDefaultGateway": true},
    })
    .to_string();
    // What upstream flannel hands to bridge for the same node (cni-baseline.sh).
    let ref_conf = serde_json::json!({
        "cniVersion": "0.3.1", "name": "cbr-baseline", "type": "bridge", "bridge": "cnib0",
        "isGateway": true, "isDefaultGateway": true, "hairpinMode": true, "ipMasq": false, "mtu": 1450,
        "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.250.1.0/24"}]],
                 "routes": [{"dst": "10.250.0.0/16"}], "dataDir": dir.join("ipam-ref")},
    })
    .to_string();
    if n > 250 {
        eprintln!("cni-bench: at most 250 pods fit a /24");
        std::process::exit(2);
    }

    let run = || -> Result<([Vec<Sample>; 4], Duration), String> {
        // Warm the page cache and create both bridges outside the timed loops.
        invoke(&ours, "ADD", "warm", &format!("/var/run/netns/{}", pods[0]), &ours_conf)?;
        invoke(&ours, "DEL", "warm", &format!("/var/run/netns/{}", pods[0]), &ours_conf)?;
        invoke(&bridge, "ADD", "warm", &format!("/var/run/netns/{}", pods[0]), &ref_conf)?;
        invoke(&bridge, "DEL", "warm", &format!("/var/run/netns/{}", pods[0]), &ref_conf)?;
        let ours_add = run_phase(&ours, "ADD", &ours_conf, &pods, "o")?;
        let del_start = Instant::now();
        let ours_del = run_phase(&ours, "DEL", &ours_conf, &pods, "o")?;
        // DEL returns before the kernel has finished tearing the veths down;
        // measure until the last one is gone too, for the full picture.
        while veth_count() > 0 && del_start.elapsed() < Duration::from_secs(60) {
            std::thread::sleep(Duration::from_millis(1));
        }
        let teardown = del_start.elapsed();
        let ref_add = run_phase(&bridge, "ADD", &ref_conf, &pods, "r")?;
        let ref_del = run_phase(&bridge, "DEL", &ref_conf, &pods, "r")?;
        Ok(([ours_add, ours_del, ref_add, ref_del], teardown))
    };
    let ([oa, od, ra, rd], teardown) = match run() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cni-bench: {e}");
            drop(cleanup);
            std::process::exit(1);
        }
    };
    let (oa, od, ra, rd) = (stats(&oa), stats(&od), stats(&ra), stats(&rd));
    println!("CNI benchmark: {n} sequential ADDs then {n} DELs per plugin, one node namespace");
    println!(
        "{:<26} {:>12} {:>12} {:>12} {:>12} {:>10}",
        "", "ADD median", "ADD mean", "DEL median", "DEL mean", "peak RSS"
    );
    for (name, a, d) in [("flannel (this project)", &oa, &od), ("bridge+host-local (ref)", &ra, &rd)] {
        println!(
            "{:<26} {:>9.2} ms {:>9.2} ms {:>9.2} ms {:>9.2} ms {:>7.1} MB",
            name,
            a.median_ms,
            a.mean_ms,
            d.median_ms,
            d.mean_ms,
            a.max_rss_mb.max(d.max_rss_mb)
        );
    }
    let add_ratio = ra.mean_ms / oa.mean_ms;
    let del_ratio = rd.mean_ms / od.mean_ms;
    println!("speedup (reference / ours, by mean): ADD {add_ratio:.1}x, DEL {del_ratio:.1}x");
    println!(
        "flannel DEL phase until the kernel had removed every veth: {:.2} ms per pod (the reaper works in the background)",
        teardown.as_secs_f64() * 1e3 / n as f64
    );
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    println!("target ADD >= 5x: {}", verdict(add_ratio >= 5.0));
    println!("target DEL >= 5x: {}", verdict(del_ratio >= 5.0));
    println!("target median ADD < 2 ms: {}", verdict(oa.median_ms < 2.0));
    println!("target RSS < 5 MB per invocation: {}", verdict(oa.max_rss_mb.max(od.max_rss_mb) < 5.0));
}
