//! The real `flannel` binary against real namespaces (root).

mod common;

use common::*;
use serde_json::{Value, json};

fn ipv4_addrs(iface: &Value) -> Vec<String> {
    iface["addr_info"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|a| a["family"] == "inet")
        .map(|a| format!("{}/{}", a["local"].as_str().unwrap(), a["prefixlen"]))
        .collect()
}

#[test]
fn add_wires_pod_bridge_and_store() {
    let node = Node::new("10.244.1.1/24");
    let pod = Netns::new("cp");
    let res = node.add("ctr-1", &pod);

    // Pod: address, MTU, default route via the gateway, cluster route.
    let eth0 = pod_iface(&pod, "eth0");
    assert_eq!(ipv4_addrs(&eth0), vec!["10.244.1.2/24"]);
    assert_eq!(eth0["mtu"], 1450);
    assert!(eth0["flags"].as_array().unwrap().iter().any(|f| f == "UP"));
    let routes = pod.ip_json(&["route", "show"]);
    let has = |dst: &str, gw: &str| routes.as_array().unwrap().iter().any(|r| r["dst"] == dst && r["gateway"] == gw);
    assert!(has("default", "10.244.1.1"), "{routes}");
    assert!(has("10.244.0.0/16", "10.244.1.1"), "{routes}");
    let lo = pod_iface(&pod, "lo");
    assert!(lo["flags"].as_array().unwrap().iter().any(|f| f == "UP"));

    // Bridge: gateway address, MTU, pinned MAC.
    let cni0 = node.ns.ip_json(&["addr", "show", "dev", "cni0"])[0].clone();
    assert_eq!(ipv4_addrs(&cni0), vec!["10.244.1.1/24"]);
    assert_eq!(cni0["mtu"], 1450);
    assert_eq!(cni0["address"], "0a:58:0a:f4:01:01");

    // Host veth: port of cni0, hairpin on, MTU.
    let veths = node.veths();
    assert_eq!(veths.len(), 1);
    let veth = node.ns.ip_json(&["-d", "link", "show", "dev", &veths[0]])[0].clone();
    assert_eq!(veth["master"], "cni0");
    assert_eq!(veth["linkinfo"]["info_slave_data"]["hairpin"], true, "{veth}");
    assert_eq!(veth["mtu"], 1450);

    // Store: host-local layout with container ID and ifname.
    assert_eq!(node.reserved(), vec!["10.244.1.2"]);
    assert_eq!(std::fs::read_to_string(node.ipam_dir().join("10.244.1.2")).unwrap(), "ctr-1\r\neth0");

    // Result: bridge, host veth (with its MAC), pod interface in the sandbox.
    assert_eq!(res["cniVersion"], "0.3.1");
    assert_eq!(res["interfaces"][1]["name"], veths[0].as_str());
    assert_eq!(res["interfaces"][1]["mac"], veth["address"]);
    assert_eq!(res["interfaces"][2]["sandbox"], pod.path().to_str().unwrap());
    assert_eq!(res["interfaces"][2]["mac"], eth0["address"]);
    assert_eq!(res["ips"][0]["address"], "10.244.1.2/24");
    assert_eq!(res["ips"][0]["gateway"], "10.244.1.1");
    assert_eq!(res["ips"][0]["interface"], 2);
    assert!(res["routes"].as_array().unwrap().contains(&json!({"dst": "0.0.0.0/0", "gw": "10.244.1.1"})));

    node.del("ctr-1", Some(&pod)).expect_ok();
    node.assert_clean();
    assert_no_iface(&pod, "eth0");
}

