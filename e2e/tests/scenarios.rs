//! What a person evaluating the network would do by hand (seeds 002/003):
//! a few nodes, pods on each, ping across, tcpdump on the wire, a Service
//! through kube-proxy's chains, MTU edges, masquerade, backend switch, join.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use e2e::cluster::{Cluster, ETCD_IP, PREFIX, capture, netconf, request};
use e2e::kubeproxy::{self, Service};
use e2e::{Netns, wait_until};

const READY: Duration = Duration::from_secs(30);

/// `nodes` nodes with `pods` pods each, every agent ready and every peer programmed.
fn cluster(nodes: usize, pods: usize, backend: &str) -> Cluster {
    let mut c = Cluster::with_ready_agents("sc", nodes, &netconf(backend));
    for i in 0..nodes {
        for _ in 0..pods {
            c.add_pod(i);
        }
    }
    c
}

fn mesh(c: &Cluster) {
    let hosts: Vec<_> = c.pods.iter().map(|p| (&p.ns, p.ip, p.node)).collect();
    if let Err(e) = e2e::cluster::ping_mesh(&hosts) {
        panic!("{e}");
    }
}

#[test]
fn vxlan_mesh_and_what_tcpdump_sees() {
    let c = cluster(3, 2, "vxlan");
    mesh(&c);
    let (a, b) = (&c.pods[0], &c.pods[2]);
    let ping = || {
        a.ns.run("ping", &["-c", "2", "-i", "0.2", &b.ip.to_string()]);
    };
    let node = &c.nodes[0].ns;
    let wire = capture(node, "eth0", "udp port 8472", 2, Duration::from_secs(5), ping);
    assert!(wire.contains(&format!("{}.", c.nodes[0].ip)) && wire.contains(".8472: OTV"), "{wire}");
    assert!(wire.contains("instance 1"), "VNI 1 expected: {wire}");
    assert!(wire.contains(&format!("IP {} > {}: ICMP echo request", a.ip, b.ip)), "{wire}");
    let vtep = capture(node, "flannel.1", "icmp", 2, Duration::from_secs(5), ping);
    assert!(vtep.contains(&format!("IP {} > {}: ICMP echo request", a.ip, b.ip)) && !vtep.contains("8472"), "{vtep}");
    let bridge = capture(node, "cni0", "icmp", 2, Duration::from_secs(5), ping);
    assert!(bridge.contains(&format!("IP {} > {}: ICMP echo request", a.ip, b.ip)), "{bridge}");
}

#[test]
fn host_gw_mesh_carries_plain_packets() {
    let c = cluster(3, 2, "host-gw");
    mesh(&c);
    let (a, b) = (&c.pods[0], &c.pods[4]);
    let ping = || {
        a.ns.run("ping", &["-c", "2", "-i", "0.2", &b.ip.to_string()]);
    };
    let wire = capture(&c.nodes[0].ns, "eth0", "icmp or udp port 8472", 2, Duration::from_secs(5), ping);
    assert!(wire.contains(&format!("IP {} > {}: ICMP echo request", a.ip, b.ip)), "{wire}");
    assert!(!wire.contains("8472"), "host-gw must not encapsulate: {wire}");
}

#[test]
fn services_reach_pods_on_other_nodes() {
    let mut c = cluster(3, 0, "vxlan");
    c.add_pod(0);
    c.add_pod(1);
    c.add_pod(1);
    c.add_pod(2);
    let client = c.pods[0].ip;
    let endpoints: Vec<(Ipv4Addr, u16)> = c.pods[1..].iter().map(|p| (p.ip, 8080)).collect();
    for p in &c.pods {
        p.serve(8080);
    }
    let svc = Service::web(endpoints.clone());
    // Hairpin: a Service whose only endpoint is the calling pod itself.
    let self_svc = Service {
        name: "default/self:http".into(),
        cluster_ip: Ipv4Addr::new(10, 96, 0, 11),
        port: 80,
        node_port: None,
        endpoints: vec![(client, 8080)],
    };
    for n in &c.nodes {
        kubeproxy::install(&n.ns, &[svc.clone(), self_svc.clone()], "10.244.0.0/16");
    }
    let vip: SocketAddr = (svc.cluster_ip, svc.port).into();

    // 300 connections from a pod on node 1: all answered, load spread, client IP preserved.
    let mut served: HashMap<String, u32> = HashMap::new();
    for i in 0..300 {
        let line = request(&c.pods[0].ns, vip).unwrap_or_else(|e| panic!("connection {i} to {vip}: {e}"));
        let (server, seen) = line.split_once(" saw ").unwrap_or_else(|| panic!("odd answer {line:?}"));
        assert_eq!(seen, client.to_string(), "the endpoint must see the client pod's IP");
        *served.entry(server.to_string()).or_default() += 1;
    }
    assert_eq!(served.len(), 3, "{served:?}");
    for (ep, n) in &served {
        assert!(*n >= 60, "endpoint {ep} served only {n} of 300: {served:?}");
        assert!(endpoints.iter().any(|(ip, _)| ip.to_string() == *ep));
    }

    // From node 1's host network (nat OUTPUT).
    for _ in 0..10 {
        let line = request(&c.nodes[0].ns, vip).expect("ClusterIP from the host network");
        assert!(endpoints.iter().any(|(ip, _)| line.starts_with(&ip.to_string())), "{line}");
    }

    // NodePort from a client outside the cluster, on the underlay, via node 1.
    let outside = Netns::new("oc");
    c.underlay.ip(&["link", "add", "uo", "type", "veth", "peer", "name", "eth0", "netns", outside.name()]);
    c.underlay.ip(&["link", "set", "uo", "master", "br0", "up"]);
    outside.ip(&["addr", "add", "192.0.2.200/24", "dev", "eth0"]);
    outside.ip(&["link", "set", "eth0", "up"]);
    let np: SocketAddr = (c.nodes[0].ip, 30080).into();
    for _ in 0..10 {
        let line = request(&outside, np).expect("NodePort from outside");
        assert!(endpoints.iter().any(|(ip, _)| line.starts_with(&ip.to_string())), "{line}");
    }

    // Hairpin: the pod reaches a Service that sends it back to itself.
    let line = request(&c.pods[0].ns, (self_svc.cluster_ip, 80).into()).expect("hairpin Service");
    assert!(line.starts_with(&client.to_string()), "{line}");
}

