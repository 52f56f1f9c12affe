//! The IP store across reboots (root, real kernel, the real binary): pods that
//! died with the host free their addresses at the first ADD of the next boot;
//! without a boot change nothing is ever freed behind a runtime's back.

mod common;

use std::process::{Command, Stdio};

use common::*;
use serde_json::{Value, json};

fn ip_of(res: &Value) -> String {
    res["ips"][0]["address"].as_str().unwrap().split('/').next().unwrap().to_string()
}

/// A reboot as the store sees it: the pods' namespaces (and their veths) and
/// cni0 gone without any DEL, and a new boot id.
fn reboot(node: &Node, pods: Vec<Netns>, new_boot: &str) {
    drop(pods);
    node.ns.ip(&["link", "del", "cni0"]);
    node.set_boot(new_boot);
}

fn add_out(node: &Node, cid: &str, pod: &Netns) -> CniOut {
    node.cni("ADD", cid, Some(pod.path().to_str().unwrap()), "eth0", &node.conf("0.3.1")).expect_ok()
}

#[test]
fn addresses_of_pods_that_died_in_a_reboot_are_free_again() {
    let node = Node::new("10.244.21.1/24");
    node.set_boot("boot-1");
    let pods: Vec<Netns> = (0..5).map(|_| Netns::new("cr")).collect();
    for (i, p) in pods.iter().enumerate() {
        node.add(&format!("old{i}"), p);
    }
    assert_eq!(node.reserved().len(), 5);
    reboot(&node, pods, "boot-2");

    let pod = Netns::new("cr");
    let out = add_out(&node, "new", &pod);
    assert!(out.stderr.contains("freed 5 address(es) reserved before the reboot"), "{}", out.stderr);
    assert!(out.stderr.contains("boot-1 -> boot-2"), "{}", out.stderr);
    assert_eq!(ip_of(&out.json()), "10.244.21.2", "the first free address");
    assert_eq!(node.reserved(), ["10.244.21.2"]);
    assert_eq!(node.state_files(), ["new"], "the dead pods' saved state goes with their addresses");
    // cni0 is back with the node's gateway.
    let cni0 = node.ns.ip_json(&["-4", "addr", "show", "dev", "cni0"]);
    assert_eq!(cni0[0]["addr_info"][0]["local"], "10.244.21.1", "{cni0}");
    assert_eq!(pod.ping("10.244.21.1"), Some(64), "the pod reaches its recreated gateway");

    // A late DEL for a dead pod succeeds and leaves the new holder of its old address alone.
    node.del("old0", None).expect_ok();
    assert_eq!(node.reserved(), ["10.244.21.2"]);
    let holder = std::fs::read_to_string(node.ipam_dir().join("10.244.21.2")).unwrap();
    assert_eq!(holder, "new\r\neth0");
    // The sweep ran once: the next ADD in this boot frees nothing.
    let pod2 = Netns::new("cr");
    let out = add_out(&node, "new2", &pod2);
    assert!(!out.stderr.contains("freed"), "{}", out.stderr);
    assert_eq!(ip_of(&out.json()), "10.244.21.3");
    for (cid, p) in [("new", &pod), ("new2", &pod2)] {
        node.del(cid, Some(p)).expect_ok();
    }
    node.assert_clean();
}

#[test]
fn without_a_reboot_reservations_of_vanished_pods_stay() {
    let node = Node::new("10.244.22.1/24");
    node.set_boot("same-boot");
    let pods: Vec<Netns> = (0..3).map(|_| Netns::new("cr")).collect();
    for (i, p) in pods.iter().enumerate() {
        node.add(&format!("gone{i}"), p);
    }
    reboot(&node, pods, "same-boot");
    let pod = Netns::new("cr");
    let out = add_out(&node, "next", &pod);
    assert!(!out.stderr.contains("freed"), "{}", out.stderr);
    assert_eq!(ip_of(&out.json()), "10.244.22.5");
    assert_eq!(node.reserved().len(), 4, "only DEL or GC frees an address within a boot");
    // STATUS and CHECK in the same boot free nothing either.
    node.cni_raw("STATUS", &[], node.conf("1.1.0").to_string().as_bytes()).expect_ok();
    assert_eq!(node.reserved().len(), 4);
    for i in 0..3 {
        node.del(&format!("gone{i}"), None).expect_ok();
    }
    node.del("next", Some(&pod)).expect_ok();
    node.assert_clean();
}

