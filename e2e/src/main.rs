//! `e2e demo`: builds a node out of network namespaces, starts pods through the
//! real `flannel` CNI plugin with the upstream conflist, and shows what an
//! operator would look at: the node's subnet.env, the pods' routes, a ping.
//!
//! Today the demo is one node; the multi-node cluster (flanneld on each node,
//! etcd on the underlay, cross-node traffic) arrives with the agent.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use e2e::{Netns, TempDir};

fn step(msg: &str) {
    println!("\n==> {msg}");
}

fn show(ns: &Netns, args: &[&str]) {
    println!("$ ip -n {} {}", ns.name(), args.join(" "));
    print!("{}", ns.ip(args));
}

fn plugin_path() -> PathBuf {
    let p = std::env::current_exe().expect("current exe").with_file_name("flannel");
    if !p.exists() {
        eprintln!("e2e: {} not found; build the workspace first: cargo build --release", p.display());
        std::process::exit(2);
    }
    p
}

fn cni(plugin: &std::path::Path, node: &Netns, command: &str, cid: &str, pod: &Netns, conf: &str) -> String {
    use std::io::Write;
    let mut child = node
        .command(plugin.to_str().unwrap())
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", cid)
        .env("CNI_NETNS", pod.path())
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/opt/cni/bin")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run the flannel plugin");
    child.stdin.take().unwrap().write_all(conf.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        eprintln!("flannel {command} failed: {text}");
        std::process::exit(1);
    }
    text
}

fn demo() {
    let plugin = plugin_path();
    let dir = TempDir::new("demo");
    step("node1: a network namespace with its flannel lease written to subnet.env");
    let node = Netns::new("demo-node");
    let env = "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n";
    std::fs::write(dir.join("subnet.env"), env).unwrap();
    print!("{env}");
    let conf = serde_json::json!({
        "cniVersion": "0.3.1", "name": "cbr0", "type": "flannel",
        "subnetFile": dir.join("subnet.env"), "dataDir": dir.join("flannel"),
        "ipam": {"dataDir": dir.join("networks")},
        "delegate": {"hairpinMode": true, "isDefaultGateway": true},
    })
    .to_string();
    println!("conflist entry: {conf}");

    let pods: Vec<Netns> = (0..2).map(|_| Netns::new("demo-pod")).collect();
    let mut ips = Vec::new();
    for (i, pod) in pods.iter().enumerate() {
        step(&format!("CNI ADD pod{i} (netns {})", pod.name()));
        let res = cni(&plugin, &node, "ADD", &format!("demo{i}"), pod, &conf);
        println!("{res}");
        let v: serde_json::Value = serde_json::from_str(&res).unwrap();
        ips.push(v["ips"][0]["address"].as_str().unwrap().split('/').next().unwrap().to_string());
    }
    step("node1: the bridge and its ports");
    show(&node, &["-br", "addr", "show"]);
    step("pod0: routes (as seed 003 shows them)");
    show(&pods[0], &["route"]);
    step(&format!("pod0 -> pod1 ({}): ping", ips[1]));
    let out = Command::new("ip").args(["netns", "exec", pods[0].name(), "ping", "-c", "3", &ips[1]]).output().unwrap();
    print!("{}", String::from_utf8_lossy(&out.stdout));
    step("CNI DEL both pods");
    for (i, pod) in pods.iter().enumerate() {
        cni(&plugin, &node, "DEL", &format!("demo{i}"), pod, &conf);
    }
    println!("done; namespaces and files are removed on exit");
}

fn main() {
    match std::env::args().nth(1).as_deref() {
        Some("demo") => demo(),
        _ => {
            eprintln!("usage: e2e demo");
            std::process::exit(2);
        }
    }
}
