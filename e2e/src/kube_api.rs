//! A small in-process stand-in for the Kubernetes API server's Node endpoints
//! (get, list with `limit`/`continue` pages, watch, strategic-merge patch of
//! nodes and nodes/status) that speaks the real JSON. It serves the agent's
//! Kubernetes mode in the tests and in `e2e scale --kube` where the real
//! apiserver (`../shared/reference/kubernetes`, see [`crate::kube_apiserver`])
//! is absent. As the real one: a list with `resourceVersion=0` is answered
//! whole from the "cache" (`limit` ignored, no `continue`), and a PATCH of
//! nodes/status takes metadata and status (conditions and addresses merged by
//! `type`, other lists replaced), each write a MODIFIED watch event.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

#[derive(Default)]
pub struct State {
    rv: u64,
    nodes: BTreeMap<String, Value>,
    /// Each node serialized once per change, so a 5,000-Node listing costs the
    /// stand-in little next to the agent (an API server serves lists from its cache).
    json: BTreeMap<String, String>,
    /// (resourceVersion, watch event) in order.
    events: Vec<(u64, Value)>,
    /// Content types seen on PATCH requests.
    pub patch_types: Vec<String>,
    /// The query of every Node list (not watch) request, in order.
    pub list_queries: Vec<String>,
    /// `status` of nodes put from now on (default: no conditions).
    pub status: Option<Value>,
}

#[derive(Clone, Default)]
pub struct FakeApi(pub Arc<(Mutex<State>, Condvar)>);

