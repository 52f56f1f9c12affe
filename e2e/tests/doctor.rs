//! `flanneld doctor` on the namespace test-bed: a healthy cluster is all OK;
//! each fault an operator meets, injected one at a time, is reported as FAIL
//! or WARN naming the check (and the peer), and OK again once undone.

use std::time::Duration;

use e2e::Netns;
use e2e::cluster::{Cluster, run_in};
use serde_json::Value;

const READY: Duration = Duration::from_secs(30);

fn cluster(backend: &str) -> Cluster {
    let mut c = Cluster::new("dr");
    c.put_config(&format!(r#"{{"Network":"10.244.0.0/16","Backend":{{"Type":"{backend}"}}}}"#));
    three_nodes_meshed(&mut c);
    c
}

/// Three nodes, each routing to both others (IPv4), a pod on each.
fn three_nodes_meshed(c: &mut Cluster) {
    for i in 0..3 {
        c.add_node();
        c.start_agent(i, &[]);
    }
    for i in 0..3 {
        assert!(c.wait_ready(i, READY), "node{}: {}", i + 1, c.nodes[i].log());
    }
    // Ready is the first listing programmed; a node that joined after it arrives
    // by the watch a moment later. Doctor's "healthy" is the converged mesh.
    for i in 0..3 {
        let meshed = e2e::wait_until(READY, || c.nodes[i].flannel_routes().len() == 2);
        assert!(meshed, "node{} never routed to both peers: {}", i + 1, c.nodes[i].log());
    }
    for i in 0..3 {
        c.add_pod(i);
    }
}

/// The checks (and peer problems) at `level`, as "check: evidence".
fn at(report: &Value, level: &str) -> Vec<String> {
    let mut out: Vec<String> = report["checks"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["level"] == level)
        .map(|c| format!("{}: {}", c["check"].as_str().unwrap_or(""), c["evidence"].as_str().unwrap_or("")))
        .collect();
    out.extend(report["peer_problems"].as_array().into_iter().flatten().filter(|p| p["level"] == level).map(|p| {
        format!(
            "peer {} ({}): {}",
            p["subnet"].as_str().unwrap_or(""),
            p["public_ip"].as_str().unwrap_or(""),
            p["problem"].as_str().unwrap_or("")
        )
    }));
    out
}

fn assert_healthy(c: &Cluster, i: usize) {
    let (code, r) = c.doctor(i, &[]);
    assert_eq!(code, 0, "node{}: {:?} {:?}\n{r:#}", i + 1, at(&r, "FAIL"), at(&r, "WARN"));
    assert_eq!(r["peers"], 2);
    assert_eq!(r["peers_ok"], 2);
    assert!(r["verdict"].as_str().unwrap().starts_with("OK: 2 of 2 peers reachable"), "{r:#}");
}

/// Waits for doctor on node `i` to report a FAIL (or WARN) containing `what`.
fn expect(c: &Cluster, i: usize, level: &str, what: &str) -> Value {
    let mut last = Value::Null;
    let ok = e2e::wait_until(Duration::from_secs(15), || {
        let (code, r) = c.doctor(i, &[]);
        let hit = at(&r, level).iter().any(|l| l.contains(what));
        let code_ok = if level == "FAIL" { code == 2 } else { code >= 1 };
        last = r;
        hit && code_ok
    });
    assert!(ok, "node{}: no {level} with {what:?}: FAIL {:?} WARN {:?}", i + 1, at(&last, "FAIL"), at(&last, "WARN"));
    last
}

/// The finding of `check` in a report.
fn finding<'a>(report: &'a Value, check: &str) -> &'a Value {
    let checks = report["checks"].as_array().expect("checks");
    checks.iter().find(|c| c["check"] == check).unwrap_or_else(|| panic!("no {check:?} in {report:#}"))
}

const ETHTOOL_GTXCSUM: u32 = 0x16;
const ETHTOOL_STXCSUM: u32 = 0x17;