#[test]
fn add_check_del_del_and_del_without_netns() {
    let node = Node::new("10.244.2.1/24");
    let pod = Netns::new("cp");
    let mut conf = node.conf("1.0.0");
    let res = node.cni("ADD", "c1", Some(pod.path().to_str().unwrap()), "eth0", &conf).expect_ok().json();
    conf["prevResult"] = res.clone();
    node.cni("CHECK", "c1", Some(pod.path().to_str().unwrap()), "eth0", &conf).expect_ok();
    node.cni("DEL", "c1", Some(pod.path().to_str().unwrap()), "eth0", &conf).expect_ok();
    node.cni("DEL", "c1", Some(pod.path().to_str().unwrap()), "eth0", &conf).expect_ok();
    node.assert_clean();

    // DEL after the namespace is gone still frees the address.
    let pod2 = Netns::new("cp");
    node.add("c2", &pod2);
    let path2 = pod2.path();
    drop(pod2);
    node.cni("DEL", "c2", Some(path2.to_str().unwrap()), "eth0", &node.conf("0.3.1")).expect_ok();
    // ... and again, with no netns at all and no saved state.
    node.cni("DEL", "c2", None, "eth0", &node.conf("0.3.1")).expect_ok();
    node.assert_clean();
}

#[test]
fn del_frees_the_address_even_when_state_is_lost() {
    let node = Node::new("10.244.3.1/24");
    let pod = Netns::new("cp");
    node.add("c1", &pod);
    std::fs::remove_dir_all(node.dir.join("state")).unwrap();
    node.del("c1", Some(&pod)).expect_ok();
    node.assert_clean();
}

#[test]
fn check_reports_drift() {
    let node = Node::new("10.244.4.1/24");
    let pod = Netns::new("cp");
    let mut conf = node.conf("0.4.0");
    let p = pod.path();
    let res = node.cni("ADD", "c1", Some(p.to_str().unwrap()), "eth0", &conf).expect_ok().json();
    conf["prevResult"] = res;
    node.cni("CHECK", "c1", Some(p.to_str().unwrap()), "eth0", &conf).expect_ok();

    pod.ip(&["route", "del", "default"]);
    let out = node.cni("CHECK", "c1", Some(p.to_str().unwrap()), "eth0", &conf);
    assert_eq!(out.code(), 102);
    assert!(out.json()["details"].as_str().unwrap().contains("0.0.0.0/0"), "{}", out.stdout);

    pod.ip(&["route", "add", "default", "via", "10.244.4.1"]);
    node.cni("CHECK", "c1", Some(p.to_str().unwrap()), "eth0", &conf).expect_ok();
    pod.ip(&["addr", "flush", "dev", "eth0"]);
    assert_eq!(node.cni("CHECK", "c1", Some(p.to_str().unwrap()), "eth0", &conf).code(), 102);

    // CHECK is not part of 0.3.x.
    let mut old = conf.clone();
    old["cniVersion"] = "0.3.1".into();
    assert_eq!(node.cni("CHECK", "c1", Some(p.to_str().unwrap()), "eth0", &old).code(), 1);
    node.del("c1", Some(&pod)).expect_ok();
    node.assert_clean();
}

#[test]
fn fifty_concurrent_adds_get_distinct_addresses() {
    let node = Node::new("10.244.5.1/24");
    let pods: Vec<Netns> = (0..50).map(|_| Netns::new("cp")).collect();
    let results: Vec<Value> = std::thread::scope(|s| {
        let handles: Vec<_> = pods
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let node = &node;
                s.spawn(move || node.add(&format!("c{i}"), p))
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("ADD failed")).collect()
    });
    let mut ips: Vec<String> = results.iter().map(|r| r["ips"][0]["address"].as_str().unwrap().to_string()).collect();
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), 50, "duplicate addresses: {ips:?}");
    assert_eq!(node.reserved().len(), 50);
    assert_eq!(node.veths().len(), 50);
    for p in &pods {
        assert_eq!(ipv4_addrs(&pod_iface(p, "eth0")).len(), 1);
    }
    std::thread::scope(|s| {
        for (i, p) in pods.iter().enumerate() {
            let node = &node;
            s.spawn(move || node.del(&format!("c{i}"), Some(p)).expect_ok());
        }
    });
    node.assert_clean();
}

