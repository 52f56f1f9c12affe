//! The Kubernetes subnet manager against kube-rs's standard test double: a
//! mocked tower service answering with the JSON a real API server sends
//! (Node gets and lists, watch event streams, patch responses).

use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use flannel_shared::lease::LeaseAttrs;
use flannel_shared::netconf::NetConfig;
use flanneld::config::Opts;
use flanneld::metrics::Metrics;
use flanneld::subnet::kube::KubeManager;
use flanneld::subnet::{Claim, LeaseEvent, SubnetError, SubnetManager};
use http::{Method, Request, Response};
use kube::client::Body;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tower_test::mock::{Handle, SendResponse};

type Mock = Handle<Request<Body>, Response<Body>>;

const P: &str = "flannel.alpha.coreos.com";

fn node(name: &str, rv: u32, cidr: Option<&str>, mac: Option<&str>, public_ip: &str) -> Value {
    let mut ann = serde_json::Map::new();
    if let Some(m) = mac {
        ann.insert(format!("{P}/backend-type"), json!("vxlan"));
        ann.insert(format!("{P}/backend-data"), json!(format!(r#"{{"VNI":1,"VtepMAC":"{m}"}}"#)));
        ann.insert(format!("{P}/public-ip"), json!(public_ip));
        ann.insert(format!("{P}/kube-subnet-manager"), json!("true"));
    }
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "resourceVersion": rv.to_string(), "annotations": ann},
        "spec": {"podCIDR": cidr, "podCIDRs": cidr.map(|c| vec![c])},
        "status": {"addresses": [{"type": "InternalIP", "address": public_ip}]},
    })
}

fn respond(send: SendResponse<Response<Body>>, code: u16, body: &Value) {
    send.send_response(Response::builder().status(code).body(Body::from(body.to_string().into_bytes())).unwrap());
}

async fn next(h: &mut Mock) -> (Request<Body>, SendResponse<Response<Body>>) {
    tokio::time::timeout(Duration::from_secs(10), h.next_request())
        .await
        .expect("the manager made no request")
        .expect("service dropped")
}

