//! The README's main command, run as a user would: `e2e demo`, both backends.

use std::process::Command;

fn demo(args: &[&str]) -> String {
    let bin = e2e::cluster::bin_path("e2e");
    let out = Command::new(&bin).arg("demo").args(args).output().expect("run e2e demo");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "e2e demo {args:?} failed:\n{text}\n{}", String::from_utf8_lossy(&out.stderr));
    text
}

fn demo_namespaces() -> usize {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.starts_with("demo-")).count()
}

// One test, run in sequence: demos share the `demo-` namespace prefix that `e2e down` cleans.
#[test]
fn demo_shows_the_cluster_and_cleans_up() {
    let text = demo(&["--nodes", "2"]);
    for want in [
        "FLANNEL_SUBNET=10.244.",
        "dev flannel.1 proto 76 onlink",
        "ttl=62",
        ".8472: OTV",
        "instance 1",
        "answered by \"",
    ] {
        assert!(text.contains(want), "vxlan demo output lacks {want:?}:\n{text}");
    }
    assert!(!text.contains("FAILED"), "{text}");
    assert_eq!(demo_namespaces(), 0, "the demo left namespaces behind");

    let text = demo(&["--backend", "host-gw", "--nodes", "2"]);
    assert!(text.contains("via 192.0.2.") && text.contains("ttl=62") && text.contains("ICMP echo request"), "{text}");
    assert!(!text.contains("8472"), "host-gw must not show VXLAN:\n{text}");

    // --keep leaves it running for `e2e down`.
    demo(&["--nodes", "2", "--keep"]);
    assert!(demo_namespaces() > 0);
    let out = Command::new(e2e::cluster::bin_path("e2e")).arg("down").output().unwrap();
    assert!(out.status.success());
    assert_eq!(demo_namespaces(), 0);

    let bad = Command::new(e2e::cluster::bin_path("e2e")).args(["demo", "--backend", "udp"]).output().unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--backend udp: must be vxlan, host-gw or wireguard"));
}
