//! The wireguard backend for real, in the namespace test-bed. This kernel has
//! no WireGuard, so every node runs flanneld's userspace device (a TUN
//! interface); Debian's wireguard-go + `wg` stand in for a node we did not write.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use e2e::cluster::{Cluster, PREFIX, capture, ping_mesh};
use e2e::ns::Netns;
use e2e::wait_until;
use e2e::wireguard::{WireguardGo, device_peers, hex_of, public_key, start_node as start, transfer, uapi};

const READY: Duration = Duration::from_secs(30);
const PSK: &str = "ObRoIFzeh2A4HNo3XB+p3fVx4tmvZdD97R5vk8XUapM=";
const OTHER_PSK: &str = "Q2k5X8rQmD0qzP7u5cXcYf1g1q3lZ2p9b4mH6vT0aJ8=";

fn netconf(extra: &str) -> String {
    format!(r#"{{"Network":"10.244.0.0/16","Backend":{{"Type":"wireguard"{extra}}}}}"#)
}

fn wait_meshed(c: &Cluster, dev: &str) {
    let n = c.nodes.len();
    for (i, node) in c.nodes.iter().enumerate() {
        let ok = wait_until(Duration::from_secs(15), || device_peers(node, dev).len() == n - 1);
        assert!(ok, "node{}: {dev} peers {:?}\n{}", i + 1, device_peers(node, dev), node.log());
    }
}

fn cluster(tag: &str, n: usize, conf: &str) -> Cluster {
    let mut c = Cluster::new(tag);
    c.put_config(conf);
    for i in 0..n {
        c.add_node();
        start(&mut c, i);
    }
    for i in 0..n {
        assert!(c.wait_ready(i, READY), "node{} not ready:\n{}", i + 1, c.nodes[i].log());
    }
    wait_meshed(&c, "flannel-wg");
    c
}

/// The lease value of node `i` in etcd.
fn lease_of(c: &Cluster, i: usize) -> serde_json::Value {
    let subnet = c.nodes[i].subnet().expect("a subnet");
    // A dual-stack lease's key is `<v4 subnet>&<v6 subnet>`.
    c.leases()
        .into_iter()
        .find(|(k, _)| k.split('&').next() == Some(subnet.as_str()))
        .map(|(_, v)| v)
        .expect("lease in etcd")
}

#[test]
fn three_nodes_reach_each_other_encrypted_and_nothing_in_clear() {
    let mut c = cluster("wg", 3, &netconf(""));
    for (i, n) in c.nodes.iter().enumerate() {
        let env = n.subnet_env().unwrap();
        assert!(env.contains("FLANNEL_MTU=1420\n"), "node{}: {env}", i + 1);
        let link = n.ns.ip_json(&["-d", "addr", "show", "flannel-wg"]);
        assert_eq!(link[0]["mtu"], 1420);
        assert_eq!(link[0]["linkinfo"]["info_kind"], "tun", "the userspace device on this kernel");
        let subnet = n.subnet().unwrap();
        let first = subnet.split('/').next().unwrap();
        assert_eq!(link[0]["addr_info"][0]["local"], first);
        assert_eq!(link[0]["addr_info"][0]["prefixlen"], 32);
        // One route for the network onto the device, as upstream.
        let routes = n.flannel_routes();
        assert_eq!(routes.len(), 1, "{routes:?}");
        assert_eq!((routes[0]["dst"].as_str(), routes[0]["dev"].as_str()), (Some("10.244.0.0/16"), Some("flannel-wg")));
        // The lease says what upstream's does: the public key of the key file, and the port.
        let v = lease_of(&c, i);
        assert_eq!(v["BackendType"], "wireguard");
        assert_eq!(v["BackendData"]["Port"], 51820);
        let key = std::fs::read_to_string(n.dir.join("wgkey")).unwrap();
        let private_hex = hex_of(key.trim());
        let text = uapi(n, "flannel-wg").unwrap();
        assert!(text.contains(&format!("private_key={private_hex}\n")), "{text}");
        assert!(text.contains("listen_port=51820\n"), "{text}");
        // Each peer: its lease's key and address, its subnet as allowed IPs.
        for (j, m) in c.nodes.iter().enumerate().filter(|(j, _)| *j != i) {
            let pk = hex_of(lease_of(&c, j)["BackendData"]["PublicKey"].as_str().unwrap());
            let peers = device_peers(n, "flannel-wg");
            let p = peers
                .iter()
                .find(|p| p.0 == pk)
                .unwrap_or_else(|| panic!("node{}: no peer node{}: {peers:?}", i + 1, j + 1));
            assert_eq!(p.1, format!("{}:51820", m.ip));
            assert_eq!(p.2, [m.subnet().unwrap()]);
        }
    }
    for i in 0..3 {
        c.add_pod(i);
    }
    let hosts: Vec<_> = c.pods.iter().map(|p| (&p.ns, p.ip, p.node)).collect();
    let meshed = wait_until(Duration::from_secs(10), || ping_mesh(&hosts).is_ok());
    assert!(meshed, "{:?}", ping_mesh(&hosts));
    // Every session confirmed, as `wg show` reports it.
    for n in &c.nodes {
        let text = uapi(n, "flannel-wg").unwrap();
        let handshakes: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("last_handshake_time_sec=")).collect();
        assert!(handshakes.len() == 2 && handshakes.iter().all(|h| *h != "0"), "{text}");
    }
    // Debian's `wg` reads the device: its socket under a unique name where `wg` looks.
    let shown = {
        struct Link(std::path::PathBuf);
        impl Drop for Link {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
        let name = format!("flwg{}", std::process::id() % 100_000);
        std::fs::create_dir_all("/var/run/wireguard").unwrap();
        let link = Link(format!("/var/run/wireguard/{name}.sock").into());
        std::os::unix::fs::symlink(c.nodes[0].dir.join("wg/flannel-wg.sock"), &link.0).unwrap();
        let out = std::process::Command::new("wg").args(["show", &name, "dump"]).output().expect("wg");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let lines: Vec<&str> = shown.lines().collect();
    assert_eq!(lines.len(), 3, "the device and two peers: {shown}");
    for (j, m) in c.nodes.iter().enumerate().skip(1) {
        let pk = lease_of(&c, j)["BackendData"]["PublicKey"].as_str().unwrap().to_string();
        let row = lines.iter().find(|l| l.starts_with(&pk)).unwrap_or_else(|| panic!("no {pk}: {shown}"));
        let f: Vec<&str> = row.split('\t').collect();
        assert_eq!((f[2], f[3]), (format!("{}:51820", m.ip).as_str(), m.subnet().unwrap().as_str()), "{row}");
        assert_ne!(f[4], "0", "a handshake: {row}");
    }

    // On the underlay: only UDP between the nodes' WireGuard ports, no pod address in clear.
    let (p0, p2) = (&c.pods[0], &c.pods[2]);
    let mut result = None;
    let seen = capture(&c.nodes[0].ns, "eth0", "ip and not tcp port 2379", 40, Duration::from_secs(10), || {
        assert_eq!(p0.ns.ping(&p2.ip.to_string()), Some(62));
        result = Some(transfer(&p0.ns, &p2.ns, p2.ip, 7001, 4 << 20));
    });
    let (want, got) = result.unwrap();
    assert_eq!(got, want, "the TCP stream arrives intact");
    let lines: Vec<&str> = seen.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() >= 20, "{seen}");
    for l in &lines {
        assert!(!l.contains("10.244."), "a pod address in clear on the underlay: {l}");
        assert!(l.contains(".51820 > ") && l.contains(".51820: UDP"), "not WireGuard's UDP: {l}");
    }
    c.assert_idle();
}

#[test]
fn a_restart_keeps_key_and_subnet_and_a_removed_peer_leaves_the_device() {
    let mut c = cluster("wr", 3, &netconf(",\"PersistentKeepaliveInterval\":25"));
    c.add_pod(0);
    c.add_pod(1);
    let (b_ip, a_ns) = (c.pods[1].ip, c.pods[0].ns.name().to_string());
    let a = Netns::existing(&a_ns);
    assert!(wait_until(Duration::from_secs(10), || a.ping(&b_ip.to_string()) == Some(62)));
    let before = lease_of(&c, 1);
    let subnet = c.nodes[1].subnet();

    // SIGTERM removes the device (as upstream); the restart makes it again with the same key.
    let stopped = Instant::now();
    c.stop_agent(1);
    let exited = stopped.elapsed();
    assert!(!c.nodes[1].ns.links().iter().any(|l| l == "flannel-wg"), "SIGTERM leaves no device");
    start(&mut c, 1);
    // Pings 50 ms apart, each waiting 200 ms: the gap is measured to ~0.25 s.
    let fast_ping = || {
        let out = a.run("ping", &["-c", "1", "-W", "0.2", &b_ip.to_string()]);
        String::from_utf8_lossy(&out.stdout).contains("ttl=62")
    };
    let back = wait_until(Duration::from_secs(20), fast_ping);
    let gap = stopped.elapsed();
    assert!(back, "{}", c.nodes[1].log());
    let ready = c.nodes[1].log().lines().filter(|l| l.contains("ready:")).count();
    eprintln!(
        "wireguard restart: flanneld exited {} ms after SIGTERM; pod traffic back {} ms after SIGTERM ({ready} ready lines)",
        exited.as_millis(),
        gap.as_millis()
    );
    assert_eq!(c.nodes[1].subnet(), subnet);
    assert_eq!(lease_of(&c, 1)["BackendData"], before["BackendData"], "same key, same port");

    // A node gone (its lease deleted) leaves the others' devices; the rest keep their sessions.
    let pk3 = hex_of(lease_of(&c, 2)["BackendData"]["PublicKey"].as_str().unwrap());
    let handshake = |peers: &str, pk: &str| -> Option<String> {
        let mut lines = peers.lines().skip_while(|l| *l != format!("public_key={pk}"));
        lines.find_map(|l| l.strip_prefix("last_handshake_time_sec=").map(str::to_string))
    };
    let pk2 = hex_of(lease_of(&c, 1)["BackendData"]["PublicKey"].as_str().unwrap());
    let hs_before = handshake(&uapi(&c.nodes[0], "flannel-wg").unwrap(), &pk2);
    c.stop_agent(2);
    let key = format!("{PREFIX}/subnets/{}", c.nodes[2].subnet().unwrap().replace('/', "-"));
    c.etcdctl(&["del", &key]);
    let gone =
        wait_until(Duration::from_secs(10), || !device_peers(&c.nodes[0], "flannel-wg").iter().any(|p| p.0 == pk3));
    assert!(gone, "{:?}", device_peers(&c.nodes[0], "flannel-wg"));
    assert_eq!(device_peers(&c.nodes[0], "flannel-wg").len(), 1);
    assert_eq!(a.ping(&b_ip.to_string()), Some(62));
    assert_eq!(handshake(&uapi(&c.nodes[0], "flannel-wg").unwrap(), &pk2), hs_before, "node2's session was not redone");

    // The device deleted under a running agent: rebuilt on the same port, peers replayed.
    c.nodes[0].ns.ip(&["link", "del", "flannel-wg"]);
    let back = wait_until(Duration::from_secs(10), || a.ping(&b_ip.to_string()) == Some(62));
    assert!(back, "{}", c.nodes[0].log());
    assert!(c.nodes[0].log().contains("flannel-wg was missing and has been rebuilt"), "{}", c.nodes[0].log());
    assert_eq!(device_peers(&c.nodes[0], "flannel-wg").len(), 1);
}

#[test]
fn nodes_with_another_psk_cannot_talk() {
    let mut c = Cluster::new("wp");
    c.put_config(&netconf(&format!(",\"PSK\":\"{PSK}\"")));
    for i in 0..2 {
        c.add_node();
        start(&mut c, i);
    }
    for i in 0..2 {
        assert!(c.wait_ready(i, READY), "{}", c.nodes[i].log());
    }
    // Node3 starts while the config names another PSK (agents read it at start).
    c.put_config(&netconf(&format!(",\"PSK\":\"{OTHER_PSK}\"")));
    c.add_node();
    start(&mut c, 2);
    assert!(c.wait_ready(2, READY), "{}", c.nodes[2].log());
    wait_meshed(&c, "flannel-wg");
    for i in 0..3 {
        c.add_pod(i);
    }
    let ping = |c: &Cluster, from: usize, to: usize| c.pods[from].ns.ping(&c.pods[to].ip.to_string());
    assert!(wait_until(Duration::from_secs(10), || ping(&c, 0, 1) == Some(62)), "same PSK talks");
    for (from, to) in [(0, 2), (2, 0), (1, 2)] {
        assert_eq!(ping(&c, from, to), None, "node{} -> node{} across PSKs", from + 1, to + 1);
    }
    let text = uapi(&c.nodes[0], "flannel-wg").unwrap();
    let pk3 = hex_of(lease_of(&c, 2)["BackendData"]["PublicKey"].as_str().unwrap());
    let hs = text
        .lines()
        .skip_while(|l| *l != format!("public_key={pk3}"))
        .find_map(|l| l.strip_prefix("last_handshake_time_sec="));
    assert_eq!(hs, Some("0"), "no handshake with node3: {text}");
    // The same PSK again: node3 joins.
    c.put_config(&netconf(&format!(",\"PSK\":\"{PSK}\"")));
    start(&mut c, 2);
    assert!(c.wait_ready(2, READY));
    assert!(wait_until(Duration::from_secs(15), || ping(&c, 0, 2) == Some(62)), "{}", c.nodes[2].log());
}

/// Two dual-stack nodes (IPv4 and IPv6 underlay) on the wireguard backend with `mode`.
fn dual_stack(tag: &str, mode: &str) -> Cluster {
    let mut c = Cluster::new(tag);
    c.enable_ipv6();
    c.put_config(&format!(
        r#"{{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{{"Type":"wireguard","Mode":"{mode}"}}}}"#
    ));
    for i in 0..2 {
        c.add_node();
        start(&mut c, i);
    }
    for i in 0..2 {
        assert!(c.wait_ready(i, READY), "{}", c.nodes[i].log());
    }
    wait_meshed(&c, "flannel-wg");
    c
}

#[test]
fn dual_stack_separate_devices() {
    let mut c = dual_stack("wd", "separate");
    wait_meshed(&c, "flannel-wg-v6");
    let n = &c.nodes[0];
    let p6 = device_peers(n, "flannel-wg-v6");
    assert_eq!(p6[0].1, format!("[{}]:51821", c.nodes[1].ip6.unwrap()));
    assert_eq!(p6[0].2, [c.nodes[1].subnet6().unwrap()]);
    assert_eq!(lease_of(&c, 1)["BackendV6Data"]["Port"], 51821);
    let r6 = n.flannel_routes6();
    assert!(r6.iter().any(|r| r["dst"] == "fd00:10:244::/56" && r["dev"] == "flannel-wg-v6"), "{r6:?}");
    c.add_pod(0);
    c.add_pod(1);
    let b6 = c.pods[1].ip6.expect("pod IPv6").to_string();
    let ping6 = || {
        let out = c.pods[0].ns.run("ping", &["-6", "-c", "1", "-W", "2", &b6]);
        String::from_utf8_lossy(&out.stdout).contains("ttl=62")
            || String::from_utf8_lossy(&out.stdout).contains("hlim=62")
    };
    assert!(wait_until(Duration::from_secs(10), ping6), "IPv6 pod to pod");
    assert_eq!(c.pods[0].ns.ping(&c.pods[1].ip.to_string()), Some(62));
    // IPv6 rides over the IPv6 underlay only.
    let seen = capture(&c.nodes[0].ns, "eth0", "udp port 51821", 2, Duration::from_secs(5), || {
        ping6();
    });
    assert!(seen.contains("IP6 2001:db8::1.51821 > 2001:db8::2.51821"), "{seen}");
}

/// Debian's wireguard-go in a namespace of its own, configured with `wg` from
/// the lease data our nodes publish; it publishes its own lease as an upstream
/// node would.
#[test]
fn interop_with_wireguard_go() {
    let mut c = cluster("wi", 2, &netconf(""));
    let i = c.add_node();
    let node = &c.nodes[i];
    let dev = format!("wgref{}", std::process::id() % 100_000);
    let reference = WireguardGo::start(node.ns.name(), &dev);
    let key_file = node.dir.join("ref.key");
    let private = reference.run(&["wg", "genkey"]);
    std::fs::write(&key_file, &private).unwrap();
    let public = public_key(&private);
    let subnet = "10.244.200.0/24";
    reference.configure(&key_file, "10.244.200.0", "10.244.0.0/16");
    for j in 0..2 {
        let v = lease_of(&c, j);
        let pk = v["BackendData"]["PublicKey"].as_str().unwrap().to_string();
        let ep = format!("{}:{}", v["PublicIP"].as_str().unwrap(), v["BackendData"]["Port"]);
        reference.add_peer(&pk, &ep, &c.nodes[j].subnet().unwrap());
    }
    // Its lease, as an upstream wireguard node writes it.
    let lease = serde_json::json!({
        "PublicIP": node.ip.to_string(),
        "BackendType": "wireguard",
        "BackendData": {"PublicKey": public, "Port": 51820},
    });
    c.etcdctl(&["put", &format!("{PREFIX}/subnets/10.244.200.0-24"), &lease.to_string()]);
    for j in 0..2 {
        let ok = wait_until(Duration::from_secs(10), || {
            device_peers(&c.nodes[j], "flannel-wg")
                .iter()
                .any(|p| p.2 == [subnet] && p.1 == format!("{}:51820", node.ip))
        });
        assert!(ok, "node{}: {:?}", j + 1, device_peers(&c.nodes[j], "flannel-wg"));
    }
    c.add_pod(0);
    c.add_pod(1);
    // Ours -> it: a pod pings wireguard-go's address (one router on the way: the pod's node).
    let pod = &c.pods[0];
    assert!(wait_until(Duration::from_secs(10), || pod.ns.ping("10.244.200.0") == Some(63)), "pod -> wireguard-go");
    // It -> ours: wireguard-go's node pings the other node's pod, the handshake its own.
    let other = c.pods[1].ip.to_string();
    assert!(wait_until(Duration::from_secs(10), || reference.ns.ping(&other) == Some(63)), "wireguard-go -> pod");
    let shown = reference.run(&["wg", "show", &dev, "latest-handshakes"]);
    assert_eq!(shown.lines().filter(|l| !l.ends_with("\t0")).count(), 2, "handshakes with both nodes: {shown}");
    // A TCP stream through it arrives intact.
    let (want, got) = transfer(&pod.ns, &reference.ns, Ipv4Addr::new(10, 244, 200, 0), 7002, 1 << 20);
    assert_eq!(got, want);
}

#[test]
fn a_switch_vxlan_wireguard_vxlan_on_a_running_cluster_leaves_nothing_behind() {
    let mut c = Cluster::new("ws");
    c.put_config(&e2e::cluster::netconf("vxlan"));
    for i in 0..3 {
        c.add_node();
        start(&mut c, i);
    }
    for i in 0..3 {
        assert!(c.wait_ready(i, READY), "{}", c.nodes[i].log());
        c.add_pod(i);
    }
    let mesh = |c: &Cluster| {
        let hosts: Vec<_> = c.pods.iter().map(|p| (&p.ns, p.ip, p.node)).collect();
        wait_until(Duration::from_secs(15), || ping_mesh(&hosts).is_ok())
    };
    assert!(mesh(&c), "vxlan");
    for (to, gone, kept) in [("wireguard", "flannel.1", "flannel-wg"), ("vxlan", "flannel-wg", "flannel.1")] {
        c.put_config(&netconf("").replace("wireguard", to));
        for i in 0..3 {
            start(&mut c, i); // SIGTERM then start, one node at a time
            assert!(c.wait_ready(i, READY), "node{}: {}", i + 1, c.nodes[i].log());
        }
        assert!(mesh(&c), "after the switch to {to}");
        for (i, n) in c.nodes.iter().enumerate() {
            let links = n.ns.links();
            assert!(!links.iter().any(|l| l == gone) && links.iter().any(|l| l == kept), "node{}: {links:?}", i + 1);
            let routes = n.flannel_routes();
            let want = if to == "vxlan" { 2 } else { 1 };
            assert_eq!(routes.len(), want, "node{}: {routes:?}", i + 1);
            assert!(routes.iter().all(|r| r["dev"] == kept), "node{}: {routes:?}", i + 1);
            if to == "wireguard" {
                let neigh = n.ns.ip_json(&["neigh", "show", "nud", "permanent"]);
                assert_eq!(neigh.as_array().map(Vec::len), Some(0), "node{}: {neigh:?}", i + 1);
            }
        }
    }
}

#[test]
fn bad_config_names_the_key_and_leaves_nothing() {
    let mut c = Cluster::new("wb");
    c.add_node();
    let node_dir = c.nodes[0].dir.clone();
    for (conf, want) in [
        (netconf(",\"PSK\":\"not-a-key\""), "Backend.PSK"),
        (netconf(",\"ListenPort\":70000"), "Backend.ListenPort"),
        (netconf(",\"Mode\":\"both\""), "Backend.Mode"),
    ] {
        c.put_config(&conf);
        start(&mut c, 0);
        assert!(wait_until(Duration::from_secs(10), || !c.nodes[0].agent_running()), "{conf} accepted");
        let log = c.nodes[0].log();
        let last = log.lines().rev().find(|l| l.starts_with("flanneld: error:")).unwrap_or_default().to_string();
        assert!(last.contains(want), "{conf}: {last}");
        assert!(!last.contains("not-a-key"), "the PSK is not echoed: {last}");
        assert!(!node_dir.join("wgkey").exists(), "no key made for a bad config");
        std::fs::write(c.nodes[0].log_file(), "").unwrap();
    }
    // An unreadable key file, then a port already taken: named, and no device, no lease.
    c.put_config(&netconf(""));
    std::fs::create_dir_all(node_dir.join("wgkey")).unwrap();
    let taken = c.nodes[0].ns.run("true", &[]);
    assert!(taken.status.success());
    for (why, want) in [("key", "private key file"), ("port", "UDP port 51820")] {
        let _holder = if why == "port" {
            std::fs::remove_dir_all(node_dir.join("wgkey")).unwrap();
            Some(
                flannel_shared::netns::run_in(&c.nodes[0].ns.open(), || std::net::UdpSocket::bind("0.0.0.0:51820"))
                    .unwrap()
                    .unwrap(),
            )
        } else {
            None
        };
        start(&mut c, 0);
        assert!(wait_until(Duration::from_secs(10), || !c.nodes[0].agent_running()), "{why}: kept running");
        let log = c.nodes[0].log();
        let last = log.lines().rev().find(|l| l.starts_with("flanneld: error:")).unwrap_or_default().to_string();
        assert!(last.contains(want), "{why}: {last}");
        assert!(!c.nodes[0].ns.links().iter().any(|l| l == "flannel-wg"), "{why}: a device was left");
        std::fs::write(c.nodes[0].log_file(), "").unwrap();
    }
    assert!(c.leases().is_empty(), "a node that cannot start its tunnels claims nothing");
}

/// `Mode: ipv6`: one `flannel-wg` for both families, every peer reached over the
/// IPv6 underlay, its IPv4 and IPv6 subnets both its allowed IPs.
#[test]
fn dual_stack_one_device_over_ipv6() {
    let mut c = dual_stack("w6", "ipv6");
    let n = &c.nodes[0];
    assert!(!n.ns.links().iter().any(|l| l == "flannel-wg-v6"), "{:?}", n.ns.links());
    let p = device_peers(n, "flannel-wg");
    assert_eq!(p[0].1, format!("[{}]:51820", c.nodes[1].ip6.unwrap()));
    let mut want = vec![c.nodes[1].subnet().unwrap(), c.nodes[1].subnet6().unwrap()];
    want.sort();
    let mut got = p[0].2.clone();
    got.sort();
    assert_eq!(got, want);
    let r6 = n.flannel_routes6();
    assert!(r6.iter().any(|r| r["dst"] == "fd00:10:244::/56" && r["dev"] == "flannel-wg"), "{r6:?}");
    c.add_pod(0);
    c.add_pod(1);
    let (b4, b6) = (c.pods[1].ip.to_string(), c.pods[1].ip6.expect("pod IPv6").to_string());
    let pods = &c.pods;
    let ping6 = || {
        let out = pods[0].ns.run("ping", &["-6", "-c", "1", "-W", "2", &b6]);
        String::from_utf8_lossy(&out.stdout).contains("ttl=62")
    };
    assert!(wait_until(Duration::from_secs(10), ping6), "IPv6 pod to pod");
    // IPv4 pod traffic rides the IPv6 underlay too.
    let seen = capture(&c.nodes[0].ns, "eth0", "udp port 51820", 2, Duration::from_secs(5), || {
        assert_eq!(pods[0].ns.ping(&b4), Some(62));
    });
    assert!(seen.contains("IP6 2001:db8::1.51820 > 2001:db8::2.51820"), "{seen}");
    assert!(!seen.contains("IP 192.0.2"), "{seen}");
}

/// Standard base64 of a key (the test crate has no base64 of its own).
fn b64(b: &[u8; 32]) -> String {
    const T: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::new();
    for c in b.chunks(3) {
        let n = (c[0] as u32) << 16 | (*c.get(1).unwrap_or(&0) as u32) << 8 | *c.get(2).unwrap_or(&0) as u32;
        s.push(T[(n >> 18) as usize & 63] as char);
        s.push(T[(n >> 12) as usize & 63] as char);
        s.push(if c.len() > 1 { T[(n >> 6) as usize & 63] as char } else { '=' });
        s.push(if c.len() > 2 { T[n as usize & 63] as char } else { '=' });
    }
    s
}

/// (utime + stime in seconds, the VmHWM line) of a process.
fn cpu_and_peak(pid: u32) -> (f64, String) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let f: Vec<&str> = s.rsplit_once(") ").unwrap().1.split_whitespace().collect();
    let cpu = (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / 100.0;
    let st = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let hwm = st.lines().find(|l| l.starts_with("VmHWM")).unwrap().to_string();
    (cpu, hwm)
}

/// A measurement, not run by default: one node's agent on PEERS (5,000) fake
/// wireguard leases (keys made up, public IPs in 198.18.0.0/15 that nothing
/// holds): the time to ready and to every peer on the device, peak RSS, and
/// the CPU it burns over 10 s once WAIT (100) seconds have passed, when its
/// handshakes to the silent peers have given up (WireGuard's 90 s).
/// `cargo test --release -p e2e --test wireguard -- --ignored many_peers --nocapture`
#[test]
#[ignore = "a measurement: cargo test --release -p e2e --test wireguard -- --ignored many_peers --nocapture"]
fn many_peers_start_and_idle() {
    let n: usize = std::env::var("PEERS").ok().and_then(|v| v.parse().ok()).unwrap_or(5000);
    let mut c = Cluster::new("wgs");
    c.put_config(r#"{"Network":"10.0.0.0/8","Backend":{"Type":"wireguard"}}"#);
    let puts: Vec<(String, String)> = (0..n)
        .map(|i| {
            let k = i + 1;
            let mut key = [7u8; 32];
            key[..8].copy_from_slice(&(k as u64).to_le_bytes());
            (
                format!("{PREFIX}/subnets/10.{}.{}.0-24", k / 256, k % 256),
                format!(
                    r#"{{"PublicIP":"198.18.{}.{}","BackendType":"wireguard","BackendData":{{"PublicKey":"{}","Port":51820}}}}"#,
                    k / 256,
                    k % 256,
                    b64(&key)
                ),
            )
        })
        .collect();
    e2e::cluster::etcd_puts(&c.underlay, &puts).unwrap_or_else(|e| panic!("{e}"));
    let i = c.add_node();
    let t = Instant::now();
    start(&mut c, i);
    assert!(c.wait_ready(i, Duration::from_secs(60)), "{}", c.nodes[i].log());
    let ready = t.elapsed();
    assert!(e2e::wait_until(Duration::from_secs(60), || device_peers(&c.nodes[i], "flannel-wg").len() == n));
    let all = t.elapsed();
    let pid = c.nodes[i].agent_pid().unwrap();
    let wait: u64 = std::env::var("WAIT").ok().and_then(|v| v.parse().ok()).unwrap_or(100);
    std::thread::sleep(Duration::from_secs(wait));
    let (cpu0, hwm) = cpu_and_peak(pid);
    std::thread::sleep(Duration::from_secs(10));
    let (cpu1, _) = cpu_and_peak(pid);
    eprintln!(
        "{n} wireguard peers: ready {:.2} s, all on the device {:.2} s, {hwm}, idle CPU {:.2} s over 10 s",
        ready.as_secs_f64(),
        all.as_secs_f64(),
        cpu1 - cpu0
    );
}
