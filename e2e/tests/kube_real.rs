//! flanneld's Kubernetes mode against a real API server. Ignored by default
//! (no API server here); run it with a cluster you may create Nodes in:
//!
//! ```sh
//! KUBECONFIG=~/.kube/config cargo test -p e2e --test kube_real -- --ignored
//! ```
//!
//! It creates two Nodes with podCIDRs (one annotated as a flannel peer),
//! starts the real flanneld in a namespace node (the API reached through a
//! port forward the test runs, so nothing outside the namespaces changes),
//! and checks the annotations the agent publishes and the peer's route.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use e2e::cluster::Cluster;
use e2e::wait_until;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::json;

fn pump(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = [0u8; 16 * 1024];
    while let Ok(n) = from.read(&mut buf) {
        if n == 0 || to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}

#[test]
#[ignore = "needs a real API server: KUBECONFIG=... cargo test -p e2e --test kube_real -- --ignored"]
fn agent_against_a_real_api_server() {
    let kubeconfig = std::env::var("KUBECONFIG").expect("set KUBECONFIG to a cluster you may create Nodes in");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let client = rt.block_on(kube::Client::try_default()).expect("client from KUBECONFIG");
    let nodes: Api<Node> = Api::all(client);
    let me = format!("flannel-rs-e2e-{}-a", std::process::id());
    let peer = format!("flannel-rs-e2e-{}-b", std::process::id());
    let mk = |name: &str, cidr: &str, ann: serde_json::Value| -> Node {
        serde_json::from_value(
            json!({"metadata": {"name": name, "annotations": ann}, "spec": {"podCIDR": cidr, "podCIDRs": [cidr]}}),
        )
        .unwrap()
    };
    let ann = json!({
        "flannel.alpha.coreos.com/backend-type": "host-gw",
        "flannel.alpha.coreos.com/backend-data": "null",
        "flannel.alpha.coreos.com/public-ip": "192.0.2.2",
        "flannel.alpha.coreos.com/kube-subnet-manager": "true",
    });
    struct Cleanup<'a>(&'a tokio::runtime::Runtime, &'a Api<Node>, Vec<String>);
    impl Drop for Cleanup<'_> {
        fn drop(&mut self) {
            for n in &self.2 {
                let _ = self.0.block_on(self.1.delete(n, &DeleteParams::default()));
            }
        }
    }
    rt.block_on(nodes.create(&PostParams::default(), &mk(&me, "10.244.201.0/24", json!({})))).expect("create node");
    let _cleanup = Cleanup(&rt, &nodes, vec![me.clone(), peer.clone()]);
    rt.block_on(nodes.create(&PostParams::default(), &mk(&peer, "10.244.202.0/24", ann))).expect("create peer node");

    // The agent's kubeconfig points at a forward inside its namespace.
    let mut c = Cluster::new("kr");
    c.add_node();
    let text = std::fs::read_to_string(&kubeconfig).unwrap();
    let mut kc: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    let server = kc["clusters"][0]["cluster"]["server"].as_str().unwrap().to_string();
    let hostport =
        server.trim_start_matches("https://").trim_start_matches("http://").trim_end_matches('/').to_string();
    let host = hostport.rsplit_once(':').map_or(hostport.as_str(), |x| x.0).to_string();
    let upstream = hostport.to_socket_addrs().unwrap().next().unwrap();
    let listener = c.nodes[0].ns.tcp_listen("127.0.0.1:6443".parse().unwrap()).unwrap();
    std::thread::spawn(move || {
        for s in listener.incoming().flatten() {
            let Ok(up) = TcpStream::connect(upstream) else { continue };
            let (s2, up2) = (s.try_clone().unwrap(), up.try_clone().unwrap());
            std::thread::spawn(move || pump(s, up));
            std::thread::spawn(move || pump(up2, s2));
        }
    });
    kc["clusters"][0]["cluster"]["server"] = "https://127.0.0.1:6443".into();
    kc["clusters"][0]["cluster"]["tls-server-name"] = host.into();
    let kc_path = c.dir().join("kubeconfig");
    std::fs::write(&kc_path, serde_yaml::to_string(&kc).unwrap()).unwrap();
    let netconf = c.dir().join("net-conf.json");
    std::fs::write(&netconf, r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#).unwrap();
    c.start_agent_env(
        0,
        &[
            "--kube-subnet-mgr",
            &format!("--kubeconfig-file={}", kc_path.display()),
            &format!("--net-config-path={}", netconf.display()),
        ],
        &[("NODE_NAME", &me)],
    );
    assert!(c.wait_ready(0, Duration::from_secs(60)), "{}", c.nodes[0].log());
    assert_eq!(c.nodes[0].subnet().as_deref(), Some("10.244.201.0/24"));
    let n = rt.block_on(nodes.get(&me)).unwrap();
    let a = n.metadata.annotations.unwrap_or_default();
    assert_eq!(a.get("flannel.alpha.coreos.com/backend-type").map(String::as_str), Some("host-gw"));
    assert_eq!(a.get("flannel.alpha.coreos.com/public-ip").map(String::as_str), Some("192.0.2.1"));
    let node = &c.nodes[0];
    assert!(wait_until(Duration::from_secs(20), || node
        .flannel_routes()
        .iter()
        .any(|r| r["dst"] == "10.244.202.0/24" && r["gateway"] == "192.0.2.2")));
    let conds = rt.block_on(nodes.get_status(&me)).unwrap().status.unwrap().conditions.unwrap_or_default();
    assert!(conds.iter().any(|c| c.type_ == "NetworkUnavailable" && c.status == "False"), "{conds:?}");
}