#[test]
fn twenty_adds_racing_after_a_reboot_free_the_old_set_once() {
    let node = Node::new("10.244.23.1/24");
    node.set_boot("before");
    let old: Vec<Netns> = (0..5).map(|_| Netns::new("cr")).collect();
    for (i, p) in old.iter().enumerate() {
        node.add(&format!("old{i}"), p);
    }
    reboot(&node, old, "after");
    let pods: Vec<Netns> = (0..20).map(|_| Netns::new("cr")).collect();
    let outs: Vec<CniOut> = std::thread::scope(|s| {
        let hs: Vec<_> = pods
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let node = &node;
                s.spawn(move || add_out(node, &format!("c{i}"), p))
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("ADD")).collect()
    });
    let sweeps = outs.iter().filter(|o| o.stderr.contains("freed 5 address(es)")).count();
    assert_eq!(sweeps, 1, "exactly one ADD frees the earlier boot's reservations");
    let mut ips: Vec<String> = outs.iter().map(|o| ip_of(&o.json())).collect();
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), 20, "{ips:?}");
    assert_eq!(node.reserved().len(), 20);
    std::thread::scope(|s| {
        for (i, p) in pods.iter().enumerate() {
            let node = &node;
            s.spawn(move || node.del(&format!("c{i}"), Some(p)).expect_ok());
        }
    });
    node.assert_clean();
}

/// Debian's host-local against the same store: `ADD` or `DEL` of one container.
fn host_local(node: &Node, command: &str, cid: &str, netns: &Netns) -> Value {
    let conf = json!({
        "cniVersion": "0.3.1",
        "name": "cbr0",
        "ipam": {"type": "host-local", "dataDir": node.dir.join("ipam"), "ranges": [[{"subnet": "10.244.24.0/24"}]]},
    });
    let mut child = Command::new("/usr/lib/cni/host-local")
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", cid)
        .env("CNI_NETNS", netns.path())
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/usr/lib/cni")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("host-local (apt-get install containernetworking-plugins)");
    use std::io::Write;
    child.stdin.take().unwrap().write_all(conf.to_string().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "host-local {command}: {}", String::from_utf8_lossy(&out.stdout));
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

#[test]
fn a_store_written_by_host_local_is_taken_as_this_boots() {
    let node = Node::new("10.244.24.1/24");
    node.set_boot("switch-boot");
    let dead = Netns::new("cr");
    // Upstream's stack reserved .2; its pod may well be alive: no boot record yet.
    assert_eq!(ip_of(&host_local(&node, "ADD", "upstream-pod", &dead)), "10.244.24.2");
    assert!(!node.ipam_dir().join("boot_id").exists());
    let pod = Netns::new("cr");
    let out = add_out(&node, "ours", &pod);
    assert!(!out.stderr.contains("freed"), "{}", out.stderr);
    assert_eq!(ip_of(&out.json()), "10.244.24.3");
    assert_eq!(node.reserved(), ["10.244.24.2", "10.244.24.3"]);
    assert_eq!(std::fs::read_to_string(node.ipam_dir().join("boot_id")).unwrap(), "switch-boot");
    // host-local still reads and writes the store beside the boot record.
    assert_eq!(ip_of(&host_local(&node, "ADD", "upstream-2", &dead)), "10.244.24.4");
    host_local(&node, "DEL", "upstream-2", &dead);
    host_local(&node, "DEL", "upstream-pod", &dead);
    node.del("ours", Some(&pod)).expect_ok();
    node.assert_clean();
}
