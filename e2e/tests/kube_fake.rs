//! Two flanneld agents in Kubernetes mode, each in its own namespace node,
//! against a small in-process stand-in for the API server's Node endpoints
//! (get, list, watch, strategic-merge patch of nodes and nodes/status) that
//! speaks the real JSON. What is checked is what an operator would see: the
//! annotations each agent publishes, `NetworkUnavailable=False`, the routes
//! to each other, and pods on the two nodes pinging each other.

use std::time::Duration;

use e2e::cluster::Cluster;
use e2e::kube_api::FakeApi;
use e2e::wait_until;
use serde_json::{Value, json};

const P: &str = "flannel.alpha.coreos.com";

/// Two namespace nodes (n1, n2) running flanneld in Kubernetes mode against `api`.
fn start_agents(c: &mut Cluster, api: &FakeApi, netconf_json: &str) {
    let netconf = c.dir().join("net-conf.json");
    std::fs::write(&netconf, netconf_json).unwrap();
    let kubeconfig = e2e::kube_api::kubeconfig(c.dir());
    for (i, name) in ["n1", "n2"].iter().enumerate() {
        c.add_node();
        api.serve(c.nodes[i].ns.tcp_listen(e2e::kube_api::ADDR.parse().unwrap()).unwrap());
        c.start_agent_env(
            i,
            &[
                "--kube-subnet-mgr",
                &format!("--kubeconfig-file={}", kubeconfig.display()),
                &format!("--net-config-path={}", netconf.display()),
            ],
            &[("NODE_NAME", name)],
        );
    }
}

/// Node 1 routes to node 2's IPv6 subnet over `flannel-v6.1`, and a pod on
/// node 1 pings one on node 2 over IPv6 (two hops: hop limit 62).
fn ipv6_pods_reach_each_other(c: &mut Cluster) {
    let n = &c.nodes[0];
    assert!(wait_until(Duration::from_secs(10), || n
        .flannel_routes6()
        .iter()
        .any(|r| r["dst"] == "fd00:10:244:2::/64" && r["dev"] == "flannel-v6.1")));
    c.add_pod(0);
    c.add_pod(1);
    let b6 = c.pods[1].ip6.expect("pod IPv6").to_string();
    let ping6 = |c: &Cluster| {
        let out = c.pods[0].ns.run("ping", &["-6", "-c", "1", "-W", "2", &b6]);
        String::from_utf8_lossy(&out.stdout).contains("ttl=62")
    };
    assert!(wait_until(Duration::from_secs(10), || ping6(c)));
    c.assert_idle();
}