/// One ethtool value request (`struct ethtool_value`) on `dev` in `ns` through the
/// SIOCETHTOOL ioctl, the test's own reading of what `ethtool -k`/`-K` show and set
/// (ethtool is not on the test-bed); returns the value the kernel left.
fn ethtool(ns: &Netns, dev: &str, cmd: u32, data: u32) -> u32 {
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    let dev = dev.to_string();
    flannel_shared::netns::run_in(&ns.open(), move || {
        // SAFETY: a socket closed below, an ifreq naming the device, an ethtool_value that
        // outlives the ioctl.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
            assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
            let mut ifr: libc::ifreq = std::mem::zeroed();
            for (d, s) in ifr.ifr_name.iter_mut().zip(dev.bytes()) {
                *d = s as libc::c_char;
            }
            let mut v = EthtoolValue { cmd, data };
            ifr.ifr_ifru.ifru_data = (&mut v as *mut EthtoolValue).cast();
            let rc = libc::ioctl(fd, libc::SIOCETHTOOL as _, &mut ifr);
            let err = std::io::Error::last_os_error();
            libc::close(fd);
            assert_eq!(rc, 0, "SIOCETHTOOL {cmd:#x} on {dev}: {err}");
            v.data
        }
    })
    .expect("enter the node's namespace")
}

/// `ethtool -k DEV | grep tx-checksumming`.
fn tx_checksumming(ns: &Netns, dev: &str) -> bool {
    ethtool(ns, dev, ETHTOOL_GTXCSUM, 0) != 0
}

/// The running kernel as (major, minor), read here from procfs (doctor uses uname).
fn kernel() -> (String, (u32, u32)) {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("osrelease");
    let mut it = release.trim().split(|c: char| !c.is_ascii_digit()).map(|n| n.parse::<u32>().expect("version"));
    let v = (it.next().expect("major"), it.next().expect("minor"));
    (format!("{}.{}", v.0, v.1), v)
}

/// Doctor's offload finding for node `i`'s `dev` matches the device's real state and the kernel.
fn assert_offload_reported(c: &Cluster, i: usize, dev: &str) -> bool {
    let on = tx_checksumming(&c.nodes[i].ns, dev);
    let (shown, version) = kernel();
    let (_, r) = c.doctor(i, &[]);
    let f = finding(&r, &format!("tx checksum {dev}"));
    let want = format!("tx-checksumming {}, kernel {shown}: ", if on { "on" } else { "off" });
    assert!(f["evidence"].as_str().unwrap().starts_with(&want), "want {want:?}: {f:#}");
    let bites = on && version < (5, 7);
    assert_eq!(f["level"], if bites { "WARN" } else { "OK" }, "{f:#}");
    if bites {
        assert_eq!(
            f["fix"].as_str().unwrap().split(" (").next(),
            Some(&*format!("ethtool -K {dev} tx-checksum-ip-generic off"))
        );
    }
    on
}

