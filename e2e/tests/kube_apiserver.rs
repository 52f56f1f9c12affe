//! flanneld's Kubernetes mode against the real kube-apiserver (with
//! `--authorization-mode=Node,RBAC`), the agent authenticated as the
//! manifest's ServiceAccount and given only the manifest's RBAC. The binaries
//! live outside the project, so these tests are ignored by default:
//!
//! ```sh
//! bash scripts/test-kube-apiserver.sh
//! ```
//!
//! The apiserver and its etcd run in the test-bed's underlay namespace on
//! 192.0.2.254:6443, which every node reaches over `eth0`; nothing listens
//! outside the test's namespaces.

use std::net::IpAddr;
use std::time::Duration;

use e2e::cluster::{Cluster, ETCD_IP};
use e2e::kube_apiserver::{Identity, KubeApiServer};
use e2e::manifest::DaemonSet;
use e2e::wait_until;
use serde_json::{Value, json};

const P: &str = "flannel.alpha.coreos.com";
const READY: Duration = Duration::from_secs(30);

/// A cluster without nodes and an apiserver on its underlay, with the manifest's RBAC applied.
fn cluster_with_apiserver(tag: &str) -> (Cluster, KubeApiServer) {
    let c = Cluster::new(tag);
    let ip: IpAddr = ETCD_IP.parse().unwrap();
    let api = KubeApiServer::start(tag, &c.underlay, ip).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("kube-apiserver ready after {:.1?}", api.ready_after);
    // Before the manifest's RBAC the certificate alone grants nothing.
    let (code, body) = api.request(Identity::Flannel, "GET", "/api/v1/nodes", None).unwrap();
    assert_eq!(code, 403, "the flannel ServiceAccount listed nodes without any RBAC: {body}");
    let applied = api.apply_manifest_rbac().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        applied,
        ["Namespace/kube-flannel", "ServiceAccount/flannel", "ClusterRole/flannel", "ClusterRoleBinding/flannel"]
    );
    (c, api)
}

/// Starts flanneld in node `i` as the manifest's ServiceAccount, for the Node `name`,
/// with the manifest's net-conf.json.
fn start_kube_agent(c: &mut Cluster, api: &KubeApiServer, i: usize, name: &str) {
    let ds = DaemonSet::load();
    let conf = ds.config_file("net-conf.json").expect("manifest net-conf.json").to_string();
    start_kube_agent_with(c, api, i, name, &conf, &[]);
}

/// [`start_kube_agent`] with another net-conf.json and more environment.
fn start_kube_agent_with(c: &mut Cluster, api: &KubeApiServer, i: usize, name: &str, conf: &str, env: &[(&str, &str)]) {
    let netconf = c.dir().join(format!("net-conf-{name}.json"));
    std::fs::write(&netconf, conf).unwrap();
    let kubeconfig = api.kubeconfig(Identity::Flannel);
    let mut all = vec![("NODE_NAME", name)];
    all.extend_from_slice(env);
    c.start_agent_env(
        i,
        &[
            "--kube-subnet-mgr",
            &format!("--kubeconfig-file={}", kubeconfig.display()),
            &format!("--net-config-path={}", netconf.display()),
        ],
        &all,
    );
}

fn annotation(node: &Value, key: &str) -> Option<String> {
    node["metadata"]["annotations"][format!("{P}/{key}")].as_str().map(String::from)
}

fn network_unavailable_false(node: &Value) -> bool {
    node["status"]["conditions"]
        .as_array()
        .is_some_and(|cs| cs.iter().any(|c| c["type"] == "NetworkUnavailable" && c["status"] == "False"))
}