#[test]
fn two_kube_mode_agents_publish_annotations_and_route_to_each_other() {
    let api = FakeApi::default();
    api.put_node("n1", "10.244.1.0/24", json!({}));
    api.put_node("n2", "10.244.2.0/24", json!({}));

    let mut c = Cluster::new("kf");
    start_agents(&mut c, &api, r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#);
    for i in 0..2 {
        assert!(c.wait_ready(i, Duration::from_secs(30)), "{}", c.nodes[i].log());
    }
    assert_eq!(c.nodes[0].subnet().as_deref(), Some("10.244.1.0/24"));
    assert_eq!(c.nodes[1].subnet().as_deref(), Some("10.244.2.0/24"));

    // The annotations upstream's agents read, with the VTEP's real MAC.
    let n1 = api.node("n1");
    let ann = &n1["metadata"]["annotations"];
    assert_eq!(ann[format!("{P}/backend-type")], "vxlan");
    assert_eq!(ann[format!("{P}/public-ip")], "192.0.2.1");
    assert_eq!(ann[format!("{P}/kube-subnet-manager")], "true");
    let data: Value = serde_json::from_str(ann[format!("{P}/backend-data")].as_str().unwrap()).unwrap();
    let mac = c.nodes[0].ns.ip_json(&["link", "show", "flannel.1"])[0]["address"].clone();
    assert_eq!(data["VtepMAC"], mac);
    assert_eq!(data["VNI"], 1);
    assert!(wait_until(Duration::from_secs(10), || {
        api.node("n1")["status"]["conditions"].as_array().is_some_and(|cs| {
            cs.iter()
                .any(|c| c["type"] == "NetworkUnavailable" && c["status"] == "False" && c["reason"] == "FlannelIsUp")
        })
    }));
    let types = api.0.0.lock().unwrap().patch_types.clone();
    assert!(!types.is_empty() && types.iter().all(|t| t == "application/strategic-merge-patch+json"), "{types:?}");

    // Each agent learnt the other from the watch: routes, and pods that talk.
    for (i, peer) in [(0, "10.244.2.0/24"), (1, "10.244.1.0/24")] {
        let n = &c.nodes[i];
        assert!(
            wait_until(Duration::from_secs(10), || n
                .flannel_routes()
                .iter()
                .any(|r| r["dst"] == peer && r["dev"] == "flannel.1")),
            "node{}: {:?}",
            i + 1,
            n.flannel_routes()
        );
    }
    c.add_pod(0);
    let b = c.add_pod(1).ip.to_string();
    assert_eq!(c.pods[0].ns.ping(&b), Some(62));
    // Patching our own Node comes back as a watch event; it must not start a loop.
    c.assert_idle();

    // A node joining (annotated by its own agent elsewhere) and one leaving.
    api.put_node(
        "n3",
        "10.244.3.0/24",
        json!({
            format!("{P}/backend-type"): "vxlan",
            format!("{P}/backend-data"): r#"{"VNI":1,"VtepMAC":"0e:00:00:00:00:03"}"#,
            format!("{P}/public-ip"): "192.0.2.3",
            format!("{P}/kube-subnet-manager"): "true",
        }),
    );
    let n = &c.nodes[0];
    assert!(wait_until(Duration::from_secs(10), || n.flannel_routes().iter().any(|r| r["dst"] == "10.244.3.0/24")));
    api.delete_node("n3");
    assert!(wait_until(Duration::from_secs(10), || n.flannel_routes().iter().all(|r| r["dst"] != "10.244.3.0/24")));
}

#[test]
fn dual_stack_from_pod_cidrs() {
    let api = FakeApi::default();
    api.put_node_cidrs("n1", &["10.244.1.0/24", "fd00:10:244:1::/64"], json!({}));
    api.put_node_cidrs("n2", &["10.244.2.0/24", "fd00:10:244:2::/64"], json!({}));
    let mut c = Cluster::new("kd");
    c.enable_ipv6();
    start_agents(
        &mut c,
        &api,
        r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"vxlan"}}"#,
    );
    for i in 0..2 {
        assert!(c.wait_ready(i, Duration::from_secs(30)), "{}", c.nodes[i].log());
    }
    assert_eq!(c.nodes[0].subnet6().as_deref(), Some("fd00:10:244:1::/64"));
    let ann = api.node("n1")["metadata"]["annotations"].clone();
    assert_eq!(ann[format!("{P}/public-ipv6")], "2001:db8::1");
    let data: Value = serde_json::from_str(ann[format!("{P}/backend-v6-data")].as_str().unwrap()).unwrap();
    assert_eq!(data["VtepMAC"], c.nodes[0].ns.ip_json(&["link", "show", "flannel-v6.1"])[0]["address"]);
    ipv6_pods_reach_each_other(&mut c);
}

/// A peer that was in the agents' first Node listing and later loses its
/// flannel annotations (flannel removed there, or another CNI took over) is
/// dropped: no route to it stays behind.
#[test]
fn a_node_from_the_first_listing_losing_its_annotations_is_dropped() {
    let api = FakeApi::default();
    api.put_node("n1", "10.244.1.0/24", json!({}));
    api.put_node("n2", "10.244.2.0/24", json!({}));
    let annotated = json!({
        format!("{P}/backend-type"): "vxlan",
        format!("{P}/backend-data"): r#"{"VNI":1,"VtepMAC":"0e:00:00:00:00:03"}"#,
        format!("{P}/public-ip"): "192.0.2.3",
        format!("{P}/kube-subnet-manager"): "true",
    });
    api.put_node("n3", "10.244.3.0/24", annotated);
    let mut c = Cluster::new("ka");
    start_agents(&mut c, &api, r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#);
    for i in 0..2 {
        assert!(c.wait_ready(i, Duration::from_secs(30)), "{}", c.nodes[i].log());
    }
    let to_n3 = |n: &e2e::cluster::Node| n.flannel_routes().iter().any(|r| r["dst"] == "10.244.3.0/24");
    for n in &c.nodes {
        assert!(wait_until(Duration::from_secs(10), || to_n3(n)), "{}: {:?}", n.ns.name(), n.flannel_routes());
    }
    api.put_node("n3", "10.244.3.0/24", json!({}));
    for n in &c.nodes {
        assert!(wait_until(Duration::from_secs(10), || !to_n3(n)), "{}: {:?}", n.ns.name(), n.flannel_routes());
    }
}

/// IPv6-only in Kubernetes mode: Nodes with an IPv6 podCIDR only, an
/// underlay without IPv4; the agents publish the IPv6 half only and their
/// pods (IPv6 only) reach each other.
#[test]
fn ipv6_only_from_pod_cidrs() {
    let api = FakeApi::default();
    api.put_node_cidrs("n1", &["fd00:10:244:1::/64"], json!({}));
    api.put_node_cidrs("n2", &["fd00:10:244:2::/64"], json!({}));
    let mut c = Cluster::new("k6");
    c.ipv6_only();
    start_agents(
        &mut c,
        &api,
        r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"vxlan"}}"#,
    );
    for i in 0..2 {
        assert!(c.wait_ready(i, Duration::from_secs(30)), "{}", c.nodes[i].log());
    }
    let ann = api.node("n1")["metadata"]["annotations"].clone();
    assert_eq!(ann[format!("{P}/public-ipv6")], "2001:db8::1");
    assert!(ann.get(format!("{P}/public-ip")).is_none(), "an IPv4 half published: {ann}");
    assert!(c.nodes[0].subnet_env().unwrap().contains("FLANNEL_IPV6_SUBNET=fd00:10:244:1::1/64"));
    ipv6_pods_reach_each_other(&mut c);
}