#[test]
fn exhaustion_is_a_clear_error_and_leaks_nothing() {
    // A /29: .1 is the gateway, .2-.6 are the five pod addresses.
    let node = Node::with_env(
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.6.1/29\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
    );
    let pods: Vec<Netns> = (0..6).map(|_| Netns::new("cp")).collect();
    for (i, p) in pods.iter().take(5).enumerate() {
        node.add(&format!("c{i}"), p);
    }
    let out = node.cni("ADD", "c5", Some(pods[5].path().to_str().unwrap()), "eth0", &node.conf("0.3.1"));
    assert_eq!(out.code(), 101);
    assert!(out.json()["msg"].as_str().unwrap().contains("no IP addresses available"), "{}", out.stdout);
    assert_eq!(node.reserved().len(), 5);
    assert_eq!(node.veths().len(), 5);
    assert_eq!(node.state_files().len(), 5);
    assert!(!pods[5].links().contains(&"eth0".to_string()));
    for (i, p) in pods.iter().take(5).enumerate() {
        node.del(&format!("c{i}"), Some(p)).expect_ok();
    }
    node.assert_clean();
}

#[test]
fn bad_inputs_get_their_codes_and_leak_nothing() {
    let node = Node::new("10.244.7.1/24");
    let pod = Netns::new("cp");
    let p = pod.path();
    let ps = p.to_str().unwrap();
    let env = |cid: &'static str| vec![("CNI_CONTAINERID", cid), ("CNI_NETNS", ps), ("CNI_IFNAME", "eth0")];
    let conf = node.conf("0.3.1");
    let with = |f: &dyn Fn(&mut Value)| {
        let mut c = conf.clone();
        f(&mut c);
        c.to_string().into_bytes()
    };
    type Case<'a> = (&'a str, u64, Vec<(&'a str, &'a str)>, Vec<u8>);
    let cases: Vec<Case> = vec![
        ("unsupported version", 1, env("c1"), with(&|c| c["cniVersion"] = "0.2.0".into())),
        ("unsupported delegate type", 2, env("c1"), with(&|c| c["delegate"]["type"] = "ptp".into())),
        (
            "netns does not exist",
            3,
            vec![("CNI_CONTAINERID", "c1"), ("CNI_NETNS", "/var/run/netns/nope-none"), ("CNI_IFNAME", "eth0")],
            conf.to_string().into_bytes(),
        ),
        ("missing container id", 4, vec![("CNI_NETNS", ps), ("CNI_IFNAME", "eth0")], conf.to_string().into_bytes()),
        ("container id with a path", 4, env("../../etc/x"), conf.to_string().into_bytes()),
        (
            "ifname too long",
            4,
            vec![("CNI_CONTAINERID", "c1"), ("CNI_NETNS", ps), ("CNI_IFNAME", "a-very-long-ifname")],
            conf.to_string().into_bytes(),
        ),
        (
            "netns is a plain file",
            4,
            vec![("CNI_CONTAINERID", "c1"), ("CNI_NETNS", "/etc/hostname"), ("CNI_IFNAME", "eth0")],
            conf.to_string().into_bytes(),
        ),
        ("not JSON", 6, env("c1"), b"{\"cniVersion\": ".to_vec()),
        ("mtu of the wrong type", 7, env("c1"), with(&|c| c["delegate"]["mtu"] = "1450".into())),
        ("bad ipam route", 7, env("c1"), with(&|c| c["ipam"]["routes"] = json!([{"dst": "10.1.0.0"}]))),
        ("requested IP outside the subnet", 7, env("c1"), with(&|c| c["runtimeConfig"] = json!({"ips": ["10.9.9.9"]}))),
        ("subnet.env missing", 11, env("c1"), with(&|c| c["subnetFile"] = "/nonexistent/subnet.env".into())),
    ];
    for (what, code, env, stdin) in cases {
        let out = node.cni_raw("ADD", &env, &stdin);
        assert_eq!(out.code(), code, "{what}: {}", out.stdout);
        assert!(out.stdout.lines().count() == 1, "{what}: stdout must hold only the error JSON: {:?}", out.stdout);
        node.assert_clean();
        assert!(!pod.links().contains(&"eth0".to_string()), "{what}: pod interface left behind");
    }

    // A malformed subnet.env is an I/O failure naming the file.
    std::fs::write(node.subnet_file(), "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=garbage\n").unwrap();
    let out = node.cni("ADD", "c1", Some(ps), "eth0", &conf);
    assert_eq!(out.code(), 5);
    assert!(out.json()["details"].as_str().unwrap().contains("subnet.env"), "{}", out.stdout);
    node.assert_clean();
    std::fs::write(
        node.subnet_file(),
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.7.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
    )
    .unwrap();

    // The interface name is taken inside the pod: nothing is reserved or created.
    pod.ip(&["link", "add", "eth0", "type", "veth", "peer", "name", "eth0p"]);
    let out = node.cni("ADD", "c1", Some(ps), "eth0", &conf);
    assert_eq!(out.code(), 4, "{}", out.stdout);
    node.assert_clean();
    pod.ip(&["link", "del", "eth0"]);

    // A failure late in ADD (the pod route cannot be installed: its gateway
    // is not on-link) rolls back the veth, the address and the state.
    let mut bad = conf.clone();
    bad["ipam"]["routes"] = json!([{"dst": "192.0.2.0/24", "gw": "198.51.100.1"}]);
    let out = node.cni("ADD", "c1", Some(ps), "eth0", &bad);
    assert_eq!(out.code(), 100, "{}", out.stdout);
    node.assert_clean();
    assert_no_iface(&pod, "eth0");

    // Unknown command and missing command.
    assert_eq!(node.cni_raw("FROB", &env("c1"), conf.to_string().as_bytes()).code(), 4);
}

