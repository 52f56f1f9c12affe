//! Dual-stack networks (`EnableIPv6`): IPv6 subnets leased beside the IPv4
//! ones in upstream's key form, an IPv6 VXLAN device (`flannel-v6.<VNI>`) or
//! IPv6 host-gw routes, and pods on different nodes reaching each other over
//! both families.

use std::time::Duration;

use e2e::cluster::{Cluster, PREFIX};
use e2e::wait_until;

const READY: Duration = Duration::from_secs(30);

fn netconf(backend: &str) -> String {
    format!(
        r#"{{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{{"Type":"{backend}"}}}}"#
    )
}

fn cluster(backend: &str) -> Cluster {
    let mut c = Cluster::new("ds");
    c.enable_ipv6();
    c.put_config(&netconf(backend));
    for i in 0..2 {
        c.add_node();
        c.start_agent(i, &[]);
    }
    for i in 0..2 {
        assert!(c.wait_ready(i, READY), "node{}: {}", i + 1, c.nodes[i].log());
    }
    c
}

/// `ping -6` from a pod; the reply's hop limit.
fn ping6(c: &Cluster, from: usize, to: &str) -> Option<u32> {
    let out = c.pods[from].ns.run("ping", &["-6", "-c", "1", "-W", "2", to]);
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .find_map(|w| w.strip_prefix("ttl=").or_else(|| w.strip_prefix("hlim=")))
        .and_then(|t| t.parse().ok())
}

#[test]
fn vxlan_dual_stack() {
    let mut c = cluster("vxlan");
    for (i, n) in c.nodes.iter().enumerate() {
        let env = n.subnet_env().unwrap();
        assert!(env.contains("FLANNEL_IPV6_NETWORK=fd00:10:244::/56\n"), "{env}");
        assert!(env.contains("FLANNEL_MTU=1430\n"), "pods must fit the IPv6 tunnel: {env}");
        let s6 = n.subnet6().unwrap_or_else(|| panic!("node{}: no IPv6 subnet in {env}", i + 1));
        assert!(s6.starts_with("fd00:10:244:") && s6.ends_with("/64"), "{s6}");
        let link = n.ns.ip_json(&["-d", "link", "show", "flannel-v6.1"]);
        assert_eq!(link[0]["mtu"], 1430);
        assert_eq!(link[0]["linkinfo"]["info_data"]["local6"], n.ip6.unwrap().to_string());
        // Upstream's dual-stack key and value.
        let key = format!("{PREFIX}/subnets/{}&{}", n.subnet().unwrap().replace('/', "-"), s6.replace('/', "-"));
        let raw = c.etcdctl(&["get", &key, "--print-value-only"]);
        let v: serde_json::Value = serde_json::from_str(raw.trim()).unwrap_or_else(|e| panic!("{key}: {e}: {raw:?}"));
        assert_eq!(v["PublicIPv6"], n.ip6.unwrap().to_string());
        assert_eq!(v["BackendV6Data"]["VtepMAC"], link[0]["address"]);
    }
    for (i, j) in [(0, 1), (1, 0)] {
        let peer6 = c.nodes[j].subnet6().unwrap();
        let n = &c.nodes[i];
        let ok = wait_until(Duration::from_secs(10), || {
            n.flannel_routes6().iter().any(|r| r["dst"] == peer6.as_str() && r["dev"] == "flannel-v6.1")
        });
        assert!(ok, "node{}: {:?}", i + 1, n.flannel_routes6());
    }
    c.add_pod(0);
    c.add_pod(1);
    let (a6, b6) = (c.pods[0].ip6.expect("pod IPv6"), c.pods[1].ip6.expect("pod IPv6"));
    // The very first packet is answered: cni0 skips duplicate address detection, so node2
    // can solicit pod b's address at once (it used to wait 1-2 s for cni0's link-local).
    assert_eq!(ping6(&c, 0, &b6.to_string()), Some(62), "{a6} -> {b6}");
    assert_eq!(c.pods[0].ns.ping(&c.pods[1].ip.to_string()), Some(62));
    // Nothing keeps waking passes (IPv6 devices come with kernel-made routes and addresses).
    c.assert_idle();

    // The IPv6 VTEP comes back like the IPv4 one.
    let mac = c.nodes[0].ns.ip_json(&["link", "show", "flannel-v6.1"])[0]["address"].clone();
    c.nodes[0].ns.ip(&["link", "del", "flannel-v6.1"]);
    assert!(wait_until(Duration::from_secs(5), || ping6(&c, 0, &b6.to_string()) == Some(62)));
    assert_eq!(c.nodes[0].ns.ip_json(&["link", "show", "flannel-v6.1"])[0]["address"], mac);
}