/// The wireguard backend in Kubernetes mode: the annotations carry the key as
/// upstream's do, peers come and go on the device with their Nodes.
#[test]
fn wireguard_in_kube_mode() {
    use e2e::wireguard::device_peers;
    let api = FakeApi::default();
    api.put_node("n1", "10.244.1.0/24", json!({}));
    api.put_node("n2", "10.244.2.0/24", json!({}));
    let mut c = Cluster::new("kw");
    let netconf = c.dir().join("net-conf.json");
    std::fs::write(&netconf, r#"{"Network":"10.244.0.0/16","Backend":{"Type":"wireguard"}}"#).unwrap();
    let kubeconfig = e2e::kube_api::kubeconfig(c.dir());
    for (i, name) in ["n1", "n2"].iter().enumerate() {
        c.add_node();
        api.serve(c.nodes[i].ns.tcp_listen(e2e::kube_api::ADDR.parse().unwrap()).unwrap());
        let dir = c.nodes[i].dir.clone();
        let (key, socks) = (dir.join("wgkey"), dir.join("wg"));
        c.start_agent_env(
            i,
            &[
                "--kube-subnet-mgr",
                &format!("--kubeconfig-file={}", kubeconfig.display()),
                &format!("--net-config-path={}", netconf.display()),
            ],
            &[
                ("NODE_NAME", name),
                ("WIREGUARD_KEY_FILE", key.to_str().unwrap()),
                ("FLANNEL_WG_SOCKET_DIR", socks.to_str().unwrap()),
            ],
        );
    }
    for i in 0..2 {
        assert!(c.wait_ready(i, Duration::from_secs(30)), "{}", c.nodes[i].log());
    }
    let ann = api.node("n1")["metadata"]["annotations"].clone();
    assert_eq!(ann[format!("{P}/backend-type")], "wireguard");
    let data: Value = serde_json::from_str(ann[format!("{P}/backend-data")].as_str().unwrap()).unwrap();
    let key = std::fs::read_to_string(c.nodes[0].dir.join("wgkey")).unwrap();
    assert_eq!(data, json!({"PublicKey": e2e::wireguard::public_key(&key), "Port": 51820}));
    assert!(wait_until(Duration::from_secs(10), || device_peers(&c.nodes[0], "flannel-wg").len() == 1));
    c.add_pod(0);
    let b = c.add_pod(1).ip.to_string();
    assert!(wait_until(Duration::from_secs(10), || c.pods[0].ns.ping(&b) == Some(62)));
    c.assert_idle();

    // A Node annotated by an upstream v0.21 wireguard agent (no Port) joins, then leaves.
    let pk = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=";
    api.put_node(
        "n3",
        "10.244.3.0/24",
        json!({
            format!("{P}/backend-type"): "wireguard",
            format!("{P}/backend-data"): format!(r#"{{"PublicKey":"{pk}"}}"#),
            format!("{P}/public-ip"): "192.0.2.3",
            format!("{P}/kube-subnet-manager"): "true",
        }),
    );
    let n = &c.nodes[0];
    let joined = wait_until(Duration::from_secs(10), || {
        device_peers(n, "flannel-wg").iter().any(|p| p.1 == "192.0.2.3:51820" && p.2 == ["10.244.3.0/24"])
    });
    assert!(joined, "{:?}", device_peers(n, "flannel-wg"));
    api.delete_node("n3");
    assert!(wait_until(Duration::from_secs(10), || device_peers(n, "flannel-wg").len() == 1));
}
