//! `"EnableNFTables": true` for real: nodes whose flanneld cannot see the
//! iptables binaries (a PATH with `nft` only), real nft tables in each node's
//! namespace, tcpdump on the uplink for the masquerade, the switch between
//! modes in both directions, and what a FORWARD policy of DROP does in each.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use e2e::cluster::{Cluster, ETCD_IP, capture, netconf, request};
use e2e::wait_until;

const READY: Duration = Duration::from_secs(30);

fn nft_netconf(backend: &str) -> String {
    format!(r#"{{"Network":"10.244.0.0/16","EnableNFTables":true,"Backend":{{"Type":"{backend}"}}}}"#)
}

/// A directory holding only `nft`: flanneld's PATH on a node without iptables.
fn nft_only_path(c: &Cluster) -> PathBuf {
    let dir = c.dir().join("nft-only-bin");
    if !dir.exists() {
        std::fs::create_dir_all(&dir).unwrap();
        let nft = flannel_shared::firewall::find_in_path("nft").expect("nft installed (scripts/deps.sh)");
        std::os::unix::fs::symlink(nft, dir.join("nft")).unwrap();
    }
    dir
}

fn start_nft_agent(c: &mut Cluster, i: usize) {
    let path = nft_only_path(c);
    c.start_agent_env(i, &[], &[("PATH", path.to_str().unwrap())]);
}

/// `n` nodes in nftables mode with one pod each, agents ready, peers routed.
fn nft_cluster(tag: &str, n: usize, backend: &str) -> Cluster {
    let mut c = Cluster::new(tag);
    c.put_config(&nft_netconf(backend));
    for i in 0..n {
        c.add_node();
        start_nft_agent(&mut c, i);
    }
    ready(&mut c);
    for i in 0..n {
        c.add_pod(i);
    }
    c
}

fn ready(c: &mut Cluster) {
    let n = c.nodes.len();
    for i in 0..n {
        assert!(c.wait_ready(i, READY), "node{} not ready:\n{}", i + 1, c.nodes[i].log());
    }
    for (i, node) in c.nodes.iter().enumerate() {
        let routed = wait_until(Duration::from_secs(10), || node.flannel_routes().len() == n - 1);
        assert!(routed, "node{} routes: {:?}", i + 1, node.flannel_routes());
    }
}

fn nft(c: &Cluster, i: usize, args: &[&str]) -> String {
    let out = c.nodes[i].ns.run("nft", args);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn iptables_save(c: &Cluster, i: usize) -> String {
    String::from_utf8_lossy(&c.nodes[i].ns.run("iptables-save", &[]).stdout).into_owned()
}

fn pods_ping(c: &Cluster) -> bool {
    let b = c.pods[1].ip.to_string();
    wait_until(Duration::from_secs(5), || c.pods[0].ns.ping(&b) == Some(62))
}

/// The source address node `i`'s uplink shows for a TCP SYN from pod `p` to the underlay host's `port`.
fn source_on_the_wire(c: &Cluster, i: usize, p: usize, port: u16) -> String {
    let target: SocketAddr = (ETCD_IP.parse::<Ipv4Addr>().unwrap(), port).into();
    let filter = format!("tcp dst port {port}");
    let wire = capture(&c.nodes[i].ns, "eth0", &filter, 1, Duration::from_secs(5), || {
        let _ = c.pods[p].ns.tcp_connect(target, Duration::from_secs(1));
    });
    let line = wire.lines().find(|l| l.contains(" IP ")).unwrap_or_else(|| panic!("no SYN seen: {wire:?}"));
    let src = line.split(" IP ").nth(1).and_then(|r| r.split(" > ").next()).unwrap_or_default();
    src.rsplit_once('.').map(|(ip, _port)| ip.to_string()).unwrap_or_default()
}

#[test]
fn nftables_mode_without_iptables_binaries_carries_and_masquerades() {
    for backend in ["vxlan", "host-gw"] {
        let c = nft_cluster("nf", 2, backend);
        assert!(c.nodes[0].log().contains("nftables: writing tables"), "{}", c.nodes[0].log());
        assert!(pods_ping(&c), "{backend}: pods do not reach each other");

        // Exactly flannel's tables, nothing of iptables.
        for i in 0..2 {
            assert_eq!(nft(&c, i, &["list", "tables"]).trim(), "table ip flannel-ipv4", "{backend}: node{}", i + 1);
            let t = nft(&c, i, &["list", "table", "ip", "flannel-ipv4"]);
            let subnet = c.nodes[i].subnet().unwrap();
            assert!(t.contains(&format!("ip saddr {subnet} ip daddr 10.244.0.0/16 return")), "{t}");
            assert!(t.contains("type filter hook forward priority filter; policy accept;"), "{t}");
        }

        // Leaving the cluster network: the node's address on the wire. Pod to pod: the pod's.
        assert_eq!(source_on_the_wire(&c, 0, 0, 9000), c.nodes[0].ip.to_string(), "{backend}: masquerade");
        c.pods[1].serve(8080);
        let line = request(&c.pods[0].ns, (c.pods[1].ip, 8080).into()).expect("pod -> pod");
        assert_eq!(line, format!("{} saw {}", c.pods[1].ip, c.pods[0].ip), "{backend}: pod to pod keeps the pod IP");

        // What kube-proxy marked 0x4000 is left to kube-proxy: flannel's rules do not masquerade it.
        let pod = c.pods[0].ip.to_string();
        let chain = "{ type filter hook prerouting priority mangle; }";
        for cmd in [
            vec!["add", "table", "ip", "kubemark"],
            vec!["add", "chain", "ip", "kubemark", "pre", chain],
            vec![
                "add", "rule", "ip", "kubemark", "pre", "ip", "saddr", &pod, "tcp", "dport", "9001", "meta", "mark",
                "set", "0x4000",
            ],
        ] {
            let out = c.nodes[0].ns.run("nft", &cmd);
            assert!(out.status.success(), "nft {cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        assert_eq!(source_on_the_wire(&c, 0, 0, 9001), pod, "{backend}: a 0x4000-marked flow must keep its source");
        assert_eq!(
            source_on_the_wire(&c, 0, 0, 9000),
            c.nodes[0].ip.to_string(),
            "{backend}: unmarked still masqueraded"
        );
    }
}

#[test]
fn a_hand_deleted_table_or_rule_comes_back_within_the_resync() {
    let c = nft_cluster("nr", 2, "vxlan");
    let restored = |what: &str| {
        let ok = wait_until(Duration::from_secs(5), || {
            let t = nft(&c, 0, &["list", "table", "ip", "flannel-ipv4"]);
            t.matches("masquerade fully-random").count() == 2 && t.contains("chain forward")
        });
        assert!(ok, "{what}: not restored:\n{}\n{}", nft(&c, 0, &["list", "ruleset"]), c.nodes[0].log());
    };
    let out = c.nodes[0].ns.run("nft", &["delete", "table", "ip", "flannel-ipv4"]);
    assert!(out.status.success());
    restored("deleted table");
    let listing = nft(&c, 0, &["-a", "list", "chain", "ip", "flannel-ipv4", "postrtg"]);
    let handle = listing
        .lines()
        .find(|l| l.contains("masquerade"))
        .and_then(|l| l.rsplit("handle ").next())
        .unwrap_or_else(|| panic!("{listing}"))
        .trim()
        .to_string();
    let out = c.nodes[0].ns.run("nft", &["delete", "rule", "ip", "flannel-ipv4", "postrtg", "handle", &handle]);
    assert!(out.status.success());
    restored("deleted rule");
    assert!(c.nodes[0].log().contains("nftables: wrote table ip flannel-ipv4"), "{}", c.nodes[0].log());
    assert!(pods_ping(&c));
}

#[test]
fn switching_iptables_to_nftables_and_back_leaves_nothing_of_the_other() {
    let mut c = Cluster::with_ready_agents("ns", 2, &netconf("vxlan"));
    c.add_pod(0);
    c.add_pod(1);
    assert!(pods_ping(&c));
    assert!(iptables_save(&c, 0).contains("-A FLANNEL-POSTRTG"));

    // Into nftables mode, on nodes where flanneld cannot run iptables at all.
    c.put_config(&nft_netconf("vxlan"));
    for i in 0..2 {
        c.stop_agent(i);
        start_nft_agent(&mut c, i);
    }
    ready(&mut c);
    for i in 0..2 {
        let ruleset = nft(&c, i, &["list", "ruleset"]);
        assert!(!ruleset.contains("FLANNEL"), "node{}: iptables chains left:\n{ruleset}", i + 1);
        assert!(!iptables_save(&c, i).contains("FLANNEL"), "node{}", i + 1);
        assert!(ruleset.contains("table ip flannel-ipv4"), "{ruleset}");
        assert!(c.nodes[i].log().contains("switch to nftables: removed iptables chain FLANNEL-POSTRTG"));
    }
    assert!(pods_ping(&c), "traffic after the switch to nftables");

    // And back.
    c.put_config(&netconf("vxlan"));
    for i in 0..2 {
        c.stop_agent(i);
        c.start_agent(i, &[]);
    }
    ready(&mut c);
    for i in 0..2 {
        assert!(!nft(&c, i, &["list", "tables"]).contains("flannel-ipv4"), "node{}: nft table left", i + 1);
        let saved = iptables_save(&c, i);
        assert!(saved.contains("-A FLANNEL-POSTRTG") && saved.contains("-A FLANNEL-FWD"), "{saved}");
        assert!(c.nodes[i].log().contains("switch to iptables: removed table ip flannel-ipv4"));
    }
    assert!(pods_ping(&c), "traffic after the switch back");
}

#[test]
fn forward_policy_drop_iptables_mode_accepts_nftables_mode_warns() {
    // iptables mode: FLANNEL-FWD sits in the same FORWARD chain as the DROP policy and accepts pod traffic.
    let mut c = Cluster::new("fd");
    c.put_config(&netconf("vxlan"));
    for i in 0..2 {
        c.add_node();
        let out = c.nodes[i].ns.run("iptables", &["-P", "FORWARD", "DROP"]);
        assert!(out.status.success());
        c.start_agent(i, &[]);
    }
    ready(&mut c);
    c.add_pod(0);
    c.add_pod(1);
    assert!(pods_ping(&c), "iptables mode must carry pod traffic through a FORWARD policy of DROP");

    // nftables mode: another table's drop policy is beyond flannel's table; flanneld says so.
    c.put_config(&nft_netconf("vxlan"));
    for i in 0..2 {
        c.stop_agent(i);
        start_nft_agent(&mut c, i);
    }
    ready(&mut c);
    let log = c.nodes[0].log();
    assert!(log.contains("ip filter/FORWARD drop forwarded packets by policy"), "{log}");
    let b = c.pods[1].ip.to_string();
    assert_eq!(c.pods[0].ns.ping(&b), None, "an iptables FORWARD policy of DROP still drops in nftables mode");
    // The operator's fix: accept flannel's network in that chain (or policy ACCEPT).
    for i in 0..2 {
        let out = c.nodes[i].ns.run("iptables", &["-P", "FORWARD", "ACCEPT"]);
        assert!(out.status.success());
    }
    assert!(pods_ping(&c));
}

#[test]
fn a_node_without_nft_fails_at_start_naming_the_flag_and_the_package() {
    let mut c = Cluster::new("nm");
    c.put_config(&nft_netconf("vxlan"));
    c.add_node();
    let empty = c.dir().join("empty-bin");
    std::fs::create_dir_all(&empty).unwrap();
    c.start_agent_env(0, &[], &[("PATH", empty.to_str().unwrap())]);
    let exited = wait_until(Duration::from_secs(10), || !c.nodes[0].agent_running());
    assert!(exited, "flanneld must not run without nft:\n{}", c.nodes[0].log());
    let log = c.nodes[0].log();
    assert!(
        log.contains("EnableNFTables is true")
            && log.contains("`nft` is not on PATH")
            && log.contains("nftables package"),
        "{log}"
    );
    assert!(nft(&c, 0, &["list", "ruleset"]).trim().is_empty(), "nothing written");
}

#[test]
fn dual_stack_in_nftables_mode_writes_both_tables_and_carries_both_families() {
    let mut c = Cluster::new("n6");
    c.enable_ipv6();
    c.put_config(
        r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","EnableNFTables":true,"Backend":{"Type":"vxlan"}}"#,
    );
    for i in 0..2 {
        c.add_node();
        start_nft_agent(&mut c, i);
    }
    ready(&mut c);
    c.add_pod(0);
    c.add_pod(1);
    assert!(pods_ping(&c));
    let b6 = c.pods[1].ip6.expect("dual-stack pod").to_string();
    let ok = wait_until(Duration::from_secs(5), || {
        let out = c.pods[0].ns.run("ping", &["-6", "-c", "1", "-W", "2", &b6]);
        out.status.success()
    });
    assert!(ok, "IPv6 between pods in nftables mode");
    assert_eq!(nft(&c, 0, &["list", "tables"]).trim(), "table ip flannel-ipv4\ntable ip6 flannel-ipv6");
    let t6 = nft(&c, 0, &["list", "table", "ip6", "flannel-ipv6"]);
    let s6 = c.nodes[0].subnet6().unwrap();
    assert!(t6.contains(&format!("ip6 saddr {s6} ip6 daddr fd00:10:244::/56 return")), "{t6}");
    assert!(t6.contains("ip6 saddr fd00:10:244::/56 ip6 daddr != ff00::/8 masquerade fully-random"), "{t6}");
    assert!(t6.contains("ip6 daddr fd00:10:244::/56 accept"), "{t6}");
}