#[test]
fn vxlan_faults_are_named() {
    let mut c = cluster("vxlan");
    for i in 0..3 {
        assert_healthy(&c, i);
    }
    let n2_ip = c.nodes[1].ip.to_string();

    // UDP checksum offload on the VTEP as the kernel has it (a new VXLAN device has
    // tx-checksum-ip-generic on); switched, doctor reads the new state; switched back.
    let ns = &c.nodes[0].ns;
    let on = assert_offload_reported(&c, 0, "flannel.1");
    ethtool(ns, "flannel.1", ETHTOOL_STXCSUM, u32::from(!on));
    assert_eq!(tx_checksumming(ns, "flannel.1"), !on, "the test could not switch the offload");
    assert_eq!(assert_offload_reported(&c, 0, "flannel.1"), !on);
    ethtool(ns, "flannel.1", ETHTOOL_STXCSUM, u32::from(on));
    assert_eq!(assert_offload_reported(&c, 0, "flannel.1"), on);

    // UDP 8472 dropped on node 2: node 1 cannot reach it through the tunnel, node 2 says why.
    run_in(&c.nodes[1].ns, "iptables", &["-I", "INPUT", "-p", "udp", "--dport", "8472", "-j", "DROP"]);
    let r = expect(&c, 0, "FAIL", &format!("({n2_ip}): no answer through the VXLAN tunnel"));
    assert!(
        r["verdict"].as_str().unwrap().contains(&format!("1 fail: no answer through the VXLAN tunnel towards {n2_ip}")),
        "{r:#}"
    );
    expect(&c, 1, "FAIL", "UDP 8472 is dropped here");
    run_in(&c.nodes[1].ns, "iptables", &["-D", "INPUT", "-p", "udp", "--dport", "8472", "-j", "DROP"]);
    assert_healthy(&c, 0);

    // Node 2's uplink MTU lowered: small packets pass, full-size ones with DF do not.
    run_in(&c.nodes[1].ns, "ip", &["link", "set", "eth0", "mtu", "1400"]);
    expect(&c, 0, "FAIL", &format!("({n2_ip}): 1450-byte packets with DF do not arrive"));
    run_in(&c.nodes[1].ns, "ip", &["link", "set", "eth0", "mtu", "1500"]);
    assert_healthy(&c, 0);

    // Node 2 reinstalled while its agent is down: its VTEP has a new MAC, its lease the old one.
    c.kill_agent(1);
    let old = c.nodes[1].ns.ip_json(&["link", "show", "flannel.1"])[0]["address"].as_str().unwrap().to_string();
    run_in(&c.nodes[1].ns, "ip", &["link", "set", "flannel.1", "address", "0e:42:42:42:42:42"]);
    expect(&c, 0, "FAIL", &format!("({n2_ip}): no answer through the VXLAN tunnel"));
    expect(&c, 1, "FAIL", "agent: not running here");
    run_in(&c.nodes[1].ns, "ip", &["link", "set", "flannel.1", "address", &old]);
    c.start_agent(1, &[]);
    assert!(c.wait_ready(1, READY));
    assert_healthy(&c, 0);
    assert_healthy(&c, 1);

    // A foreign MASQUERADE of the whole pod network, on node 1.
    let masq = ["-t", "nat", "-I", "POSTROUTING", "-s", "10.244.0.0/16", "-j", "MASQUERADE"];
    run_in(&c.nodes[0].ns, "iptables", &masq);
    expect(&c, 0, "FAIL", "masquerades pod-to-pod traffic");
    run_in(&c.nodes[0].ns, "iptables", &["-t", "nat", "-D", "POSTROUTING", "-s", "10.244.0.0/16", "-j", "MASQUERADE"]);

    // cni0 carrying an address from another subnet.
    run_in(&c.nodes[0].ns, "ip", &["addr", "add", "10.99.7.1/24", "dev", "cni0"]);
    expect(&c, 0, "FAIL", "cni0: carries 10.99.7.1/24");
    run_in(&c.nodes[0].ns, "ip", &["addr", "del", "10.99.7.1/24", "dev", "cni0"]);

    // A reservation whose pod is gone (a runtime that never sent DEL).
    let leak = c.nodes[0].dir.join("ipam/cbr0/10.244.0.250");
    let subnet = c.nodes[0].subnet().unwrap();
    let leaked = format!("{}.250", subnet.rsplit_once('.').unwrap().0);
    let leak = leak.with_file_name(&leaked);
    std::fs::write(&leak, "dead-container\r\neth0").unwrap();
    expect(
        &c,
        0,
        "WARN",
        &format!("IP store: 1 of 2 reservation(s) have no pod here (no veth): {leaked} (dead-contain"),
    );
    std::fs::remove_file(&leak).unwrap();

    // Strict reverse-path filtering on the node.
    run_in(&c.nodes[0].ns, "sysctl", &["-qw", "net.ipv4.conf.all.rp_filter=1"]);
    expect(&c, 0, "WARN", "rp_filter: strict (1) on eth0, cni0, flannel.1");
    run_in(&c.nodes[0].ns, "sysctl", &["-qw", "net.ipv4.conf.all.rp_filter=0"]);

    // bridge-nf-call-iptables off: a warning (exit 1), not a failure.
    run_in(&c.nodes[0].ns, "sysctl", &["-qw", "net.bridge.bridge-nf-call-iptables=0"]);
    expect(&c, 0, "WARN", "bridge-nf-call-iptables: 0");
    run_in(&c.nodes[0].ns, "sysctl", &["-qw", "net.bridge.bridge-nf-call-iptables=1"]);

    // FORWARD policy DROP with flannel's forward rules turned off.
    c.start_agent(0, &["--iptables-forward-rules=false"]);
    assert!(c.wait_ready(0, READY));
    run_in(&c.nodes[0].ns, "iptables", &["-P", "FORWARD", "DROP"]);
    expect(&c, 0, "FAIL", "policy DROP and flannel's accept rules are not there");
    run_in(&c.nodes[0].ns, "iptables", &["-P", "FORWARD", "ACCEPT"]);
    c.start_agent(0, &[]);
    assert!(c.wait_ready(0, READY));
    assert_healthy(&c, 0);

    // subnet.env for an old Network.
    let env = c.nodes[0].subnet_file();
    let text = std::fs::read_to_string(&env).unwrap();
    c.kill_agent(0);
    std::fs::write(&env, text.replace("FLANNEL_NETWORK=10.244.0.0/16", "FLANNEL_NETWORK=10.0.0.0/8")).unwrap();
    expect(
        &c,
        0,
        "FAIL",
        "subnet.env: FLANNEL_NETWORK 10.0.0.0/8 / FLANNEL_IPV6_NETWORK -, but the network config says 10.244.0.0/16",
    );
}