#[test]
#[ignore = "needs ../shared/reference/kubernetes: bash scripts/test-kube-apiserver.sh"]
fn manifest_rbac_is_enough_and_no_more() {
    let (mut c, api) = cluster_with_apiserver("kas");
    let (a, b, cc) = ("node-a", "node-b", "node-c");
    api.create_node(a, "10.244.1.0/24", json!({})).unwrap();
    // B is a flannel peer as upstream's agent leaves its Node; C has the same
    // annotations but not kube-subnet-manager (another subnet manager's node).
    let peer = |ip: &str, mac: &str, managed: bool| {
        let mut ann = json!({
            format!("{P}/backend-type"): "vxlan",
            format!("{P}/backend-data"): format!(r#"{{"VNI":1,"VtepMAC":"{mac}"}}"#),
            format!("{P}/public-ip"): ip,
        });
        if managed {
            ann[format!("{P}/kube-subnet-manager")] = json!("true");
        }
        ann
    };
    api.create_node(b, "10.244.2.0/24", peer("192.0.2.2", "0e:00:00:00:00:02", true)).unwrap();
    api.create_node(cc, "10.244.3.0/24", peer("192.0.2.3", "0e:00:00:00:00:03", false)).unwrap();

    c.add_node();
    start_kube_agent(&mut c, &api, 0, a);
    assert!(c.wait_ready(0, READY), "agent not ready:\n{}", c.nodes[0].log());

    // subnet.env from A's podCIDR, the manifest's Network around it.
    let env = c.nodes[0].subnet_env().unwrap_or_default();
    assert!(env.contains("FLANNEL_NETWORK=10.244.0.0/16\n"), "{env}");
    assert!(env.contains("FLANNEL_SUBNET=10.244.1.1/24\n"), "{env}");

    // What the agent published on A, through the real server.
    assert!(
        wait_until(Duration::from_secs(10), || api.node(a).is_ok_and(|n| network_unavailable_false(&n))),
        "no NetworkUnavailable=False on {a}: {}",
        api.node(a).unwrap()["status"]
    );
    let node_a = api.node(a).unwrap();
    assert_eq!(annotation(&node_a, "backend-type").as_deref(), Some("vxlan"));
    assert_eq!(annotation(&node_a, "public-ip").as_deref(), Some("192.0.2.1"));
    assert_eq!(annotation(&node_a, "kube-subnet-manager").as_deref(), Some("true"));
    let data: Value = serde_json::from_str(&annotation(&node_a, "backend-data").unwrap()).unwrap();
    let mac = c.nodes[0].ns.ip_json(&["link", "show", "flannel.1"])[0]["address"].clone();
    assert_eq!(data, json!({"VNI": 1, "VtepMAC": mac}));
    let cond = node_a["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == "NetworkUnavailable"))
        .cloned()
        .unwrap();
    assert_eq!(cond["reason"], "FlannelIsUp", "{cond}");

    // A route to B, none to C, and an agent that goes quiet (its own patches
    // come back through the real watch).
    let n = &c.nodes[0];
    assert!(
        wait_until(Duration::from_secs(10), || n
            .flannel_routes()
            .iter()
            .any(|r| r["dst"] == "10.244.2.0/24" && r["dev"] == "flannel.1")),
        "no route to {b}: {:?}",
        n.flannel_routes()
    );
    c.assert_idle();
    let routes = c.nodes[0].flannel_routes();
    assert!(
        routes.iter().all(|r| r["dst"] != "10.244.3.0/24"),
        "route to {cc}, a Node without kube-subnet-manager: {routes:?}"
    );
    assert_eq!(routes.len(), 1, "{routes:?}");

    // The ServiceAccount's rights are upstream's: patch only through nodes/status.
    let patch = json!({"metadata": {"annotations": {"e2e.example.com/probe": "x"}}});
    let smp = "application/strategic-merge-patch+json";
    let (code, body) =
        api.request(Identity::Flannel, "PATCH", &format!("/api/v1/nodes/{a}"), Some((smp, &patch))).unwrap();
    assert_eq!(code, 403, "PATCH nodes/{a} as the ServiceAccount: {body}");
    let (code, body) =
        api.request(Identity::Flannel, "PATCH", &format!("/api/v1/nodes/{a}/status"), Some((smp, &patch))).unwrap();
    assert_eq!(code, 200, "PATCH nodes/{a}/status as the ServiceAccount: {body}");
    assert_eq!(body["metadata"]["annotations"]["e2e.example.com/probe"], "x");
    for (method, path, why) in [
        ("GET", "/api/v1/pods", "pods: get, not list"),
        ("DELETE", &format!("/api/v1/nodes/{cc}") as &str, "nodes: no delete"),
    ] {
        let (code, body) = api.request(Identity::Flannel, method, path, None).unwrap();
        assert_eq!(code, 403, "{method} {path} ({why}): {body}");
    }
    assert!(c.nodes[0].agent_running(), "{}", c.nodes[0].log());
}

#[test]
#[ignore = "needs ../shared/reference/kubernetes: bash scripts/test-kube-apiserver.sh"]
fn node_public_ip_annotation_picks_the_interface() {
    let (mut c, api) = cluster_with_apiserver("kai");
    let a = "node-a";
    api.create_node(a, "10.244.1.0/24", json!({format!("{P}/node-public-ip"): "198.51.100.7"})).unwrap();
    c.add_node();
    // A second uplink inside the node: a veth pair whose both ends stay there.
    let ns = &c.nodes[0].ns;
    ns.ip(&["link", "add", "pub0", "type", "veth", "peer", "name", "pub1"]);
    ns.ip(&["addr", "add", "198.51.100.7/24", "dev", "pub0"]);
    ns.ip(&["link", "set", "pub0", "up"]);
    ns.ip(&["link", "set", "pub1", "up"]);

    start_kube_agent(&mut c, &api, 0, a);
    assert!(c.wait_ready(0, READY), "agent not ready:\n{}", c.nodes[0].log());
    assert!(
        wait_until(Duration::from_secs(10), || api
            .node(a)
            .is_ok_and(|n| annotation(&n, "public-ip").as_deref() == Some("198.51.100.7"))),
        "public-ip of {a}: {:?}\n{}",
        annotation(&api.node(a).unwrap(), "public-ip"),
        c.nodes[0].log()
    );
    let link = &c.nodes[0].ns.ip_json(&["-d", "link", "show", "flannel.1"])[0];
    assert_eq!(link["linkinfo"]["info_data"]["local"], "198.51.100.7", "{link}");
    assert_eq!(link["linkinfo"]["info_data"]["link"], "pub0", "{link}");
}

#[test]
#[ignore = "needs ../shared/reference/kubernetes: bash scripts/test-kube-apiserver.sh"]
fn wireguard_nodes_through_the_real_apiserver() {
    use e2e::wireguard::{device_peers, public_key};
    let (mut c, api) = cluster_with_apiserver("kaw");
    let conf = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"wireguard"}}"#;
    for (i, (name, cidr)) in [("node-a", "10.244.1.0/24"), ("node-b", "10.244.2.0/24")].into_iter().enumerate() {
        api.create_node(name, cidr, json!({})).unwrap();
        c.add_node();
        let dir = c.nodes[i].dir.clone();
        let (key, socks) = (dir.join("wgkey"), dir.join("wg"));
        let env = [("WIREGUARD_KEY_FILE", key.to_str().unwrap()), ("FLANNEL_WG_SOCKET_DIR", socks.to_str().unwrap())];
        start_kube_agent_with(&mut c, &api, i, name, conf, &env);
    }
    for i in 0..2 {
        assert!(c.wait_ready(i, READY), "node{}:\n{}", i + 1, c.nodes[i].log());
    }
    for (i, name) in ["node-a", "node-b"].into_iter().enumerate() {
        let node = api.node(name).unwrap();
        assert_eq!(annotation(&node, "backend-type").as_deref(), Some("wireguard"));
        let data: Value = serde_json::from_str(&annotation(&node, "backend-data").unwrap()).unwrap();
        let key = std::fs::read_to_string(c.nodes[i].dir.join("wgkey")).unwrap();
        assert_eq!(data, json!({"PublicKey": public_key(&key), "Port": 51820}));
        let meshed = wait_until(Duration::from_secs(10), || device_peers(&c.nodes[i], "flannel-wg").len() == 1);
        assert!(meshed, "{name}: {:?}\n{}", device_peers(&c.nodes[i], "flannel-wg"), c.nodes[i].log());
    }
    c.add_pod(0);
    let b = c.add_pod(1).ip.to_string();
    assert!(wait_until(Duration::from_secs(10), || c.pods[0].ns.ping(&b) == Some(62)), "pod to pod over wireguard");
    c.assert_idle();
}