#[test]
fn host_gw_dual_stack() {
    let mut c = cluster("host-gw");
    let peer6 = c.nodes[1].subnet6().unwrap();
    let n = &c.nodes[0];
    let ok = wait_until(Duration::from_secs(10), || {
        n.flannel_routes6()
            .iter()
            .any(|r| r["dst"] == peer6.as_str() && r["gateway"] == "2001:db8::2" && r["dev"] == "eth0")
    });
    assert!(ok, "{:?}", n.flannel_routes6());
    assert!(n.subnet_env().unwrap().contains("FLANNEL_MTU=1500\n"));
    c.add_pod(0);
    c.add_pod(1);
    let b6 = c.pods[1].ip6.expect("pod IPv6").to_string();
    // Node1 forwards through its uplink, soliciting node2 from eth0's link-local address; the
    // test-bed's nodes are seconds old and that address may still be in DAD (real nodes' are not).
    assert!(wait_until(Duration::from_secs(10), || ping6(&c, 0, &b6) == Some(62)));
    c.assert_idle();
    // IPv6 masquerade rules beside the IPv4 ones.
    let nat6 = e2e::cluster::run_in(&c.nodes[0].ns, "ip6tables-save", &["-t", "nat"]);
    assert!(nat6.contains("-A FLANNEL-POSTRTG -s fd00:10:244::/56 ! -d ff00::/8"), "{nat6}");
}

/// IPv6-only (`EnableIPv4: false`), as upstream: an underlay without IPv4
/// (etcd reached over IPv6), an IPv6 lease in upstream's key form
/// (`0.0.0.0-0&<v6>-64`, PublicIP 0.0.0.0), subnet.env with the IPv6 keys
/// only, `flannel-v6.<VNI>` or IPv6 host-gw routes, IPv6-only pods from the
/// plugin, and pods pinging across nodes.
fn ipv6_only(backend: &str) {
    let mut c = Cluster::new("v6");
    c.ipv6_only();
    c.put_config(&format!(
        r#"{{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{{"Type":"{backend}"}}}}"#
    ));
    for i in 0..2 {
        c.add_node();
        assert!(!c.nodes[i].ns.ip(&["-4", "addr", "show", "dev", "eth0"]).contains("inet "), "eth0 has IPv4");
        c.start_agent(i, &[]);
    }
    for i in 0..2 {
        assert!(c.wait_ready(i, READY), "node{}: {}", i + 1, c.nodes[i].log());
    }
    for n in &c.nodes {
        let env = n.subnet_env().unwrap();
        assert!(!env.contains("FLANNEL_NETWORK") && !env.contains("FLANNEL_SUBNET="), "IPv4 keys: {env}");
        assert!(env.contains("FLANNEL_IPV6_NETWORK=fd00:10:244::/56\n"), "{env}");
        let s6 = n.subnet6().unwrap();
        let key = format!("{PREFIX}/subnets/0.0.0.0-0&{}", s6.replace('/', "-"));
        let raw = c.etcdctl(&["get", &key, "--print-value-only"]);
        let v: serde_json::Value = serde_json::from_str(raw.trim()).unwrap_or_else(|e| panic!("{key}: {e}: {raw:?}"));
        assert_eq!(
            (v["PublicIP"].as_str(), v["PublicIPv6"].as_str()),
            (Some("0.0.0.0"), Some(n.ip6.unwrap().to_string().as_str()))
        );
        if backend == "vxlan" {
            assert!(env.contains("FLANNEL_MTU=1430\n"), "{env}");
            let link = n.ns.ip_json(&["-d", "link", "show", "flannel-v6.1"]);
            assert_eq!(link[0]["linkinfo"]["info_data"]["local6"], n.ip6.unwrap().to_string());
            assert_eq!(v["BackendV6Data"]["VtepMAC"], link[0]["address"]);
            assert!(n.ns.try_ip_json(&["link", "show", "flannel.1"]).is_none(), "no IPv4 VTEP");
        }
    }
    for (i, j) in [(0, 1), (1, 0)] {
        let peer6 = c.nodes[j].subnet6().unwrap();
        let n = &c.nodes[i];
        let ok = wait_until(Duration::from_secs(10), || n.flannel_routes6().iter().any(|r| r["dst"] == peer6.as_str()));
        assert!(ok, "node{}: {:?}\n{}", i + 1, n.flannel_routes6(), n.log());
        assert!(n.flannel_routes().is_empty(), "IPv4 routes on an IPv6-only node: {:?}", n.flannel_routes());
    }
    c.add_pod(0);
    c.add_pod(1);
    assert!(c.pods[0].ip.is_unspecified(), "an IPv6-only pod got IPv4 {}", c.pods[0].ip);
    let b6 = c.pods[1].ip6.expect("pod IPv6").to_string();
    let ok = wait_until(Duration::from_secs(10), || ping6(&c, 0, &b6) == Some(62));
    assert!(ok, "-> {b6}\n{}\n{}", c.nodes[0].log(), c.nodes[1].log());
    let a6 = c.pods[0].ip6.expect("pod IPv6").to_string();
    assert_eq!(ping6(&c, 1, &a6), Some(62), "-> {a6}");
    c.assert_idle();
    // A restart keeps the IPv6 subnet (it is the lease's key here).
    let s6 = c.nodes[0].subnet6();
    c.start_agent(0, &[]);
    assert!(c.wait_ready(0, READY), "{}", c.nodes[0].log());
    assert_eq!(c.nodes[0].subnet6(), s6);
    assert_eq!(c.leases().len(), 2, "{:?}", c.leases());
}

#[test]
fn ipv6_only_vxlan() {
    ipv6_only("vxlan");
}

#[test]
fn ipv6_only_host_gw() {
    ipv6_only("host-gw");
}