async fn body_json(req: Request<Body>) -> Value {
    let bytes = req.into_body().collect_bytes().await.unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

fn setup() -> (KubeManager, Mock) {
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(svc, "default");
    let opts = Opts::parse_from(["flanneld", "--kube-subnet-mgr"]);
    let mut m = KubeManager::new(client, "node1".into(), &opts).unwrap();
    m.pod_cidr_poll = Duration::from_millis(10);
    (m, handle)
}

fn attrs() -> LeaseAttrs {
    serde_json::from_value(
        json!({"PublicIP":"192.0.2.1","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"0e:00:00:00:00:01"}}),
    )
    .unwrap()
}

async fn recv(rx: &mut mpsc::Receiver<LeaseEvent>) -> LeaseEvent {
    tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.expect("no event").expect("closed")
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

#[test]
fn late_pod_cidr_annotations_and_network_up() {
    rt().block_on(async {
        let (mut m, mut h) = setup();
        let family = NetConfig::parse(r#"{"Network":"10.244.0.0/16"}"#, |_| {}).unwrap().ipv4.unwrap();
        let server = tokio::spawn(async move {
            // The controller manager has not assigned a podCIDR yet.
            let (req, send) = next(&mut h).await;
            assert_eq!((req.method(), req.uri().path()), (&Method::GET, "/api/v1/nodes/node1"));
            respond(send, 200, &node("node1", 1, None, None, "192.0.2.1"));
            let (_, send) = next(&mut h).await;
            let mut n = node("node1", 2, Some("10.244.1.0/24"), None, "192.0.2.1");
            n["metadata"]["annotations"][format!("{P}/public-ip-overwrite")] = json!("203.0.113.1");
            respond(send, 200, &n);
            // Annotations: a strategic-merge patch through the status subresource, as
            // upstream (the ClusterRole has no `nodes` patch), never a replace.
            let (req, send) = next(&mut h).await;
            assert_eq!((req.method(), req.uri().path()), (&Method::PATCH, "/api/v1/nodes/node1/status"));
            assert_eq!(req.headers()["content-type"], "application/strategic-merge-patch+json");
            let patch = body_json(req).await;
            let ann = &patch["metadata"]["annotations"];
            assert_eq!(ann[format!("{P}/public-ip")], "203.0.113.1", "public-ip-overwrite wins");
            assert_eq!(ann[format!("{P}/backend-type")], "vxlan");
            assert_eq!(ann[format!("{P}/kube-subnet-manager")], "true");
            let data: Value = serde_json::from_str(ann[format!("{P}/backend-data")].as_str().unwrap()).unwrap();
            assert_eq!(data, json!({"VNI":1,"VtepMAC":"0e:00:00:00:00:01"}));
            respond(send, 200, &node("node1", 3, Some("10.244.1.0/24"), Some("0e:00:00:00:00:01"), "203.0.113.1"));
            // NetworkUnavailable=False on the status subresource.
            let (req, send) = next(&mut h).await;
            assert_eq!((req.method(), req.uri().path()), (&Method::PATCH, "/api/v1/nodes/node1/status"));
            assert_eq!(req.headers()["content-type"], "application/strategic-merge-patch+json");
            let patch = body_json(req).await;
            let cond = &patch["status"]["conditions"][0];
            assert_eq!((cond["type"].as_str(), cond["status"].as_str()), (Some("NetworkUnavailable"), Some("False")));
            assert_eq!(cond["reason"], "FlannelIsUp");
            assert!(cond["lastTransitionTime"].as_str().unwrap().ends_with('Z'));
            respond(send, 200, &node("node1", 4, Some("10.244.1.0/24"), Some("0e:00:00:00:00:01"), "203.0.113.1"));
            // A podCIDR outside Network is refused.
            let (_, send) = next(&mut h).await;
            respond(send, 200, &node("node1", 5, Some("10.99.1.0/24"), None, "192.0.2.1"));
            // A vanished node: the lease is lost.
            let (_, send) = next(&mut h).await;
            respond(send, 404, &json!({"kind":"Status","apiVersion":"v1","status":"Failure","reason":"NotFound","code":404,"message":"nodes \"node1\" not found"}));
        });
        let a = attrs();
        let claim = Claim { family: Some(&family), family6: None, attrs: &a, prefer: None, prefer6: None };
        let lease = m.acquire(&claim).await.unwrap();
        assert_eq!(lease.subnet.to_string(), "10.244.1.0/24");
        assert_eq!(lease.attrs.public_ip.to_string(), "203.0.113.1");
        m.network_up().await.unwrap();
        let e = m.acquire(&claim).await.unwrap_err();
        assert!(matches!(e, SubnetError::Refused(_)) && e.to_string().contains("outside the flannel Network"), "{e}");
        assert!(matches!(m.renew(&lease).await, Err(SubnetError::LeaseLost(_))));
        server.await.unwrap();
    });
}

#[test]
fn peers_from_the_node_watch_including_errors() {
    rt().block_on(async {
        let (m, mut h) = setup();
        let metrics = Arc::new(Metrics::default());
        let (tx, mut rx) = mpsc::channel(16);
        let _w = m.spawn_watch(tx, metrics.clone());
        let list = |rv: u32, items: Vec<Value>| {
            json!({"apiVersion":"v1","kind":"NodeList","metadata":{"resourceVersion": rv.to_string()},"items": items})
        };
        let server = tokio::spawn(async move {
            // The listing reads the watch cache whole, as upstream's informer:
            // `resourceVersion=0` and no `limit` (the server would ignore it) or `continue`.
            let (req, send) = next(&mut h).await;
            assert_eq!((req.method(), req.uri().path()), (&Method::GET, "/api/v1/nodes"));
            assert_eq!(req.uri().query(), Some("resourceVersion=0"), "{}", req.uri());
            respond(
                send,
                200,
                &list(
                    100,
                    vec![
                        node("node1", 90, Some("10.244.1.0/24"), Some("0e:00:00:00:00:01"), "192.0.2.1"),
                        node("node2", 91, Some("10.244.2.0/24"), Some("0e:00:00:00:00:02"), "192.0.2.2"),
                        node("node3", 92, Some("10.244.3.0/24"), None, "192.0.2.3"),
                    ],
                ),
            );
            let (req, send) = next(&mut h).await;
            let q = req.uri().query().unwrap_or_default().to_string();
            assert!(q.contains("watch=true") && q.contains("resourceVersion=100"), "{q}");
            let events = [
                json!({"type":"MODIFIED","object": node("node2", 101, Some("10.244.2.0/24"), Some("0e:00:00:00:00:22"), "192.0.2.2")}),
                json!({"type":"ADDED","object": node("node4", 102, Some("10.244.4.0/24"), Some("0e:00:00:00:00:04"), "192.0.2.4")}),
                json!({"type":"DELETED","object": node("node2", 103, Some("10.244.2.0/24"), Some("0e:00:00:00:00:22"), "192.0.2.2")}),
            ];
            let body: String = events.iter().map(|e| format!("{e}\n")).collect();
            send.send_response(Response::builder().body(Body::from(body.into_bytes())).unwrap());
            // The stream ended: the watch resumes from the last version it saw; this one has expired.
            let (req, send) = next(&mut h).await;
            let q = req.uri().query().unwrap_or_default().to_string();
            assert!(q.contains("watch=true") && q.contains("resourceVersion=103"), "{q}");
            let gone = json!({"type":"ERROR","object":{"kind":"Status","apiVersion":"v1","status":"Failure","reason":"Expired","message":"too old resource version: 103 (200)","code":410}});
            send.send_response(Response::builder().body(Body::from(format!("{gone}\n").into_bytes())).unwrap());
            // So it lists again, the latest state this time (no resourceVersion: the
            // cache may be behind the version that expired), as client-go's reflector.
            let (req, send) = next(&mut h).await;
            assert_eq!((req.uri().path(), req.uri().query()), ("/api/v1/nodes", None), "{}", req.uri());
            respond(
                send,
                200,
                &list(
                    200,
                    vec![
                        node("node1", 90, Some("10.244.1.0/24"), Some("0e:00:00:00:00:01"), "192.0.2.1"),
                        node("node4", 102, Some("10.244.4.0/24"), Some("0e:00:00:00:00:04"), "192.0.2.4"),
                    ],
                ),
            );
            // Hold the next watch open until the test ends.
            let held = next(&mut h).await;
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(held);
        });
        let LeaseEvent::Snapshot(all) = recv(&mut rx).await else { panic!("first event must be a snapshot") };
        let subnets: Vec<String> = all.iter().map(|l| l.subnet.to_string()).collect();
        assert_eq!(subnets, ["10.244.1.0/24", "10.244.2.0/24"], "node3 has no flannel annotations yet");
        let LeaseEvent::Added(l) = recv(&mut rx).await else { panic!("expected the VtepMAC change") };
        assert_eq!((l.subnet.to_string(), l.backend_data::<flanneld::backend::vxlan::VxlanData>(false).unwrap().vtep_mac.to_string()), ("10.244.2.0/24".into(), "0e:00:00:00:00:22".into()));
        let LeaseEvent::Added(l) = recv(&mut rx).await else { panic!("expected node4") };
        assert_eq!(l.attrs.public_ip.to_string(), "192.0.2.4");
        assert_eq!(recv(&mut rx).await, LeaseEvent::Removed("10.244.2.0/24".parse().unwrap()));
        let LeaseEvent::Snapshot(all) = recv(&mut rx).await else { panic!("expected a re-list after 410") };
        assert_eq!(all.len(), 2);
        assert!(metrics.watch_restarts.get() >= 1);
        server.abort();
    });
}

/// A listing that breaks off (a truncated body) or is refused is not a
/// snapshot: nothing reaches the agent until a whole one arrives, after a backoff.
#[test]
fn broken_listings_are_retried_and_never_half_reported() {
    rt().block_on(async {
        let (m, mut h) = setup();
        let metrics = Arc::new(Metrics::default());
        let (tx, mut rx) = mpsc::channel(16);
        let _w = m.spawn_watch(tx, metrics.clone());
        let server = tokio::spawn(async move {
            let good = json!({"apiVersion":"v1","kind":"NodeList","metadata":{"resourceVersion":"50"},"items":[
                node("node1", 40, Some("10.244.1.0/24"), Some("0e:00:00:00:00:01"), "192.0.2.1"),
                node("node2", 41, Some("10.244.2.0/24"), Some("0e:00:00:00:00:02"), "192.0.2.2"),
            ]})
            .to_string();
            let (_, send) = next(&mut h).await;
            let cut = good[..good.len() / 2 + 40].to_string();
            send.send_response(Response::builder().body(Body::from(cut.into_bytes())).unwrap());
            let (_, send) = next(&mut h).await;
            respond(send, 500, &json!({"kind":"Status","apiVersion":"v1","status":"Failure","message":"etcdserver: request timed out","code":500}));
            let (req, send) = next(&mut h).await;
            assert_eq!(req.uri().query(), Some("resourceVersion=0"), "{}", req.uri());
            send.send_response(Response::builder().body(Body::from(good.into_bytes())).unwrap());
            let (req, _held) = next(&mut h).await;
            assert!(req.uri().query().unwrap_or_default().contains("resourceVersion=50"), "{}", req.uri());
            tokio::time::sleep(Duration::from_secs(30)).await;
        });
        let LeaseEvent::Snapshot(all) = recv(&mut rx).await else { panic!("the first event must be a whole snapshot") };
        assert_eq!(all.len(), 2);
        assert_eq!(metrics.watch_restarts.get(), 2, "two failed listings");
        assert!(rx.try_recv().is_err());
        server.abort();
    });
}

/// A watch the server (or a proxy) ends at once, with nothing, is re-opened
/// after a backoff, not in a tight loop; it resumes from the same version.
#[test]
fn watches_that_end_at_once_are_backed_off() {
    rt().block_on(async {
        let (m, mut h) = setup();
        let (tx, mut rx) = mpsc::channel(16);
        let _w = m.spawn_watch(tx, Arc::new(Metrics::default()));
        let server = tokio::spawn(async move {
            let (_, send) = next(&mut h).await;
            respond(
                send,
                200,
                &json!({"apiVersion":"v1","kind":"NodeList","metadata":{"resourceVersion":"7"},"items":[]}),
            );
            let mut at = Vec::new();
            for _ in 0..3 {
                let (req, send) = next(&mut h).await;
                at.push(std::time::Instant::now());
                assert!(req.uri().query().unwrap_or_default().contains("resourceVersion=7"), "{}", req.uri());
                send.send_response(Response::builder().body(Body::empty()).unwrap());
            }
            at
        });
        assert_eq!(recv(&mut rx).await, LeaseEvent::Snapshot(vec![]));
        let at = tokio::time::timeout(Duration::from_secs(20), server).await.expect("three watches").unwrap();
        for w in at.windows(2) {
            assert!(w[1] - w[0] >= Duration::from_millis(500), "re-watched after {:?}", w[1] - w[0]);
        }
    });
}

/// IPv6-only (`EnableIPv4: false`): the Node's only podCIDR is IPv6; the lease
/// has no IPv4 half and the patch publishes none (as upstream's vxlan).
#[test]
fn ipv6_only_node() {
    rt().block_on(async {
        let (mut m, mut h) = setup();
        let conf = r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10:244::/56"}"#;
        let family6 = NetConfig::parse(conf, |_| {}).unwrap().ipv6.unwrap();
        let server = tokio::spawn(async move {
            let (_, send) = next(&mut h).await;
            let mut n = node("node1", 1, Some("fd00:10:244:1::/64"), None, "192.0.2.1");
            n["status"] = json!({});
            respond(send, 200, &n);
            let (req, send) = next(&mut h).await;
            assert_eq!((req.method(), req.uri().path()), (&Method::PATCH, "/api/v1/nodes/node1/status"));
            let patch = body_json(req).await;
            let ann = &patch["metadata"]["annotations"];
            assert!(
                ann.get(format!("{P}/public-ip")).is_none() && ann.get(format!("{P}/backend-data")).is_none(),
                "{ann}"
            );
            assert_eq!(ann[format!("{P}/public-ipv6")], "2001:db8::1");
            assert_eq!(ann[format!("{P}/kube-subnet-manager")], "true");
            respond(send, 200, &n);
        });
        let a: LeaseAttrs = serde_json::from_value(json!({"PublicIP":"0.0.0.0","PublicIPv6":"2001:db8::1",
            "BackendType":"vxlan","BackendData":null,"BackendV6Data":{"VNI":1,"VtepMAC":"0e:00:00:00:00:01"}}))
        .unwrap();
        let claim = Claim { family: None, family6: Some(&family6), attrs: &a, prefer: None, prefer6: None };
        let lease = m.acquire(&claim).await.unwrap();
        assert_eq!(lease.subnet, flannel_shared::lease::no_ipv4());
        assert_eq!(lease.key().to_string(), "fd00:10:244:1::/64");
        server.await.unwrap();
    });
}
