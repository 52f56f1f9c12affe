//! Two flanneld agents in Kubernetes mode, each in its own namespace node,
//! against a small in-process stand-in for the API server's Node endpoints
//! (get, list, watch, strategic-merge patch of nodes and nodes/status) that
//! speaks the real JSON. What is checked is what an operator would see: the
//! annotations each agent publishes, `NetworkUnavailable=False`, the routes
//! to each other, and pods on the two nodes pinging each other.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use e2e::cluster::Cluster;
use e2e::wait_until;
use serde_json::{Value, json};

const P: &str = "flannel.alpha.coreos.com";

#[derive(Default)]
struct State {
    rv: u64,
    nodes: BTreeMap<String, Value>,
    /// (resourceVersion, watch event) in order.
    events: Vec<(u64, Value)>,
    /// Content types seen on PATCH requests.
    patch_types: Vec<String>,
}

#[derive(Clone, Default)]
struct FakeApi(Arc<(Mutex<State>, Condvar)>);

fn merge(dst: &mut Value, src: &Value) {
    match (dst, src) {
        (Value::Object(d), Value::Object(s)) => {
            for (k, v) in s {
                merge(d.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (d, s) => *d = s.clone(),
    }
}

impl FakeApi {
    fn put_node(&self, name: &str, cidr: &str, annotations: Value) {
        self.put_node_cidrs(name, &[cidr], annotations);
    }

    /// A node with one podCIDR per family (dual-stack: IPv4 first, as Kubernetes orders them).
    fn put_node_cidrs(&self, name: &str, cidrs: &[&str], annotations: Value) {
        let cidr = cidrs[0];
        let (m, cv) = &*self.0;
        let mut st = m.lock().unwrap();
        st.rv += 1;
        let rv = st.rv;
        let node = json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "resourceVersion": rv.to_string(), "annotations": annotations},
            "spec": {"podCIDR": cidr, "podCIDRs": cidrs},
            "status": {"conditions": []},
        });
        let kind = if st.nodes.contains_key(name) { "MODIFIED" } else { "ADDED" };
        st.nodes.insert(name.to_string(), node.clone());
        st.events.push((rv, json!({"type": kind, "object": node})));
        cv.notify_all();
    }

    fn delete_node(&self, name: &str) {
        let (m, cv) = &*self.0;
        let mut st = m.lock().unwrap();
        if let Some(mut node) = st.nodes.remove(name) {
            st.rv += 1;
            let rv = st.rv;
            node["metadata"]["resourceVersion"] = json!(rv.to_string());
            st.events.push((rv, json!({"type": "DELETED", "object": node})));
            cv.notify_all();
        }
    }

    fn node(&self, name: &str) -> Value {
        self.0.0.lock().unwrap().nodes.get(name).cloned().unwrap_or(Value::Null)
    }

    /// Serves HTTP/1.1 on a listener (one per node namespace, shared state).
    fn serve(&self, listener: TcpListener) {
        let api = self.clone();
        std::thread::spawn(move || {
            for s in listener.incoming().flatten() {
                let api = api.clone();
                std::thread::spawn(move || api.connection(s));
            }
        });
    }

    fn connection(&self, s: TcpStream) {
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut w = s;
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let mut parts = line.split_whitespace();
            let (method, target) = (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("").to_string());
            let mut headers = BTreeMap::new();
            loop {
                let mut h = String::new();
                if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                    break;
                }
                if let Some((k, v)) = h.split_once(':') {
                    headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
                }
            }
            let len: usize = headers.get("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
            let mut body = vec![0u8; len];
            if r.read_exact(&mut body).is_err() {
                return;
            }
            let (path, query) = target.split_once('?').unwrap_or((&target, ""));
            if method == "GET" && path == "/api/v1/nodes" && query.contains("watch=true") {
                let from: u64 = query
                    .split('&')
                    .find_map(|kv| kv.strip_prefix("resourceVersion="))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                self.watch(w, from);
                return;
            }
            let (code, out) = self.handle(&method, path, headers.get("content-type"), &body);
            let text = out.to_string();
            let head = format!(
                "HTTP/1.1 {code} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                text.len()
            );
            if w.write_all(head.as_bytes()).and_then(|_| w.write_all(text.as_bytes())).is_err() {
                return;
            }
        }
    }

    fn handle(&self, method: &str, path: &str, ctype: Option<&String>, body: &[u8]) -> (u16, Value) {
        let (m, cv) = &*self.0;
        let mut st = m.lock().unwrap();
        if method == "GET" && path == "/api/v1/nodes" {
            let items: Vec<Value> = st.nodes.values().cloned().collect();
            return (
                200,
                json!({"apiVersion":"v1","kind":"NodeList","metadata":{"resourceVersion": st.rv.to_string()},"items": items}),
            );
        }
        let rest = path.strip_prefix("/api/v1/nodes/").unwrap_or("");
        let (name, status) = match rest.strip_suffix("/status") {
            Some(n) => (n.to_string(), true),
            None => (rest.to_string(), false),
        };
        let not_found = json!({"kind":"Status","apiVersion":"v1","status":"Failure","reason":"NotFound","code":404});
        match method {
            "GET" => match st.nodes.get(&name) {
                Some(n) => (200, n.clone()),
                None => (404, not_found),
            },
            "PATCH" => {
                st.patch_types.push(ctype.cloned().unwrap_or_default());
                let patch: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
                st.rv += 1;
                let rv = st.rv;
                let Some(node) = st.nodes.get_mut(&name) else { return (404, not_found) };
                if status {
                    // Strategic merge keys conditions by type.
                    let conds = node["status"]["conditions"].as_array_mut().expect("conditions");
                    for c in patch["status"]["conditions"].as_array().into_iter().flatten() {
                        conds.retain(|old| old["type"] != c["type"]);
                        conds.push(c.clone());
                    }
                } else {
                    merge(&mut node["metadata"], &patch["metadata"]);
                }
                node["metadata"]["resourceVersion"] = json!(rv.to_string());
                let node = node.clone();
                st.events.push((rv, json!({"type": "MODIFIED", "object": node.clone()})));
                cv.notify_all();
                (200, node)
            }
            _ => (405, json!({"kind":"Status","code":405})),
        }
    }

    /// A chunked stream of every event after `from`, held open.
    fn watch(&self, mut w: TcpStream, mut from: u64) {
        let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
        if w.write_all(head.as_bytes()).is_err() {
            return;
        }
        let (m, cv) = &*self.0;
        loop {
            let batch: Vec<(u64, Value)> = {
                let mut st = m.lock().unwrap();
                while !st.events.iter().any(|(rv, _)| *rv > from) {
                    st = cv.wait_timeout(st, Duration::from_secs(1)).unwrap().0;
                }
                st.events.iter().filter(|(rv, _)| *rv > from).cloned().collect()
            };
            for (rv, ev) in batch {
                let line = format!("{ev}\n");
                let chunk = format!("{:x}\r\n{line}\r\n", line.len());
                if w.write_all(chunk.as_bytes()).is_err() {
                    return;
                }
                from = rv;
            }
        }
    }
}

/// Two namespace nodes (n1, n2) running flanneld in Kubernetes mode against `api`.
fn start_agents(c: &mut Cluster, api: &FakeApi, netconf_json: &str) {
    let netconf = c.dir().join("net-conf.json");
    std::fs::write(&netconf, netconf_json).unwrap();
    let kubeconfig = c.dir().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://127.0.0.1:6443\n\
         users:\n- name: u\n  user: {}\ncontexts:\n- name: c\n  context:\n    cluster: fake\n    user: u\n\
         current-context: c\n",
    )
    .unwrap();
    for (i, name) in ["n1", "n2"].iter().enumerate() {
        c.add_node();
        api.serve(c.nodes[i].ns.tcp_listen("127.0.0.1:6443".parse().unwrap()).unwrap());
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
    assert!(wait_until(Duration::from_secs(10), || ping6(&c)));
    c.assert_idle();
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