/// A strategic merge patch as the API server applies one to a Node: maps merged
/// (a `null` deletes the key), lists with a merge key (`conditions` and `addresses`,
/// keyed by `type`) merged element by element, every other list replaced.
fn merge(dst: &mut Value, src: &Value) {
    match (dst, src) {
        (Value::Object(d), Value::Object(s)) => {
            for (k, v) in s {
                if v.is_null() {
                    d.remove(k);
                } else if (k == "conditions" || k == "addresses")
                    && let (Some(Value::Array(old)), Value::Array(new)) = (d.get_mut(k), v)
                {
                    for item in new {
                        match old.iter_mut().find(|o| o["type"] == item["type"]) {
                            Some(o) => merge(o, item),
                            None => old.push(item.clone()),
                        }
                    }
                } else {
                    merge(d.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (d, s) => *d = s.clone(),
    }
}

impl FakeApi {
    pub fn put_node(&self, name: &str, cidr: &str, annotations: Value) {
        self.put_node_cidrs(name, &[cidr], annotations);
    }

    /// A node with one podCIDR per family (dual-stack: IPv4 first, as Kubernetes orders them).
    pub fn put_node_cidrs(&self, name: &str, cidrs: &[&str], annotations: Value) {
        let cidr = cidrs[0];
        let (m, cv) = &*self.0;
        let mut st = m.lock().unwrap();
        st.rv += 1;
        let rv = st.rv;
        let node = json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "resourceVersion": rv.to_string(), "annotations": annotations},
            "spec": {"podCIDR": cidr, "podCIDRs": cidrs},
            "status": st.status.clone().unwrap_or_else(|| json!({"conditions": []})),
        });
        let kind = if st.nodes.contains_key(name) { "MODIFIED" } else { "ADDED" };
        st.json.insert(name.to_string(), node.to_string());
        st.nodes.insert(name.to_string(), node.clone());
        st.events.push((rv, json!({"type": kind, "object": node})));
        cv.notify_all();
    }

    pub fn delete_node(&self, name: &str) {
        let (m, cv) = &*self.0;
        let mut st = m.lock().unwrap();
        st.json.remove(name);
        if let Some(mut node) = st.nodes.remove(name) {
            st.rv += 1;
            let rv = st.rv;
            node["metadata"]["resourceVersion"] = json!(rv.to_string());
            st.events.push((rv, json!({"type": "DELETED", "object": node})));
            cv.notify_all();
        }
    }

    pub fn node(&self, name: &str) -> Value {
        self.0.0.lock().unwrap().nodes.get(name).cloned().unwrap_or(Value::Null)
    }

    /// A strategic-merge PATCH of `nodes/<name>` (or of its `status`
    /// subresource) made in-process, as a client's would be served; false if
    /// there is no such Node.
    pub fn patch(&self, name: &str, status: bool, patch: &Value) -> bool {
        let (m, cv) = &*self.0;
        let mut st = m.lock().unwrap();
        let found = Self::apply_patch(&mut st, name, status, patch).is_some();
        cv.notify_all();
        found
    }

    /// The update path of a PATCH: `nodes/<name>` changes metadata and spec,
    /// `nodes/<name>/status` metadata and status (the real API server keeps
    /// metadata changes on the status subresource: upstream flannel publishes
    /// its annotations that way). A MODIFIED event even when nothing changed,
    /// as the API server's heartbeats do (a new resourceVersion each time).
    fn apply_patch(st: &mut State, name: &str, status: bool, patch: &Value) -> Option<Value> {
        let node = st.nodes.get_mut(name)?;
        for part in ["metadata", if status { "status" } else { "spec" }] {
            if let Some(p) = patch.get(part) {
                merge(&mut node[part], p);
            }
        }
        st.rv += 1;
        let rv = st.rv;
        node["metadata"]["resourceVersion"] = json!(rv.to_string());
        let node = node.clone();
        st.json.insert(name.to_string(), node.to_string());
        st.events.push((rv, json!({"type": "MODIFIED", "object": node.clone()})));
        Some(node)
    }

    /// Serves HTTP/1.1 on a listener (one per node namespace, shared state).
    pub fn serve(&self, listener: TcpListener) {
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
            let (code, text) = if method == "GET" && path == "/api/v1/nodes" {
                (200, self.list(query))
            } else {
                let (code, out) = self.handle(&method, path, headers.get("content-type"), &body);
                (code, out.to_string())
            };
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
                match Self::apply_patch(&mut st, &name, status, &patch) {
                    Some(node) => {
                        cv.notify_all();
                        (200, node)
                    }
                    None => (404, not_found),
                }
            }
            _ => (405, json!({"kind":"Status","code":405})),
        }
    }

    /// A NodeList page: `limit` items after the `continue` token (the last name
    /// of the previous page), as the API server pages a list. With
    /// `resourceVersion=0` the whole list in one response, `limit` ignored and
    /// no `continue`, as the API server answers one from its watch cache.
    fn list(&self, query: &str) -> String {
        let param = |k: &str| query.split('&').find_map(|kv| kv.strip_prefix(k)?.strip_prefix('='));
        let from_cache = param("resourceVersion") == Some("0");
        let limit: usize =
            param("limit").and_then(|v| v.parse().ok()).filter(|l| *l > 0 && !from_cache).unwrap_or(usize::MAX);
        let after = param("continue").unwrap_or("").to_string();
        let mut st = self.0.0.lock().unwrap();
        st.list_queries.push(query.to_string());
        let mut rest = st.json.range::<String, _>((std::ops::Bound::Excluded(&after), std::ops::Bound::Unbounded));
        let page: Vec<(&String, &String)> = rest.by_ref().take(limit).collect();
        let mut meta = json!({"resourceVersion": st.rv.to_string()});
        if rest.next().is_some()
            && let Some((last, _)) = page.last()
        {
            meta["continue"] = json!(last);
        }
        let items: Vec<&str> = page.iter().map(|(_, j)| j.as_str()).collect();
        format!(r#"{{"apiVersion":"v1","kind":"NodeList","metadata":{meta},"items":[{}]}}"#, items.join(","))
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

/// The `status` of a typical kubelet-managed Node (conditions, addresses,
/// capacity, nodeInfo, and the images list that makes real Nodes large), so a
/// listing costs what a real one costs to decode.
pub fn realistic_status() -> Value {
    let images: Vec<Value> = (0..30)
        .map(|i| {
            json!({
                "names": [
                    format!("registry.example.com/team-{i}/service-{i}@sha256:{:064x}", i * 7919),
                    format!("registry.example.com/team-{i}/service-{i}:v1.{i}.0"),
                ],
                "sizeBytes": 10_000_000 + i * 1_234_567,
            })
        })
        .collect();
    let cond = |t: &str, s: &str, r: &str| {
        json!({"type": t, "status": s, "reason": r, "message": format!("kubelet reports {r}"),
               "lastHeartbeatTime": "2026-12-01T10:00:00Z", "lastTransitionTime": "2026-11-01T10:00:00Z"})
    };
    json!({
        "capacity": {"cpu": "8", "ephemeral-storage": "203056560Ki", "hugepages-2Mi": "0", "memory": "32817100Ki", "pods": "110"},
        "allocatable": {"cpu": "8", "ephemeral-storage": "187136925387", "hugepages-2Mi": "0", "memory": "32714700Ki", "pods": "110"},
        "conditions": [
            cond("MemoryPressure", "False", "KubeletHasSufficientMemory"),
            cond("DiskPressure", "False", "KubeletHasNoDiskPressure"),
            cond("PIDPressure", "False", "KubeletHasSufficientPID"),
            cond("Ready", "True", "KubeletReady"),
        ],
        "addresses": [{"type": "InternalIP", "address": "198.51.100.10"}, {"type": "Hostname", "address": "node"}],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
        "nodeInfo": {
            "machineID": "0123456789abcdef0123456789abcdef", "systemUUID": "01234567-89ab-cdef-0123-456789abcdef",
            "bootID": "fedcba98-7654-3210-fedc-ba9876543210", "kernelVersion": "6.1.0-27-amd64",
            "osImage": "Debian GNU/Linux 12 (bookworm)", "containerRuntimeVersion": "containerd://1.7.22",
            "kubeletVersion": "v1.31.2", "kubeProxyVersion": "v1.31.2", "operatingSystem": "linux", "architecture": "amd64"
        },
        "images": images,
    })
}

/// Where agents find the stand-in: `127.0.0.1:6443` inside their node's namespace.
pub const ADDR: &str = "127.0.0.1:6443";

/// A kubeconfig pointing at [`ADDR`] (no auth), written to `<dir>/kubeconfig`.
pub fn kubeconfig(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("kubeconfig");
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{ADDR}\n\
             users:\n- name: u\n  user: {{}}\ncontexts:\n- name: c\n  context:\n    cluster: fake\n    user: u\n\
             current-context: c\n"
        ),
    )
    .expect("kubeconfig");
    path
}

/// The annotations a vxlan agent publishes on its Node.
pub fn vxlan_annotations(public_ip: &str, vtep_mac: &str) -> Value {
    let p = "flannel.alpha.coreos.com";
    json!({
        format!("{p}/backend-type"): "vxlan",
        format!("{p}/backend-data"): format!(r#"{{"VNI":1,"VtepMAC":"{vtep_mac}"}}"#),
        format!("{p}/public-ip"): public_ip,
        format!("{p}/kube-subnet-manager"): "true",
    })
}
