//! A real runtime calls the plugin: Debian's containerd on every test-bed node,
//! driven through CRI over its socket the way the kubelet drives it
//! (RunPodSandbox, PodSandboxStatus, StopPodSandbox, RemovePodSandbox). Its CRI
//! plugin loads the manifest's `cni-conf.json` (plus the per-node file
//! locations) and calls our `flannel` and Debian's `portmap` and `loopback`
//! through go-cni, with its own netns, CNI_ARGS and runtimeConfig.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use e2e::cluster::{Cluster, Node, bin_path, netconf, ping_mesh, request, serve};
use e2e::containerd::{Containerd, DEBIAN_CNI_DIR, Sandbox, run_sandbox};
use e2e::cri::{PortMapping, sandbox_config};
use e2e::kubeproxy::{self, Service};
use e2e::manifest::DaemonSet;
use e2e::podman::Podman;
use e2e::{images, wait_until};
use serde_json::Value;

const READY: Duration = Duration::from_secs(30);

/// The manifest's conflist with the flannel entry's files pointed at `node`'s
/// (the keys the shared filesystem of a real node does not need).
fn node_conflist(node: &Node) -> Value {
    let ds = DaemonSet::load();
    let mut conflist: Value = serde_json::from_str(ds.config_file("cni-conf.json").expect("cni-conf.json")).unwrap();
    let ours = node.cni_conf();
    let entry = conflist["plugins"]
        .as_array_mut()
        .and_then(|p| p.iter_mut().find(|e| e["type"] == "flannel"))
        .expect("flannel entry");
    for k in ["subnetFile", "dataDir", "ipam"] {
        entry[k] = ours[k].clone();
    }
    conflist
}

/// Node `i`'s CNI directories: our plugin, Debian's portmap and loopback, the conflist.
fn cni_dirs_for(c: &Cluster, i: usize) -> Containerd {
    let node = &c.nodes[i];
    let ctd = Containerd::new(node);
    ctd.install_plugin(&bin_path("flannel"));
    for p in ["portmap", "loopback"] {
        ctd.install_plugin(&Path::new(DEBIAN_CNI_DIR).join(p));
    }
    ctd.write_conflist("10-flannel.conflist", &node_conflist(node));
    ctd
}

/// containerd for node `i` with [`cni_dirs_for`] and the pause image.
fn runtime_for(c: &Cluster, i: usize) -> Containerd {
    let mut ctd = cni_dirs_for(c, i);
    ctd.spawn();
    ctd.import(&images::pause());
    ctd
}

/// `n` nodes with ready agents; their runtimes are started by the caller.
fn cluster(n: usize, backend: &str) -> Cluster {
    Cluster::with_ready_agents("cr", n, &netconf(backend))
}

fn pod(ns: &str, name: &str) -> e2e::cri::PodSandboxConfig {
    sandbox_config(ns, name, &format!("uid-{name}"), Vec::new())
}

/// Stop + Remove, as the kubelet does when a pod goes; then the node holds nothing of it.
fn remove(ctd: &Containerd, node: &Node, s: &Sandbox) {
    let cri = ctd.cri();
    cri.stop_pod_sandbox(&s.id).unwrap_or_else(|e| panic!("StopPodSandbox: {e}\n{}", ctd.log()));
    cri.remove_pod_sandbox(&s.id).unwrap_or_else(|e| panic!("RemovePodSandbox: {e}\n{}", ctd.log()));
    assert!(!node.reserved().contains(&s.ip.to_string()), "{} still reserved", s.ip);
}