#[test]
fn host_gw_healthy_then_a_blocked_peer() {
    let c = cluster("host-gw");
    for i in 0..3 {
        assert_healthy(&c, i);
    }
    // Node 3 stops forwarding pod traffic: its pods' gateway stops answering through the route.
    let n3_ip = c.nodes[2].ip.to_string();
    run_in(&c.nodes[2].ns, "iptables", &["-I", "INPUT", "-s", "192.0.2.0/24", "-d", "10.244.0.0/16", "-j", "DROP"]);
    let r = expect(&c, 0, "FAIL", &format!("({n3_ip}): no answer via its address"));
    assert_eq!(r["peers_ok"], 1, "{r:#}");
    run_in(&c.nodes[2].ns, "iptables", &["-D", "INPUT", "-s", "192.0.2.0/24", "-d", "10.244.0.0/16", "-j", "DROP"]);
    assert_healthy(&c, 0);
}

/// The human form: a table and a one-line verdict, and `--help` says it changes nothing.
#[test]
fn table_and_help() {
    let c = cluster("vxlan");
    let bin = e2e::cluster::bin_path("flanneld");
    let help = std::process::Command::new(&bin).args(["doctor", "--help"]).output().unwrap();
    assert!(String::from_utf8_lossy(&help.stdout).contains("Read-only"), "{}", String::from_utf8_lossy(&help.stdout));
    let out = c.nodes[0]
        .ns
        .command(bin.to_str().unwrap())
        .args(["doctor", &format!("--etcd-endpoints={}", c.endpoint()), "--healthz-port=8471"])
        .arg(format!("--subnet-file={}", c.nodes[0].subnet_file().display()))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("OK    VTEP flannel.1") && text.lines().last().unwrap().starts_with("OK: 2 of 2 peers reachable"),
        "{text}"
    );
    assert!(!text.contains("\x1b["), "no colour when not a terminal");
    assert_eq!(out.status.code(), Some(0));
    // A blocked peer in the table: the peer, the problem, the fix, the verdict; exit 2.
    run_in(&c.nodes[2].ns, "iptables", &["-I", "INPUT", "-p", "udp", "--dport", "8472", "-j", "DROP"]);
    let out = c.nodes[0]
        .ns
        .command(bin.to_str().unwrap())
        .args(["doctor", &format!("--etcd-endpoints={}", c.endpoint()), "--healthz-port=8471", "--ip-masq"])
        .arg(format!("--subnet-file={}", c.nodes[0].subnet_file().display()))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}");
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(text.contains("peers with problems (1 of 2):") && text.contains("fix: allow UDP 8472"), "{text}");
    let verdict = text.lines().last().unwrap();
    assert!(
        verdict
            .starts_with("FAIL: 1 of 2 peers reachable; 1 fail: no answer through the VXLAN tunnel towards 192.0.2.3"),
        "{text}"
    );
}

