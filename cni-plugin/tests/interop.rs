//! Chaining with Debian's reference `portmap` plugin, the way a runtime runs
//! the upstream conflist `[flannel, portmap]`.

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const PORTMAP: &str = "/usr/lib/cni/portmap";

#[test]
fn portmap_chained_after_flannel_forwards_a_host_port_to_the_pod() {
    assert!(std::path::Path::new(PORTMAP).exists(), "install containernetworking-plugins ({PORTMAP} missing)");
    let node = Node::new("10.244.20.1/24");
    let pod = Netns::new("cp");
    let client = Netns::new("cc");
    // The client reaches the node over a veth, like a machine on the node's LAN.
    node.ns.ip(&["link", "add", "uplink", "type", "veth", "peer", "name", "cl0", "netns", client.name()]);
    node.ns.ip(&["addr", "add", "192.0.2.1/24", "dev", "uplink"]);
    node.ns.ip(&["link", "set", "uplink", "up"]);
    client.ip(&["addr", "add", "192.0.2.2/24", "dev", "cl0"]);
    client.ip(&["link", "set", "cl0", "up"]);

    let conflist = json!({
        "name": "cbr0",
        "cniVersion": "0.3.1",
        "plugins": [
            node.conf("0.3.1"),
            {"type": "portmap", "capabilities": {"portMappings": true}},
        ]
    });
    let runtime_config = json!({"portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]});
    let pod_path = pod.path();
    let env = [("CNI_CONTAINERID", "pm1"), ("CNI_NETNS", pod_path.to_str().unwrap()), ("CNI_IFNAME", "eth0")];

    // ADD through the chain, passing each result on as prevResult.
    let mut prev: Option<Value> = None;
    for plugin in conflist["plugins"].as_array().unwrap() {
        let mut conf = plugin.clone();
        conf["name"] = conflist["name"].clone();
        conf["cniVersion"] = conflist["cniVersion"].clone();
        if plugin["type"] == "portmap" {
            conf["runtimeConfig"] = runtime_config.clone();
        }
        if let Some(p) = &prev {
            conf["prevResult"] = p.clone();
        }
        let out = if plugin["type"] == "flannel" {
            node.cni_raw("ADD", &env, conf.to_string().as_bytes())
        } else {
            run_reference(&node, PORTMAP, "ADD", &env, &conf)
        };
        let out = out.expect_ok();
        prev = Some(out.json());
    }
    let pod_ip = prev.as_ref().unwrap()["ips"][0]["address"].as_str().unwrap().split('/').next().unwrap().to_string();
    assert_eq!(pod_ip, "10.244.20.2");

    let listener = pod.tcp_listen("0.0.0.0:80".parse().unwrap()).unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, peer) = listener.accept().unwrap();
        s.write_all(format!("hello from the pod to {}", peer.ip()).as_bytes()).unwrap();
    });
    let mut conn = client.tcp_connect("192.0.2.1:8080".parse().unwrap(), Duration::from_secs(5)).unwrap_or_else(|e| {
        let rules = String::from_utf8_lossy(&node.ns.run("iptables-save", &["-t", "nat"]).stdout).into_owned();
        panic!("connect to the host port failed: {e}\n{rules}")
    });
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut reply = String::new();
    conn.read_to_string(&mut reply).unwrap();
    server.join().unwrap();
    assert_eq!(reply, "hello from the pod to 192.0.2.2");

    // DEL in reverse order.
    let mut conf = conflist["plugins"][1].clone();
    conf["name"] = conflist["name"].clone();
    conf["cniVersion"] = conflist["cniVersion"].clone();
    conf["runtimeConfig"] = runtime_config;
    run_reference(&node, PORTMAP, "DEL", &env, &conf).expect_ok();
    node.cni_raw("DEL", &env, node.conf("0.3.1").to_string().as_bytes()).expect_ok();
    node.assert_clean();
}

fn run_reference(node: &Node, bin: &str, command: &str, env: &[(&str, &str)], conf: &Value) -> CniOut {
    let mut cmd = node.ns.command(bin);
    cmd.env("CNI_COMMAND", command).env("CNI_PATH", "/usr/lib/cni");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(conf.to_string().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    CniOut {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}