fn sandboxes_reach_pods_and_a_service(backend: &str) {
    let c = cluster(3, backend);
    let runtimes: Vec<Containerd> = (0..3).map(|i| runtime_for(&c, i)).collect();
    let mut boxes = Vec::new();
    for (i, ctd) in runtimes.iter().enumerate() {
        let cri = ctd.cri();
        for k in 0..2 {
            let s = run_sandbox(&cri, i, pod("default", &format!("web-{i}-{k}")))
                .unwrap_or_else(|e| panic!("RunPodSandbox on node{}: {e}\n{}", i + 1, ctd.log()));
            assert!(c.nodes[i].in_subnet(s.ip), "{} outside node{}'s {:?}", s.ip, i + 1, c.nodes[i].subnet());
            assert!(c.nodes[i].reserved().contains(&s.ip.to_string()), "PodSandboxStatus IP not in the store");
            boxes.push(s);
        }
    }
    let hosts: Vec<_> = boxes.iter().map(|b| (&b.ns, b.ip, b.node)).collect();
    if let Err(e) = ping_mesh(&hosts) {
        panic!("{e}");
    }
    // A ClusterIP whose endpoints are sandboxes on the other nodes, DNATed by kube-proxy's chains on node 1.
    let endpoints: Vec<(Ipv4Addr, u16)> = boxes.iter().filter(|b| b.node != 0).map(|b| (b.ip, 8080)).collect();
    for b in boxes.iter().filter(|b| b.node != 0) {
        serve(&b.ns, b.ip, 8080);
    }
    let svc = Service::web(endpoints.clone());
    kubeproxy::install(&c.nodes[0].ns, std::slice::from_ref(&svc), "10.244.0.0/16");
    let vip: SocketAddr = (svc.cluster_ip, svc.port).into();
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..20 {
        let line = request(&boxes[0].ns, vip).unwrap_or_else(|e| panic!("{vip} from {}: {e}", boxes[0].ip));
        let (server, client) = line.split_once(" saw ").expect("reply");
        assert_eq!(client, boxes[0].ip.to_string(), "pod-to-Service traffic keeps the pod's source IP");
        seen.insert(server.to_string());
    }
    assert!(seen.len() > 1, "20 connections all went to {seen:?}");
    // Stop + Remove frees every address and veth.
    for (i, ctd) in runtimes.iter().enumerate() {
        for s in boxes.iter().filter(|s| s.node == i) {
            remove(ctd, &c.nodes[i], s);
        }
        assert_eq!(c.nodes[i].reserved(), Vec::<String>::new());
        let node = &c.nodes[i];
        assert!(wait_until(Duration::from_secs(10), || node.veths().is_empty()), "veths left: {:?}", node.veths());
    }
}

#[test]
fn containerd_sandboxes_vxlan() {
    sandboxes_reach_pods_and_a_service("vxlan");
}

#[test]
fn containerd_sandboxes_host_gw() {
    sandboxes_reach_pods_and_a_service("host-gw");
}

#[test]
fn sandbox_whose_netns_vanished_still_tears_down() {
    let c = cluster(1, "vxlan");
    let ctd = runtime_for(&c, 0);
    let s = run_sandbox(&ctd.cri(), 0, pod("default", "gone")).expect("RunPodSandbox");
    // Someone removes the netns file behind containerd's back (the pause process still holds the namespace).
    e2e::ns::sh("ip", &["netns", "del", s.ns.name()]);
    remove(&ctd, &c.nodes[0], &s);
    let node = &c.nodes[0];
    assert!(wait_until(Duration::from_secs(10), || node.veths().is_empty()), "veth left: {:?}", node.veths());
    assert_eq!(node.reserved(), Vec::<String>::new());
}

#[test]
fn twenty_concurrent_sandboxes_get_distinct_addresses() {
    let c = cluster(1, "vxlan");
    let ctd = runtime_for(&c, 0);
    let boxes: Vec<Sandbox> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..20)
            .map(|k| {
                let ctd = &ctd;
                sc.spawn(move || {
                    run_sandbox(&ctd.cri(), 0, pod("load", &format!("p{k}")))
                        .unwrap_or_else(|e| panic!("RunPodSandbox p{k}: {e}\n{}", ctd.log()))
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("sandbox")).collect()
    });
    let mut ips: Vec<Ipv4Addr> = boxes.iter().map(|b| b.ip).collect();
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), 20, "{ips:?}");
    assert_eq!(c.nodes[0].reserved().len(), 20);
    std::thread::scope(|sc| {
        for b in &boxes {
            let (ctd, node) = (&ctd, &c.nodes[0]);
            sc.spawn(move || remove(ctd, node, b));
        }
    });
    assert_eq!(c.nodes[0].reserved(), Vec::<String>::new());
    let node = &c.nodes[0];
    assert!(wait_until(Duration::from_secs(20), || node.veths().is_empty()), "veths left: {:?}", node.veths());
}