#[test]
fn two_pods_on_one_node_ping_and_results_parse_in_every_version() {
    let node = Node::new("10.244.8.1/24");
    let mut pods = Vec::new();
    let mut addrs = Vec::new();
    for (i, v) in ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"].iter().enumerate() {
        let pod = Netns::new("cp");
        let out =
            node.cni("ADD", &format!("v{i}"), Some(pod.path().to_str().unwrap()), "eth0", &node.conf(v)).expect_ok();
        let r = out.json();
        assert_eq!(r["cniVersion"], *v);
        let ip = &r["ips"][0];
        assert_eq!(ip.get("version").is_some(), v.starts_with("0."), "{v}: {r}");
        assert_eq!(r["interfaces"][2].get("mtu").is_some(), *v == "1.1.0", "{v}: {r}");
        addrs.push(ip["address"].as_str().unwrap().split('/').next().unwrap().to_string());
        pods.push(pod);
    }
    for (i, pod) in pods.iter().enumerate() {
        let other = &addrs[(i + 1) % addrs.len()];
        assert_eq!(pod.ping(other), Some(64), "pod {i} cannot reach {other}");
    }
    for (i, pod) in pods.iter().enumerate() {
        node.del(&format!("v{i}"), Some(pod)).expect_ok();
    }
    node.assert_clean();
}

#[test]
fn version_status_and_gc() {
    let node = Node::new("10.244.9.1/24");
    let v = node.cni_raw("VERSION", &[], b"{\"cniVersion\":\"1.1.0\"}").expect_ok().json();
    assert_eq!(v["supportedVersions"], json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]));

    let conf = node.conf("1.1.0");
    let out = node.cni_raw("STATUS", &[], conf.to_string().as_bytes()).expect_ok();
    assert!(out.stdout.is_empty());
    std::fs::remove_file(node.subnet_file()).unwrap();
    assert_eq!(node.cni_raw("STATUS", &[], conf.to_string().as_bytes()).code(), 50);
    std::fs::write(
        node.subnet_file(),
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.9.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
    )
    .unwrap();

    // Three pods; after a "reboot" only one attachment is still valid.
    let pods: Vec<Netns> = (0..3).map(|_| Netns::new("cp")).collect();
    for (i, p) in pods.iter().enumerate() {
        node.add(&format!("g{i}"), p);
    }
    // An entry written by upstream's host-local for a long-gone container.
    std::fs::write(node.ipam_dir().join("10.244.9.200"), "oldctr\r\neth0").unwrap();
    let mut gc = conf.clone();
    assert_eq!(node.cni_raw("GC", &[], gc.to_string().as_bytes()).code(), 7, "GC without a valid list must refuse");
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "g1", "ifname": "eth0"}]);
    node.cni_raw("GC", &[], gc.to_string().as_bytes()).expect_ok();
    assert_eq!(node.reserved(), vec!["10.244.9.3"]);
    assert_eq!(node.state_files(), vec!["g1"]);
    node.del("g1", Some(&pods[1])).expect_ok();
    for p in [&pods[0], &pods[2]] {
        p.ip(&["link", "del", "eth0"]);
    }
    node.assert_clean();
}