#[test]
fn mtu_edges_are_refused_locally_not_lost() {
    for (backend, mtu) in [("vxlan", 1450u32), ("host-gw", 1500)] {
        let c = cluster(2, 1, backend);
        let (a, b) = (&c.pods[0], &c.pods[1].ip.to_string());
        let link = a.ns.ip_json(&["link", "show", "eth0"]);
        assert_eq!(link[0]["mtu"], mtu, "{backend}: pod MTU");
        let max = (mtu - 28).to_string();
        let out = a.ns.run("ping", &["-M", "do", "-c", "1", "-W", "2", "-s", &max, b]);
        assert!(out.status.success(), "{backend}: DF ping with {max} bytes: {}", String::from_utf8_lossy(&out.stdout));
        let over = (mtu - 27).to_string();
        let out = a.ns.run("ping", &["-M", "do", "-c", "1", "-W", "2", "-s", &over, b]);
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(!out.status.success(), "{backend}: {over} bytes should not fit");
        assert!(text.contains("message too long") || text.contains("mtu="), "{backend}: refused locally? {text}");
    }
}

#[test]
fn ip_masq_hides_pods_from_the_outside_but_not_from_each_other() {
    let c = cluster(2, 1, "vxlan");
    let out = c.underlay.tcp_listen((Ipv4Addr::UNSPECIFIED, 9000).into()).expect("listen on the underlay");
    let from = std::thread::spawn(move || {
        let (_s, peer) = out.accept().expect("accept");
        peer.ip().to_string()
    });
    let target: SocketAddr = (ETCD_IP.parse::<Ipv4Addr>().unwrap(), 9000).into();
    let _s = c.pods[0].ns.tcp_connect(target, Duration::from_secs(3)).expect("pod -> underlay host");
    assert_eq!(from.join().unwrap(), c.nodes[0].ip.to_string(), "leaving the cluster network: the node's IP");
    c.pods[1].serve(8080);
    let line = request(&c.pods[0].ns, (c.pods[1].ip, 8080).into()).expect("pod -> pod");
    assert_eq!(line, format!("{} saw {}", c.pods[1].ip, c.pods[0].ip), "pod to pod keeps the pod IP");
}

#[test]
fn backend_switch_and_back_keeps_pod_ips() {
    let mut c = cluster(2, 1, "vxlan");
    let ips: Vec<Ipv4Addr> = c.pods.iter().map(|p| p.ip).collect();
    let subnets: Vec<String> = c.nodes.iter().map(|n| n.subnet().unwrap()).collect();
    for (backend, via_vtep) in [("host-gw", false), ("vxlan", true)] {
        c.put_config(&netconf(backend));
        for i in 0..2 {
            c.stop_agent(i);
            c.start_agent(i, &[]);
        }
        for (i, subnet) in subnets.iter().enumerate() {
            assert!(c.wait_ready(i, READY), "{}", c.nodes[i].log());
            let n = &c.nodes[i];
            let ok = wait_until(Duration::from_secs(10), || {
                let r = n.flannel_routes();
                r.len() == 1 && (r[0]["dev"] == "flannel.1") == via_vtep
            });
            assert!(ok, "{backend}: node{} routes {:?}", i + 1, n.flannel_routes());
            assert_eq!(n.ns.links().iter().any(|l| l == "flannel.1"), via_vtep, "{backend}: VTEP presence");
            assert_eq!(&n.subnet().unwrap(), subnet, "{backend}: subnet kept");
        }
        assert!(c.leases().iter().all(|(_, v)| v["BackendType"] == backend));
        assert_eq!(c.pods.iter().map(|p| p.ip).collect::<Vec<_>>(), ips);
        let b = c.pods[1].ip.to_string();
        assert!(wait_until(Duration::from_secs(5), || c.pods[0].ns.ping(&b) == Some(62)), "{backend}: no connectivity");
        c.assert_idle();
    }
}

#[test]
fn nodes_join_and_leave_at_runtime() {
    let mut c = cluster(2, 1, "vxlan");
    let n = c.add_node();
    c.start_agent(n, &[]);
    assert!(c.wait_ready(n, READY), "{}", c.nodes[n].log());
    let ip = c.add_pod(n).ip.to_string();
    assert!(wait_until(Duration::from_secs(5), || c.pods[0].ns.ping(&ip) == Some(62)), "new node not reachable");
    let gone = c.nodes[n].subnet().unwrap();
    c.stop_agent(n);
    c.etcdctl(&["del", &format!("{PREFIX}/subnets/{}", gone.replace('/', "-"))]);
    for i in 0..2 {
        let node = &c.nodes[i];
        assert!(
            wait_until(Duration::from_secs(5), || node.flannel_routes().iter().all(|r| r["dst"] != gone.as_str())),
            "node{} still routes to the removed node",
            i + 1
        );
    }
}