#[test]
fn containerd_restart_keeps_sandboxes_and_their_addresses() {
    let c = cluster(2, "vxlan");
    let mut a_rt = runtime_for(&c, 0);
    let b_rt = runtime_for(&c, 1);
    let a = run_sandbox(&a_rt.cri(), 0, pod("default", "a")).expect("a");
    let b = run_sandbox(&b_rt.cri(), 1, pod("default", "b")).expect("b");
    assert_eq!(a.ns.ping(&b.ip.to_string()), Some(62));
    a_rt.restart(true);
    let st = a_rt.cri().pod_sandbox_status(&a.id, false).expect("status after restart");
    let st = st.status.expect("status");
    assert_eq!(st.state, e2e::cri::SANDBOX_READY);
    assert_eq!(st.network.expect("network").ip, a.ip.to_string(), "the sandbox keeps its IP across a restart");
    assert_eq!(a.ns.ping(&b.ip.to_string()), Some(62));
    assert_eq!(c.nodes[0].reserved(), [a.ip.to_string()]);
    remove(&a_rt, &c.nodes[0], &a);
    remove(&b_rt, &c.nodes[1], &b);
    assert_eq!(c.nodes[0].reserved(), Vec::<String>::new());
}

#[test]
fn host_port_through_chained_portmap() {
    let c = cluster(2, "vxlan");
    let ctd = runtime_for(&c, 0);
    let _other = runtime_for(&c, 1);
    let ports = vec![PortMapping { protocol: 0, container_port: 8080, host_port: 30888, host_ip: String::new() }];
    let s = run_sandbox(&ctd.cri(), 0, sandbox_config("default", "hp", "uid-hp", ports)).expect("RunPodSandbox");
    serve(&s.ns, s.ip, 8080);
    // From another node, to node 1's own address and the hostPort.
    let line = request(&c.nodes[1].ns, (c.nodes[0].ip, 30888).into()).expect("hostPort from another node");
    assert!(line.starts_with(&format!("{} saw ", s.ip)), "{line}");
    remove(&ctd, &c.nodes[0], &s);
    // portmap's DEL took its DNAT rule with it.
    let nat = String::from_utf8_lossy(&c.nodes[0].ns.run("iptables-save", &["-t", "nat"]).stdout).into_owned();
    assert!(!nat.contains("30888"), "{nat}");
}

#[test]
fn sandbox_before_flanneld_fails_with_our_message_then_works() {
    let mut c = Cluster::new("cr");
    c.put_config(&netconf("vxlan"));
    c.add_node();
    let ctd = runtime_for(&c, 0);
    let cri = ctd.cri();
    let err = match run_sandbox(&cri, 0, pod("default", "early")) {
        Ok(s) => panic!("a sandbox got {} before flanneld wrote subnet.env", s.ip),
        Err(e) => e,
    };
    assert!(err.message.contains("subnet.env") && err.message.contains("flannel"), "{err}");
    let node = &c.nodes[0];
    assert_eq!(node.reserved(), Vec::<String>::new(), "a failed sandbox must not hold an address");
    assert!(node.veths().is_empty(), "a failed sandbox must not leave a veth: {:?}", node.veths());
    let left: Vec<_> = cri.list_pod_sandbox().expect("list").into_iter().filter(|s| s.state == 0).collect();
    assert!(left.is_empty(), "no ready sandbox after the failure: {left:?}");
    c.start_agent(0, &[]);
    assert!(c.wait_ready(0, READY), "{}", c.nodes[0].log());
    let s = run_sandbox(&cri, 0, pod("default", "early")).unwrap_or_else(|e| panic!("retry: {e}"));
    assert!(c.nodes[0].in_subnet(s.ip));
    remove(&ctd, &c.nodes[0], &s);
}