/// A healthy dual-stack cluster of `backend`: doctor on every node probes both families
/// of both peers (VTEP addresses over vxlan, cni0 gateways over host-gw), all OK.
fn dual_stack(backend: &str) -> Cluster {
    let mut c = Cluster::new("dd");
    c.enable_ipv6();
    c.put_config(&format!(
        r#"{{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{{"Type":"{backend}"}}}}"#
    ));
    three_nodes_meshed(&mut c);
    let mtu = if backend == "vxlan" { 1430 } else { 1500 };
    for i in 0..3 {
        // A fresh node's IPv6 neighbours may take a moment (DAD on the uplink): wait for all OK.
        let mut last = Value::Null;
        let ok = e2e::wait_until(Duration::from_secs(15), || {
            let (code, r) = c.doctor(i, &[]);
            let healthy = code == 0 && both_probed(&r, mtu);
            last = r;
            healthy
        });
        assert!(ok, "node{}: FAIL {:?} WARN {:?}\n{last:#}", i + 1, at(&last, "FAIL"), at(&last, "WARN"));
        assert_eq!((last["peers"].as_u64(), last["peers_ok"].as_u64()), (Some(2), Some(2)), "{last:#}");
        if backend == "vxlan" {
            assert_eq!(finding(&last, "VTEP flannel-v6.1")["level"], "OK", "{last:#}");
        }
    }
    c
}

/// Both peers' IPv4 and IPv6 addresses probed and answering.
fn both_probed(r: &Value, mtu: u32) -> bool {
    let probes = finding(r, "peer probes")["evidence"].as_str().unwrap_or_default().to_string();
    probes.starts_with(&format!("2 IPv4 + 2 IPv6 address(es) echoed small and at {mtu} bytes with DF: 4 answered"))
}

#[test]
fn dual_stack_host_gw_probes_both_families() {
    dual_stack("host-gw");
}

/// Dual-stack vxlan: IPv6 VXLAN dropped on one node fails that peer by its IPv6
/// address (its IPv4 half still answers); OK again once undone.
#[test]
fn dual_stack_probes_both_families() {
    let c = dual_stack("vxlan");
    // Node 2 drops VXLAN over IPv6: node 1 reaches its IPv4 VTEP but not its IPv6 one.
    let (n2_ip, n2_ip6) = (c.nodes[1].ip.to_string(), c.nodes[1].ip6.expect("node IPv6").to_string());
    let rule = ["INPUT", "-p", "udp", "--dport", "8472", "-j", "DROP"];
    run_in(&c.nodes[1].ns, "ip6tables", &[&["-I"][..], &rule].concat());
    let r = expect(&c, 0, "FAIL", &format!("({n2_ip6}): no answer through the VXLAN tunnel"));
    let verdict = r["verdict"].as_str().unwrap();
    assert!(
        verdict.starts_with(&format!(
            "FAIL: 1 of 2 peers reachable; 1 fail: no answer through the VXLAN tunnel towards {n2_ip6};"
        )),
        "{r:#}"
    );
    assert!(!at(&r, "FAIL").iter().any(|f| f.contains(&format!("({n2_ip})"))), "node 2's IPv4 half: {r:#}");
    let s6 = c.nodes[1].subnet6().unwrap();
    let p = &r["peer_problems"][0];
    assert_eq!((p["subnet"].as_str(), p["public_ip"].as_str()), (Some(s6.as_str()), Some(n2_ip6.as_str())), "{r:#}");
    assert!(p["detail"].as_str().unwrap().starts_with("ping -6 fd00:10:244:"), "{r:#}");
    run_in(&c.nodes[1].ns, "ip6tables", &[&["-D"][..], &rule].concat());
    let (code, r) = c.doctor(0, &[]);
    assert!(code == 0 && both_probed(&r, 1430), "FAIL {:?} WARN {:?}\n{r:#}", at(&r, "FAIL"), at(&r, "WARN"));
    assert_eq!(r["peers_ok"], 2);
}