#[test]
fn stale_bridge_address_is_replaced() {
    let node = Node::new("10.244.10.1/24");
    node.ns.ip(&["link", "add", "cni0", "type", "bridge"]);
    node.ns.ip(&["addr", "add", "10.244.99.1/24", "dev", "cni0"]);
    let pod = Netns::new("cp");
    node.add("c1", &pod);
    let cni0 = node.ns.ip_json(&["addr", "show", "dev", "cni0"])[0].clone();
    assert_eq!(ipv4_addrs(&cni0), vec!["10.244.10.1/24"]);
    assert_eq!(pod.ping("10.244.10.1"), Some(64));
    node.del("c1", Some(&pod)).expect_ok();
}

#[test]
fn ip_masq_rules_follow_upstream_when_flanneld_does_not_masquerade() {
    let node = Node::with_env(
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.11.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n",
    );
    let pod = Netns::new("cp");
    node.add("m1", &pod);
    let rules = String::from_utf8_lossy(&node.ns.run("iptables-save", &["-t", "nat"]).stdout).into_owned();
    assert!(
        rules.contains(
            "-A POSTROUTING -s 10.244.11.2/32 -m comment --comment \"name: \\\"cbr0\\\" id: \\\"m1\\\"\" -j CNI-"
        ),
        "{rules}"
    );
    assert!(rules.contains("! -d 224.0.0.0/4") && rules.contains("-j MASQUERADE"), "{rules}");

    // CHECK sees a missing masquerade rule as drift.
    let mut conf = node.conf("1.0.0");
    let pod2 = Netns::new("cp");
    let res = node.cni("ADD", "m2", Some(pod2.path().to_str().unwrap()), "eth0", &conf).expect_ok().json();
    conf["prevResult"] = res;
    node.cni("CHECK", "m2", Some(pod2.path().to_str().unwrap()), "eth0", &conf).expect_ok();
    let jump = rules_line(&node, "m2");
    let out = node.ns.run("sh", &["-c", &format!("iptables -t nat {}", jump.replacen("-A ", "-D ", 1))]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = node.cni("CHECK", "m2", Some(pod2.path().to_str().unwrap()), "eth0", &conf);
    assert_eq!(out.code(), 102);
    assert!(out.json()["details"].as_str().unwrap().contains("ipMasq rule missing"), "{}", out.stdout);
    node.cni("DEL", "m2", Some(pod2.path().to_str().unwrap()), "eth0", &conf).expect_ok();
    node.del("m1", Some(&pod)).expect_ok();
    let rules = String::from_utf8_lossy(&node.ns.run("iptables-save", &["-t", "nat"]).stdout).into_owned();
    assert!(!rules.contains("CNI-"), "rules left behind: {rules}");
    node.assert_clean();
}

#[test]
fn ip_masq_with_nftables_when_asked_and_by_default_without_iptables() {
    let node = Node::with_env(
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.12.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n",
    );
    let table = || {
        String::from_utf8_lossy(&node.ns.run("nft", &["list", "table", "inet", "cni_plugins_masquerade"]).stdout)
            .into_owned()
    };
    let nat = || String::from_utf8_lossy(&node.ns.run("iptables-save", &["-t", "nat"]).stdout).into_owned();

    // Asked for: delegate.ipMasqBackend, the bridge plugin's key.
    let mut conf = node.conf("1.0.0");
    conf["delegate"]["ipMasqBackend"] = "nftables".into();
    let pod = Netns::new("cp");
    let netns = pod.path().to_str().unwrap().to_string();
    let res = node.cni("ADD", "n1", Some(&netns), "eth0", &conf).expect_ok().json();
    let t = table();
    assert!(t.contains("ip saddr 10.244.12.2 ip daddr != 10.244.12.0/24 masquerade comment"), "{t}");
    assert!(t.contains(", net: cbr0, if: eth0, id: n1"), "{t}");
    assert!(!nat().contains("CNI-"), "no iptables rule in nftables mode: {}", nat());
    conf["prevResult"] = res;
    node.cni("CHECK", "n1", Some(&netns), "eth0", &conf).expect_ok();
    let out = node.ns.run("nft", &["flush", "chain", "inet", "cni_plugins_masquerade", "masq_checks"]);
    assert!(out.status.success());
    let out = node.cni("CHECK", "n1", Some(&netns), "eth0", &conf);
    assert_eq!(out.code(), 102, "{}", out.stdout);
    assert!(out.json()["details"].as_str().unwrap().contains("ipMasq"), "{}", out.stdout);
    node.cni("DEL", "n1", Some(&netns), "eth0", &conf).expect_ok();

    // Not asked for, on a node without iptables: nftables, and DEL follows what ADD used.
    let bin = node.dir.join("nft-only-bin");
    std::fs::create_dir_all(&bin).unwrap();
    let nft = flannel_shared::firewall::find_in_path("nft").unwrap();
    std::os::unix::fs::symlink(nft, bin.join("nft")).unwrap();
    let pod2 = Netns::new("cp");
    let netns2 = pod2.path().to_str().unwrap().to_string();
    let plain = node.conf("1.0.0");
    let env = [
        ("CNI_CONTAINERID", "n2"),
        ("CNI_NETNS", netns2.as_str()),
        ("CNI_IFNAME", "eth0"),
        ("PATH", bin.to_str().unwrap()),
    ];
    node.cni_raw("ADD", &env, plain.to_string().as_bytes()).expect_ok();
    assert!(table().contains("id: n2"), "{}", table());
    node.cni("DEL", "n2", Some(&netns2), "eth0", &plain).expect_ok();
    assert!(!table().contains("id: n"), "rules left behind: {}", table());
    node.assert_clean();
}

/// The POSTROUTING jump of one container's masquerade chain, as iptables-save prints it.
fn rules_line(node: &Node, cid: &str) -> String {
    let rules = String::from_utf8_lossy(&node.ns.run("iptables-save", &["-t", "nat"]).stdout).into_owned();
    rules
        .lines()
        .find(|l| l.starts_with("-A POSTROUTING") && l.contains(cid))
        .unwrap_or_else(|| panic!("no jump for {cid} in {rules}"))
        .to_string()
}

#[test]
fn del_then_immediate_add_into_the_same_namespace() {
    let node = Node::new("10.244.12.1/24");
    let pod = Netns::new("cp");
    for round in 0..3 {
        node.add("same", &pod);
        assert_eq!(pod.ping("10.244.12.1"), Some(64), "round {round}");
        node.del("same", Some(&pod)).expect_ok();
        // Addresses are gone from the pod by the time DEL returns.
        let still: Vec<String> = pod
            .ip_json(&["-4", "addr", "show"])
            .as_array()
            .unwrap()
            .iter()
            .filter(|l| l["ifname"] == "eth0")
            .flat_map(|l| l["addr_info"].as_array().cloned().unwrap_or_default())
            .map(|a| a["local"].to_string())
            .collect();
        assert!(still.is_empty(), "round {round}: pod still holds {still:?} after DEL");
    }
    node.assert_clean();
}

#[test]
fn dual_stack_pods_get_both_families() {
    let node = Node::with_env(
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.13.1/24\nFLANNEL_IPV6_NETWORK=fd00:10:244::/56\nFLANNEL_IPV6_SUBNET=fd00:10:244:d::1/64\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
    );
    let pods: Vec<Netns> = (0..2).map(|_| Netns::new("cp")).collect();
    let mut v6 = Vec::new();
    for (i, p) in pods.iter().enumerate() {
        let r = node.add(&format!("d{i}"), p);
        let addrs: Vec<&str> = r["ips"].as_array().unwrap().iter().map(|ip| ip["address"].as_str().unwrap()).collect();
        assert_eq!(addrs.len(), 2, "{r}");
        assert_eq!(addrs[0], format!("10.244.13.{}/24", i + 2));
        assert_eq!(addrs[1], format!("fd00:10:244:d::{}/64", i + 2));
        assert_eq!(r["ips"][1]["gateway"], "fd00:10:244:d::1");
        assert!(r["routes"].as_array().unwrap().contains(&json!({"dst": "::/0", "gw": "fd00:10:244:d::1"})), "{r}");
        let routes = p.ip_json(&["-6", "route", "show"]);
        assert!(
            routes.as_array().unwrap().iter().any(|r| r["dst"] == "default" && r["gateway"] == "fd00:10:244:d::1"),
            "{routes}"
        );
        v6.push(addrs[1].split('/').next().unwrap().to_string());
    }
    let cni0 = node.ns.ip_json(&["-6", "addr", "show", "dev", "cni0"])[0].clone();
    assert!(cni0["addr_info"].as_array().unwrap().iter().any(|a| a["local"] == "fd00:10:244:d::1"), "{cni0}");
    // The bridge's link-local address is usable at once (no duplicate address detection):
    // solicitations for packets forwarded to the pods go out from it.
    let ll = cni0["addr_info"].as_array().unwrap().iter().find(|a| a["scope"] == "link").cloned();
    let ll = ll.unwrap_or_else(|| panic!("cni0 has no link-local address: {cni0}"));
    assert!(ll.get("tentative").is_none() && ll.get("dadfailed").is_none(), "{ll}");
    // Pod to pod over IPv6 (no DAD delay: addresses are usable at once).
    let out = pods[0].run("ping", &["-6", "-c", "1", "-W", "3", &v6[1]]);
    assert!(out.status.success(), "ping6 failed: {}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(node.reserved().len(), 4);
    assert!(
        std::fs::read_to_string(node.ipam_dir().join("last_reserved_ip.1")).unwrap().starts_with("fd00:10:244:d::")
    );
    for (i, p) in pods.iter().enumerate() {
        node.del(&format!("d{i}"), Some(p)).expect_ok();
    }
    node.assert_clean();
}

/// CHECK and GC decide ipMasq as DEL does: the attachment's saved state
/// first, then the configuration, then `!FLANNEL_IPMASQ`.
#[test]
fn check_and_gc_follow_the_saved_ip_masq_like_del() {
    let node = Node::with_env(
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.14.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n",
    );
    let nat = || String::from_utf8_lossy(&node.ns.run("iptables-save", &["-t", "nat"]).stdout).into_owned();
    // ADDed with ipMasq off; the configuration CHECK gets no longer says, and
    // FLANNEL_IPMASQ=false alone would mean "masquerade": not drift.
    let pod = Netns::new("cp");
    let ps = pod.path().to_str().unwrap().to_string();
    let mut conf = node.conf("1.0.0");
    conf["delegate"]["ipMasq"] = false.into();
    let res = node.cni("ADD", "m1", Some(&ps), "eth0", &conf).expect_ok().json();
    assert!(!nat().contains("CNI-"), "{}", nat());
    let mut check = node.conf("1.0.0");
    check["prevResult"] = res;
    node.cni("CHECK", "m1", Some(&ps), "eth0", &check).expect_ok();
    node.cni("DEL", "m1", Some(&ps), "eth0", &conf).expect_ok();
    e2e::wait_until(std::time::Duration::from_secs(5), || !pod.links().iter().any(|l| l == "eth0"));

    // Masqueraded by default; its state is lost (an ADD killed before saving
    // it): GC still removes the chain, as DEL would.
    let res = node.add("m2", &pod);
    assert!(nat().contains("-j CNI-"), "{}", nat());
    std::fs::remove_file(node.dir.join("state/m2")).unwrap();
    let mut gc = node.conf("1.1.0");
    gc["cni.dev/valid-attachments"] = serde_json::json!([]);
    node.cni_raw("GC", &[], gc.to_string().as_bytes()).expect_ok();
    assert!(node.reserved().is_empty(), "{res}");
    assert!(!nat().contains("CNI-"), "GC left the masquerade: {}", nat());
    node.del("m2", Some(&pod)).expect_ok();
    node.assert_clean();
}