/// podman (CNI backend) on a node, with the same conflist as a network: its
/// container gets an address from the node's subnet and reaches a containerd
/// sandbox on another node; `podman rm` frees the address.
#[test]
fn podman_container_on_our_network_reaches_a_containerd_pod() {
    let c = cluster(2, "vxlan");
    let ctd = runtime_for(&c, 0);
    let target = run_sandbox(&ctd.cri(), 0, pod("default", "target")).expect("RunPodSandbox");
    let dirs = cni_dirs_for(&c, 1);
    let node = &c.nodes[1];
    let podman = Podman::on_node("pm", &node.ns.path(), &dirs.cni_bin, &dirs.cni_conf);
    podman.import_dir(&images::busybox_root(&node.dir), "localhost/e2e/busybox:1");
    let network = podman.check(&["network", "ls", "--format", "{{.Name}}"]);
    assert!(network.lines().any(|n| n == "cbr0"), "podman does not list the conflist's network: {network}");
    podman.check(&[
        "run",
        "--detach",
        "--name",
        "p1",
        "--network",
        "cbr0",
        "--cap-add",
        "NET_RAW",
        "localhost/e2e/busybox:1",
        "sleep",
        "600",
    ]);
    let ip = podman.check(&["inspect", "--format", "{{(index .NetworkSettings.Networks \"cbr0\").IPAddress}}", "p1"]);
    let ip: Ipv4Addr = ip.parse().unwrap_or_else(|e| panic!("podman's IP {ip:?}: {e}"));
    assert!(node.in_subnet(ip), "{ip} outside node2's {:?}", node.subnet());
    assert_eq!(node.reserved(), [ip.to_string()]);
    let out = podman.run(&["exec", "p1", "ping", "-c", "1", "-W", "3", &target.ip.to_string()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("ttl=62"), "podman -> containerd pod: {text}");
    assert_eq!(target.ns.ping(&ip.to_string()), Some(62), "containerd pod -> podman container");
    podman.check(&["rm", "--force", "--time", "0", "p1"]);
    assert_eq!(node.reserved(), Vec::<String>::new(), "podman rm must free the address");
    assert!(wait_until(Duration::from_secs(10), || node.veths().is_empty()), "veth left: {:?}", node.veths());
    remove(&ctd, &c.nodes[0], &target);
}

/// A full node subnet as containerd sees it: the sandbox past the last free
/// address fails with our message, and nothing of it is left behind.
#[test]
fn exhausted_subnet_fails_the_sandbox_and_leaks_nothing() {
    let mut c = Cluster::new("cr");
    // /29 node subnets: .1 is the gateway, .2-.6 the five pod addresses.
    c.put_config(r#"{"Network":"10.244.0.0/16","SubnetLen":29,"Backend":{"Type":"vxlan"}}"#);
    c.add_node();
    c.start_agent(0, &[]);
    assert!(c.wait_ready(0, READY), "{}", c.nodes[0].log());
    let ctd = runtime_for(&c, 0);
    let cri = ctd.cri();
    let boxes: Vec<Sandbox> =
        (0..5).map(|k| run_sandbox(&cri, 0, pod("full", &format!("f{k}"))).expect("fits")).collect();
    let err = match run_sandbox(&cri, 0, pod("full", "f5")) {
        Ok(s) => panic!("a sixth sandbox got {} in a /29", s.ip),
        Err(e) => e,
    };
    assert!(err.message.contains("no IP addresses available"), "{err}");
    let node = &c.nodes[0];
    assert_eq!(node.reserved().len(), 5);
    assert!(wait_until(Duration::from_secs(10), || node.veths().len() == 5), "veths: {:?}", node.veths());
    for b in &boxes {
        remove(&ctd, node, b);
    }
    assert_eq!(node.reserved(), Vec::<String>::new());
}