/// IPv6-only vxlan: the peers are checked and probed over IPv6 alone.
#[test]
fn ipv6_only_peers_are_probed() {
    let mut c = Cluster::new("d6");
    c.ipv6_only();
    c.put_config(
        r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"vxlan"}}"#,
    );
    for i in 0..2 {
        c.add_node();
        c.start_agent(i, &[]);
    }
    for i in 0..2 {
        assert!(c.wait_ready(i, READY), "node{}: {}", i + 1, c.nodes[i].log());
    }
    let mut last = Value::Null;
    let ok = e2e::wait_until(Duration::from_secs(15), || {
        let (code, r) = c.doctor(0, &[]);
        let probes = finding(&r, "peer probes")["evidence"].as_str().unwrap_or_default().to_string();
        let healthy =
            code == 0 && probes.starts_with("1 IPv6 address(es) echoed small and at 1430 bytes with DF: 1 answered");
        last = r;
        healthy
    });
    assert!(ok, "FAIL {:?} WARN {:?}\n{last:#}", at(&last, "FAIL"), at(&last, "WARN"));
    assert_eq!((last["peers"].as_u64(), last["peers_ok"].as_u64()), (Some(1), Some(1)), "{last:#}");
    // Node 2 drops VXLAN over IPv6: its only family goes silent.
    let n2_ip6 = c.nodes[1].ip6.expect("node IPv6").to_string();
    run_in(&c.nodes[1].ns, "ip6tables", &["-I", "INPUT", "-p", "udp", "--dport", "8472", "-j", "DROP"]);
    let r = expect(&c, 0, "FAIL", &format!("({n2_ip6}): no answer through the VXLAN tunnel"));
    assert_eq!(r["peers_ok"], 0, "{r:#}");
}

#[test]
fn wireguard_healthy_then_a_dead_peer_and_a_missing_device() {
    use e2e::wireguard::{device_peers, doctor, start_node};
    let mut c = Cluster::new("dw");
    c.put_config(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"wireguard"}}"#);
    for i in 0..3 {
        c.add_node();
        start_node(&mut c, i);
    }
    for i in 0..3 {
        assert!(c.wait_ready(i, READY), "node{}: {}", i + 1, c.nodes[i].log());
        let meshed = e2e::wait_until(READY, || device_peers(&c.nodes[i], "flannel-wg").len() == 2);
        assert!(meshed, "node{}: {}", i + 1, c.nodes[i].log());
    }
    for i in 0..3 {
        c.add_pod(i);
    }
    for i in 0..3 {
        let (code, r) = doctor(&c, i);
        assert_eq!(code, 0, "node{}: {:?} {:?}\n{r:#}", i + 1, at(&r, "FAIL"), at(&r, "WARN"));
        assert_eq!((r["peers"].as_u64(), r["peers_ok"].as_u64()), (Some(2), Some(2)), "{r:#}");
        let dev = finding(&r, "WireGuard flannel-wg");
        assert_eq!(dev["evidence"], "userspace (TUN), UDP port 51820, MTU 1420, up, 2 peers", "{dev:#}");
    }
    // Node3's agent killed: its userspace device goes with it; node1 names the peer.
    c.kill_agent(2);
    let subnet3 = c.nodes[2].subnet().unwrap();
    let ok = e2e::wait_until(Duration::from_secs(15), || {
        let (code, r) = doctor(&c, 0);
        code == 2
            && at(&r, "FAIL")
                .iter()
                .any(|l| l.contains(&subnet3) && l.contains("no answer through the WireGuard tunnel"))
    });
    assert!(ok, "{:#}", doctor(&c, 0).1);
    // And node3 says why: no agent, no device.
    let (code, r) = doctor(&c, 2);
    assert_eq!(code, 2);
    let fails = at(&r, "FAIL");
    assert!(fails.iter().any(|l| l.starts_with("WireGuard flannel-wg: missing")), "{fails:?}");
    // Back: healthy again.
    start_node(&mut c, 2);
    assert!(c.wait_ready(2, READY));
    let ok = e2e::wait_until(Duration::from_secs(15), || doctor(&c, 0).0 == 0);
    assert!(ok, "{:#}", doctor(&c, 0).1);
}
