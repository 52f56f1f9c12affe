//! flanneld in etcd mode against a real etcd, nodes as network namespaces.

use std::collections::HashSet;
use std::time::Duration;

use e2e::cluster::Cluster;
use e2e::wait_until;
use serde_json::Value;

const VXLAN: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;
const HOST_GW: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#;
const READY: Duration = Duration::from_secs(30);

fn cluster(n: usize, netconf: &str) -> Cluster {
    let mut c = Cluster::new("fe");
    c.put_config(netconf);
    for i in 0..n {
        c.add_node();
        c.start_agent(i, &[]);
    }
    for i in 0..n {
        assert!(c.wait_ready(i, READY), "node{} not ready:\n{}", i + 1, c.nodes[i].log());
    }
    c
}

/// Whether node `i`'s kernel holds exactly what its peers' leases call for.
fn matches_leases(c: &Cluster, i: usize, vxlan: bool) -> Result<(), String> {
    let node = &c.nodes[i];
    let own = node.subnet().ok_or("no subnet.env")?;
    let leases: Vec<(String, Value)> = c.leases().into_iter().filter(|(s, _)| *s != own).collect();
    let routes = node.flannel_routes();
    if routes.len() != leases.len() {
        return Err(format!("{} owned routes for {} peers: {routes:?}", routes.len(), leases.len()));
    }
    let (neigh, fdb) = if vxlan {
        let neigh = node.ns.try_ip_json(&["neigh", "show", "dev", "flannel.1"]).ok_or("no flannel.1")?;
        let fdb = node.ns.run("bridge", &["fdb", "show", "dev", "flannel.1"]);
        (neigh, String::from_utf8_lossy(&fdb.stdout).into_owned())
    } else {
        (Value::Null, String::new())
    };
    for (subnet, v) in &leases {
        let public = v["PublicIP"].as_str().ok_or("lease without PublicIP")?;
        let r = routes.iter().find(|r| r["dst"] == *subnet).ok_or(format!("no route to {subnet}"))?;
        if vxlan {
            let gw = subnet.split('/').next().unwrap_or_default();
            let mac = v["BackendData"]["VtepMAC"].as_str().ok_or("no VtepMAC")?;
            if r["gateway"] != gw || r["dev"] != "flannel.1" || !r["flags"].to_string().contains("onlink") {
                return Err(format!("route {r} is not via {gw} dev flannel.1 onlink"));
            }
            let has_arp = neigh.as_array().is_some_and(|a| {
                a.iter().any(|n| n["dst"] == gw && n["lladdr"] == mac && n["state"].to_string().contains("PERMANENT"))
            });
            if !has_arp {
                return Err(format!("no permanent ARP {gw} -> {mac}: {neigh}"));
            }
            if !fdb.lines().any(|l| l.starts_with(mac) && l.contains(&format!("dst {public} "))) {
                return Err(format!("no FDB {mac} -> {public}: {fdb}"));
            }
        } else if r["gateway"] != public || r["dev"] != "eth0" {
            return Err(format!("route {r} is not via {public} dev eth0"));
        }
    }
    Ok(())
}

fn converge(c: &Cluster, vxlan: bool) {
    for i in 0..c.nodes.len() {
        let mut last = Ok(());
        let ok = wait_until(Duration::from_secs(15), || {
            last = matches_leases(c, i, vxlan);
            last.is_ok()
        });
        assert!(ok, "node{}: {last:?}", i + 1);
    }
}

#[test]
fn three_vxlan_agents_get_distinct_subnets_and_program_each_other() {
    let mut c = cluster(3, VXLAN);
    let subnets: HashSet<String> = c.nodes.iter().map(|n| n.subnet().unwrap()).collect();
    assert_eq!(subnets.len(), 3, "{subnets:?}");
    let leases = c.leases();
    assert_eq!(leases.len(), 3);
    for (i, n) in c.nodes.iter().enumerate() {
        let (_, v) = leases.iter().find(|(s, _)| Some(s) == n.subnet().as_ref()).expect("lease for node");
        assert_eq!(v["PublicIP"], n.ip.to_string());
        assert_eq!(v["BackendType"], "vxlan");
        assert_eq!(v["BackendData"]["VNI"], 1);
        let link = n.ns.ip_json(&["-d", "link", "show", "flannel.1"]);
        assert_eq!(v["BackendData"]["VtepMAC"], link[0]["address"], "node{}", i + 1);
        assert_eq!(link[0]["mtu"], 1450);
        let env = n.subnet_env().unwrap();
        assert!(env.contains("FLANNEL_NETWORK=10.244.0.0/16\n") && env.contains("FLANNEL_MTU=1450\n"), "{env}");
        assert!(env.contains("FLANNEL_IPMASQ=true\n"), "{env}");
        // Byte for byte what upstream writes, so upstream agents and tools read it unchanged.
        let key = format!("{}/subnets/{}", e2e::cluster::PREFIX, n.subnet().unwrap().replace('/', "-"));
        let raw = c.etcdctl(&["get", &key, "--print-value-only"]);
        let mac = link[0]["address"].as_str().unwrap();
        let want = format!(
            r#"{{"PublicIP":"{}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{mac}"}}}}"#,
            n.ip
        );
        assert_eq!(raw.trim(), want);
        let info = &link[0]["linkinfo"]["info_data"];
        assert_eq!(info["port"], 8472);
        assert_eq!(info["local"], n.ip.to_string());
        assert_eq!(info["learning"], false);
    }
    converge(&c, true);
    c.assert_idle();

    // Pods on two nodes reach each other through the overlay; two routers on the way.
    let a = c.add_pod(0).ip;
    let b_ip = c.add_pod(1).ip;
    let ttl = c.pods[0].ns.ping(&b_ip.to_string());
    assert_eq!(ttl, Some(62), "pod {a} -> pod {b_ip}");

    // Metrics and readiness.
    let n0 = &c.nodes[0];
    assert_eq!(n0.metric("flannel_peers"), Some(2.0));
    assert_eq!(n0.metric("flannel_routes_programmed"), Some(2.0));
    assert_eq!(n0.metric("flannel_ready"), Some(1.0));
    assert!(n0.metric("flannel_lease_expiry_timestamp_seconds").unwrap() > 1.7e9);
    assert_eq!(n0.http_get("/healthz").map(|r| r.0), Some(200));

    // A lease deleted in etcd disappears from every peer's kernel.
    let gone = c.nodes[2].subnet().unwrap();
    c.stop_agent(2);
    c.etcdctl(&["del", &format!("{}/subnets/{}", e2e::cluster::PREFIX, gone.replace('/', "-"))]);
    for i in 0..2 {
        let node = &c.nodes[i];
        let ok = wait_until(Duration::from_secs(10), || {
            node.flannel_routes().iter().all(|r| r["dst"] != gone.as_str())
                && !node.ns.ip(&["neigh", "show", "dev", "flannel.1"]).contains(gone.split('/').next().unwrap())
        });
        assert!(ok, "node{} still routes {gone}", i + 1);
    }
}

/// `ping -c <count> -i 0.1` from pod `from` to `to`, run while `during` happens; (sent, received).
fn ping_during(
    c: &mut Cluster,
    from: usize,
    to: std::net::Ipv4Addr,
    count: u32,
    during: impl FnOnce(&mut Cluster),
) -> (u32, u32) {
    let child = c.pods[from]
        .ns
        .command("ping")
        .args(["-c", &count.to_string(), "-i", "0.1", "-W", "1", &to.to_string()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("ping");
    during(c);
    let out = child.wait_with_output().expect("ping output");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.contains("packets transmitted")).unwrap_or_else(|| panic!("{text}"));
    let nums: Vec<u32> = line.split(|ch: char| !ch.is_ascii_digit()).filter_map(|w| w.parse().ok()).collect();
    (nums[0], nums[1])
}

#[test]
fn host_gw_agents_route_via_peers_and_pods_talk() {
    let mut c = cluster(3, HOST_GW);
    converge(&c, false);
    c.assert_idle();
    assert!(!c.nodes[0].ns.links().iter().any(|l| l.starts_with("flannel.")), "host-gw must not create a VTEP");
    let env = c.nodes[0].subnet_env().unwrap();
    assert!(env.contains("FLANNEL_MTU=1500\n"), "{env}");
    c.add_pod(0);
    let b = c.add_pod(2).ip.to_string();
    assert_eq!(c.pods[0].ns.ping(&b), Some(62));
}

#[test]
fn kill_9_and_restart_keeps_subnet_vtep_mac_and_traffic() {
    let mut c = cluster(2, VXLAN);
    converge(&c, true);
    let subnet = c.nodes[1].subnet().unwrap();
    let mac = c.nodes[1].ns.ip_json(&["link", "show", "flannel.1"])[0]["address"].clone();
    c.add_pod(0);
    let b = c.add_pod(1).ip;
    assert_eq!(c.pods[0].ns.ping(&b.to_string()), Some(62));
    let (sent, got) = ping_during(&mut c, 0, b, 40, |c| {
        std::thread::sleep(Duration::from_millis(500));
        c.kill_agent(1);
        // Routes and lease stay while the agent is away.
        assert!(!c.nodes[1].flannel_routes().is_empty());
        std::thread::sleep(Duration::from_millis(500));
        c.start_agent(1, &[]);
        assert!(c.wait_ready(1, READY), "{}", c.nodes[1].log());
    });
    assert!(sent - got <= 1, "lost {} of {sent} packets across an agent restart", sent - got);
    assert_eq!(c.nodes[1].subnet().unwrap(), subnet);
    assert_eq!(c.nodes[1].ns.ip_json(&["link", "show", "flannel.1"])[0]["address"], mac);
    let (_, lease) = c.leases().into_iter().find(|(s, _)| *s == subnet).unwrap();
    assert_eq!(lease["BackendData"]["VtepMAC"], mac);
    assert!(c.nodes[1].log().contains("reusing subnet"), "{}", c.nodes[1].log());
    converge(&c, true);

    // SIGTERM leaves the data path alone too.
    c.stop_agent(1);
    assert_eq!(c.nodes[1].flannel_routes().len(), 1);
    assert_eq!(c.pods[0].ns.ping(&b.to_string()), Some(62));
}

#[test]
fn hand_deleted_state_comes_back() {
    let mut c = cluster(2, VXLAN);
    converge(&c, true);
    c.add_pod(0);
    let b = c.add_pod(1).ip.to_string();
    let n0 = &c.nodes[0];
    let peer = c.nodes[1].subnet().unwrap();
    let gw = peer.split('/').next().unwrap().to_string();

    n0.ns.ip(&["route", "del", &peer]);
    assert!(wait_until(Duration::from_secs(5), || matches_leases(&c, 0, true).is_ok()), "route not restored");
    n0.ns.ip(&["neigh", "del", &gw, "dev", "flannel.1"]);
    assert!(wait_until(Duration::from_secs(5), || matches_leases(&c, 0, true).is_ok()), "ARP entry not restored");
    let fdb = e2e::cluster::run_in(&n0.ns, "bridge", &["fdb", "show", "dev", "flannel.1"]);
    // "<mac> dst <ip> self permanent"
    let entry: Vec<&str> = fdb.lines().find(|l| l.contains(" dst ")).unwrap().split_whitespace().collect();
    e2e::cluster::run_in(&n0.ns, "bridge", &["fdb", "del", entry[0], "dev", "flannel.1", "dst", entry[2]]);
    assert!(wait_until(Duration::from_secs(5), || matches_leases(&c, 0, true).is_ok()), "FDB entry not restored");

    // The whole VTEP: recreated with the same MAC, every peer replayed into it.
    let mac = n0.ns.ip_json(&["link", "show", "flannel.1"])[0]["address"].clone();
    n0.ns.ip(&["link", "del", "flannel.1"]);
    assert!(wait_until(Duration::from_secs(5), || matches_leases(&c, 0, true).is_ok()), "VTEP not rebuilt");
    assert_eq!(n0.ns.ip_json(&["link", "show", "flannel.1"])[0]["address"], mac);
    assert_eq!(c.pods[0].ns.ping(&b), Some(62));
    assert!(n0.metric("flannel_vtep_recreations_total").unwrap() >= 1.0);
    // The periodic pass is a minute away: kernel notifications brought all of this back.
    assert!(n0.metric("flannel_kernel_changes_total").unwrap() >= 4.0);

    // A route we do not own is never touched.
    n0.ns.ip(&["route", "add", "10.99.0.0/16", "via", "192.0.2.254"]);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(n0.ns.ip(&["route", "show", "10.99.0.0/16"]).contains("via 192.0.2.254"));
}

#[test]
fn etcd_outage_is_survived_without_restarts() {
    let mut c = cluster(2, VXLAN);
    converge(&c, true);
    c.add_pod(0);
    let b = c.add_pod(1).ip.to_string();
    c.stop_etcd();
    std::thread::sleep(Duration::from_secs(10));
    assert!(c.nodes[0].agent_running() && c.nodes[1].agent_running(), "an agent died with etcd away");
    assert_eq!(c.pods[0].ns.ping(&b), Some(62), "data path changed while etcd was away");
    // Hand-deleted routes are still restored from what the agent knows.
    let peer = c.nodes[1].subnet().unwrap();
    c.nodes[0].ns.ip(&["route", "del", &peer]);
    assert!(wait_until(Duration::from_secs(5), || matches_leases_offline(&c, 0, &peer)));
    c.start_etcd();
    // The watch comes back on its own: a node joining now is programmed everywhere.
    let n = c.add_node();
    c.start_agent(n, &[]);
    assert!(c.wait_ready(n, READY), "{}", c.nodes[n].log());
    converge(&c, true);
    assert!(c.nodes[0].metric("flannel_watch_restarts_total").unwrap() >= 1.0);
    assert!(c.nodes[0].agent_running() && c.nodes[1].agent_running());
}

/// With etcd down only the route can be checked (leases cannot be read).
fn matches_leases_offline(c: &Cluster, i: usize, peer: &str) -> bool {
    c.nodes[i].flannel_routes().iter().any(|r| r["dst"] == peer)
}

#[test]
fn ten_agents_racing_for_eight_subnets() {
    let mut c = Cluster::new("fr");
    c.put_config(
        r#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.1.0","SubnetMax":"10.244.8.0","Backend":{"Type":"host-gw"}}"#,
    );
    for _ in 0..10 {
        c.add_node();
    }
    for i in 0..10 {
        c.start_agent(i, &[]);
    }
    assert!(wait_until(Duration::from_secs(30), || c.leases().len() == 8));
    std::thread::sleep(Duration::from_secs(1));
    let leases = c.leases();
    assert_eq!(leases.len(), 8);
    let subnets: HashSet<&String> = leases.iter().map(|(s, _)| s).collect();
    let ips: HashSet<String> = leases.iter().map(|(_, v)| v["PublicIP"].to_string()).collect();
    assert_eq!((subnets.len(), ips.len()), (8, 8), "{leases:?}");
    // The two without a subnet say why (on their next retry once all eight are taken) and keep trying.
    let msg = "no free subnet left in 10.244.0.0/16 between 10.244.1.0 and 10.244.8.0 (8 leased)";
    let refused = |c: &Cluster| c.nodes.iter().filter(|n| n.log().contains(msg)).count();
    assert!(wait_until(Duration::from_secs(15), || refused(&c) == 2), "{} agents refused", refused(&c));
    for n in &mut c.nodes {
        if n.log().contains(msg) {
            assert!(n.subnet_env().is_none(), "a node without a lease wrote subnet.env");
            assert!(n.agent_running(), "exhaustion is retried, not fatal");
        }
    }
    assert_eq!(c.leases().len(), 8);
}

#[test]
fn own_lease_deleted_or_expired() {
    let mut c = cluster(2, VXLAN);
    converge(&c, true);
    // Someone deletes our lease: it is claimed again (same subnet) within moments.
    let own = c.nodes[0].subnet().unwrap();
    c.etcdctl(&["del", &format!("{}/subnets/{}", e2e::cluster::PREFIX, own.replace('/', "-"))]);
    assert!(wait_until(Duration::from_secs(10), || c.leases().iter().any(|(s, _)| *s == own)), "not reclaimed");
    converge(&c, true);

    // A short TTL: a live agent keeps renewing, a dead one's lease expires and peers drop it.
    let n = c.add_node();
    c.start_agent(n, &["--subnet-lease-ttl=4"]);
    assert!(c.wait_ready(n, READY), "{}", c.nodes[n].log());
    converge(&c, true);
    std::thread::sleep(Duration::from_secs(6));
    let short = c.nodes[n].subnet().unwrap();
    assert!(c.leases().iter().any(|(s, _)| *s == short), "renewal failed: {}", c.nodes[n].log());
    assert!(c.nodes[n].log().contains("renewed lease"));
    c.kill_agent(n);
    assert!(
        wait_until(Duration::from_secs(15), || !c.leases().iter().any(|(s, _)| *s == short)),
        "lease did not expire"
    );
    assert!(wait_until(Duration::from_secs(5), || c.nodes[0]
        .flannel_routes()
        .iter()
        .all(|r| r["dst"] != short.as_str())));
}

#[test]
fn bad_or_missing_network_config_stops_the_agent_naming_the_field() {
    let mut c = Cluster::new("fb");
    c.add_node();
    c.start_agent(0, &[]);
    assert!(wait_until(Duration::from_secs(10), || !c.nodes[0].agent_running()), "agent kept running without config");
    assert!(c.nodes[0].log().contains("no network config at /coreos.com/network/config"), "{}", c.nodes[0].log());

    for (conf, field) in [
        (r#"{"Network":"10.244.0.0/33"}"#, "Network"),
        (r#"{"Network":"10.244.0.0/16","Backend":{"Type":"udp"}}"#, "Backend.Type"),
        (r#"{"Network":"10.244.0.0/16","SubnetLen":8}"#, "SubnetLen"),
    ] {
        c.put_config(conf);
        c.start_agent(0, &[]);
        assert!(wait_until(Duration::from_secs(10), || !c.nodes[0].agent_running()), "{conf} accepted");
        let log = c.nodes[0].log();
        let last = log.lines().rev().find(|l| l.starts_with("flanneld: error:")).unwrap_or_default().to_string();
        assert!(last.contains(field), "{conf}: {last}");
        std::fs::write(c.nodes[0].log_file(), "").unwrap();
    }
    assert!(c.leases().is_empty(), "a bad config must not claim anything");
}

#[test]
fn flags_come_from_the_environment_too() {
    let bin = e2e::cluster::bin_path("flanneld");
    // Upstream's form: `v0.1.0` on stderr.
    let out = std::process::Command::new(&bin).arg("--version").output().unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stderr), format!("v{}\n", env!("CARGO_PKG_VERSION")));
    let out = std::process::Command::new(&bin).arg("--subnet-lease-renew-margin=1440").output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--subnet-lease-renew-margin"));
    // FLANNELD_<FLAG> is read like the flag: a bad value is refused naming the flag.
    let out = std::process::Command::new(&bin).env("FLANNELD_PUBLIC_IP", "not-an-ip").output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--public-ip"), "{}", String::from_utf8_lossy(&out.stderr));

    // And a good one is used: the agent advertises the public IP from the environment.
    let mut c = Cluster::new("fv");
    c.put_config(VXLAN);
    c.add_node();
    c.nodes[0].ns.ip(&["addr", "add", "192.0.2.101/24", "dev", "eth0"]);
    let node = &c.nodes[0];
    let log = std::fs::File::create(node.log_file()).unwrap();
    let mut child = node
        .ns
        .command(bin.to_str().unwrap())
        .env("FLANNELD_ETCD_ENDPOINTS", e2e::cluster::ETCD_URL)
        .env("FLANNELD_SUBNET_FILE", node.subnet_file())
        .env("FLANNELD_PUBLIC_IP", "192.0.2.101")
        .env("FLANNELD_IP_MASQ", "true")
        .env("FLANNELD_IPTABLES_FORWARD_RULES", "false")
        .stderr(log)
        .spawn()
        .unwrap();
    let jump = "-A POSTROUTING -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG";
    let nat = || e2e::cluster::run_in(&node.ns, "iptables-save", &["-t", "nat"]);
    // subnet.env comes first, the rules right after it.
    let ok = wait_until(Duration::from_secs(20), || {
        c.leases().len() == 1 && node.subnet_env().is_some() && nat().contains(jump)
    });
    let _ = child.kill();
    let _ = child.wait();
    assert!(ok, "{}\n{}", node.log(), nat());
    assert_eq!(c.leases()[0].1["PublicIP"], "192.0.2.101");
    let filter = e2e::cluster::run_in(&node.ns, "iptables-save", &["-t", "filter"]);
    assert!(!filter.contains("FLANNEL-FWD"), "forward rules written although disabled: {filter}");

    // Restarted with masquerading turned off: the old rules go.
    c.start_agent(0, &["--ip-masq=false"]);
    assert!(c.wait_ready(0, READY), "{}", c.nodes[0].log());
    let nat = e2e::cluster::run_in(&c.nodes[0].ns, "iptables-save", &["-t", "nat"]);
    assert!(!nat.contains("FLANNEL-POSTRTG"), "{nat}");
    assert!(c.nodes[0].log().contains("iptables: removed FLANNEL-POSTRTG"));
}

#[test]
fn rules_follow_kube_proxy_into_legacy_iptables() {
    let mut c = Cluster::new("fl");
    c.put_config(HOST_GW);
    c.add_node();
    let ns = &c.nodes[0].ns;
    // kube-proxy runs legacy here: its chains are in the legacy tables.
    run_restore(
        ns,
        "iptables-legacy-restore",
        "*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\nCOMMIT\n",
    );
    c.start_agent(0, &[]);
    assert!(c.wait_ready(0, READY), "{}", c.nodes[0].log());
    let ns = &c.nodes[0].ns;
    let legacy = e2e::cluster::run_in(ns, "iptables-legacy-save", &["-t", "nat"]);
    assert!(legacy.contains("-A FLANNEL-POSTRTG"), "{legacy}");
    let nft = e2e::cluster::run_in(ns, "iptables-nft-save", &["-t", "nat"]);
    assert!(!nft.contains("FLANNEL-POSTRTG"), "rules also went to nft: {nft}");
    assert!(c.nodes[0].log().contains("iptables: writing with iptables-legacy-restore"));
}

fn run_restore(ns: &e2e::Netns, prog: &str, input: &str) {
    use std::io::Write;
    let mut child = ns.command(prog).arg("--noflush").stdin(std::process::Stdio::piped()).spawn().unwrap();
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    assert!(child.wait().unwrap().success());
}

#[test]
fn uplink_by_regex_reach_or_address() {
    let mut c = Cluster::new("fi");
    c.put_config(VXLAN);
    c.add_node();
    let ns = &c.nodes[0].ns;
    ns.ip(&["link", "add", "ext0", "type", "veth", "peer", "name", "ext1"]);
    ns.ip(&["addr", "add", "198.51.100.1/24", "dev", "ext0"]);
    ns.ip(&["link", "set", "ext0", "up"]);
    ns.ip(&["link", "set", "ext1", "up"]);
    ns.ip(&["link", "add", "alt0", "type", "veth", "peer", "name", "alt1"]);
    ns.ip(&["addr", "add", "203.0.113.9/24", "dev", "alt0"]);
    ns.ip(&["link", "set", "alt0", "up"]);
    ns.ip(&["link", "set", "alt1", "up"]);
    // Upstream's order, each falling through when nothing matches: every --iface,
    // then every --iface-regex, then --iface-can-reach; a regex is one value
    // (commas and counted repetitions included); --public-ip alone picks the
    // interface holding it.
    let cases: [(&[&str], &str); 9] = [
        (&["--iface-regex=^ext"], "198.51.100.1"),
        (&["--iface-regex=^ext[0-9]{1,3}$"], "198.51.100.1"),
        (&["--iface-regex=^eth[0-9]{1,3}$"], "192.0.2.1"),
        (&["--iface-regex=^198\\.51\\.100\\.[0-9]{1,3}$"], "198.51.100.1"),
        (&["--iface-can-reach=198.51.100.77"], "198.51.100.1"),
        (&["--iface=192.0.2.1"], "192.0.2.1"),
        (&["--iface=nope0", "--iface=ext0"], "198.51.100.1"),
        (&["--iface=nope0", "--iface-regex=(", "--iface-regex=^alt0$"], "203.0.113.9"),
        (&["--public-ip=198.51.100.1"], "198.51.100.1"),
    ];
    for (flags, want) in cases {
        c.start_agent(0, flags);
        let ns = &c.nodes[0].ns;
        let ok = wait_until(READY, || {
            let Some(link) = ns.try_ip_json(&["-d", "link", "show", "flannel.1"]) else { return false };
            link[0]["linkinfo"]["info_data"]["local"] == want
                && c.leases().iter().any(|(_, v)| v["PublicIP"] == want)
                && c.nodes[0].http_get("/readyz").is_some_and(|r| r.0 == 200)
        });
        assert!(ok, "{flags:?}: {}", c.nodes[0].log());
        c.stop_agent(0);
    }
    c.start_agent(0, &["--iface=nope0", "--iface-regex=^nope"]);
    assert!(wait_until(Duration::from_secs(10), || !c.nodes[0].agent_running()));
    let log = c.nodes[0].log();
    assert!(
        log.contains("no interface matches") && log.contains("--iface nope0") && log.contains("--iface-regex ^nope"),
        "{log}"
    );
}

#[test]
fn direct_routing_and_unreachable_host_gw_peers() {
    // DirectRouting: peers on the same L2 get plain routes via the uplink, no overlay.
    let mut c = cluster(2, r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","DirectRouting":true}}"#);
    let peer = c.nodes[1].subnet().unwrap();
    let n0 = &c.nodes[0];
    let ok = wait_until(Duration::from_secs(10), || {
        n0.flannel_routes()
            .iter()
            .any(|r| r["dst"] == peer.as_str() && r["gateway"] == "192.0.2.2" && r["dev"] == "eth0")
    });
    assert!(ok, "{:?}", n0.flannel_routes());
    c.add_pod(0);
    let b = c.add_pod(1).ip.to_string();
    assert_eq!(c.pods[0].ns.ping(&b), Some(62));
    c.assert_idle();
    drop(c);

    // host-gw: a peer whose public IP is not on our L2 network is reported, not silently dropped.
    let c = cluster(1, HOST_GW);
    c.etcdctl(&[
        "put",
        &format!("{}/subnets/10.244.200.0-24", e2e::cluster::PREFIX),
        r#"{"PublicIP":"203.0.113.9","BackendType":"host-gw","BackendData":null}"#,
    ]);
    let n0 = &c.nodes[0];
    assert!(wait_until(Duration::from_secs(10), || n0.metric("flannel_peers_skipped") == Some(1.0)));
    assert!(
        n0.log().contains("peer 10.244.200.0/24 not programmed: 203.0.113.9 is not on-link via eth0"),
        "{}",
        n0.log()
    );
    assert!(n0.flannel_routes().is_empty());
    c.assert_idle();

    // A dual-stack lease written by upstream flannel: its IPv4 half is programmed here.
    c.etcdctl(&[
        "put",
        &format!("{}/subnets/10.244.201.0-24&fc00:0:0:c9::-64", e2e::cluster::PREFIX),
        r#"{"PublicIP":"192.0.2.77","PublicIPv6":"2001:db8::77","BackendType":"host-gw","BackendData":null,"BackendV6Data":null}"#,
    ]);
    assert!(wait_until(Duration::from_secs(10), || n0
        .flannel_routes()
        .iter()
        .any(|r| r["dst"] == "10.244.201.0/24" && r["gateway"] == "192.0.2.77")));
}

#[test]
fn etcd_over_mutual_tls_and_with_password_auth() {
    let mut c = Cluster::with_tls("ft");
    c.put_config(VXLAN);
    for i in 0..2 {
        c.add_node();
        c.start_agent(i, &[]);
    }
    for i in 0..2 {
        assert!(c.wait_ready(i, READY), "{}", c.nodes[i].log());
    }
    converge(&c, true);
    // A client without a certificate is turned away by this etcd.
    c.add_node();
    c.start_agent(2, &["--etcd-certfile=", "--etcd-keyfile="]);
    std::thread::sleep(Duration::from_secs(3));
    assert!(c.nodes[2].agent_running(), "an unreachable etcd is retried, not fatal");
    assert_ne!(c.nodes[2].http_get("/readyz").map(|r| r.0), Some(200));
    assert!(c.nodes[2].log().contains("retrying"), "{}", c.nodes[2].log());
    assert_eq!(c.leases().len(), 2);
    drop(c);

    // Username/password (etcd auth), plain transport.
    let mut c = Cluster::new("fa");
    c.put_config(HOST_GW);
    c.enable_auth("root", "s3cret");
    c.add_node();
    c.start_agent(0, &[]);
    assert!(c.wait_ready(0, READY), "{}", c.nodes[0].log());
    assert_eq!(c.leases().len(), 1);
    c.add_node();
    // Wrong credentials stop the agent with etcd's reason.
    c.start_agent(1, &["--etcd-password=wrong"]);
    assert!(wait_until(Duration::from_secs(10), || !c.nodes[1].agent_running()));
    assert!(c.nodes[1].log().contains("authentication failed"), "{}", c.nodes[1].log());
    assert_eq!(c.leases().len(), 1);
}

#[test]
fn blackhole_route_for_the_node_subnet() {
    let mut c = cluster(2, VXLAN);
    c.start_agent(0, &["--ip-blackhole-route"]);
    assert!(c.wait_ready(0, READY), "{}", c.nodes[0].log());
    // Ready means the peers already known are programmed, not just that the lease is held.
    let peer = c.nodes[1].subnet().unwrap();
    assert!(c.nodes[0].flannel_routes().iter().any(|r| r["dst"] == peer), "{}", c.nodes[0].log());
    let own = c.nodes[0].subnet().unwrap();
    let has = |c: &Cluster| {
        c.nodes[0]
            .ns
            .ip(&["route", "show", "type", "blackhole"])
            .contains(&format!("blackhole {own} proto 76 metric 4096"))
    };
    assert!(
        wait_until(Duration::from_secs(5), || has(&c)),
        "{}",
        c.nodes[0].ns.ip(&["route", "show", "type", "blackhole"])
    );
    // Pods still win over it (cni0's connected route), and it survives reconcile passes.
    c.add_pod(0);
    let b = c.add_pod(1).ip.to_string();
    let a = c.pods[0].ip.to_string();
    assert_eq!(c.pods[1].ns.ping(&a), Some(62));
    assert_eq!(c.pods[0].ns.ping(&b), Some(62));
    std::thread::sleep(Duration::from_millis(1500));
    assert!(has(&c));
    // With the bridge's route gone (cni0 not set up yet, or torn down), traffic for the
    // node's subnet is dropped here instead of following the default route out.
    let unused = own.replace(".0/24", ".200");
    assert!(c.nodes[0].ns.ip(&["route", "get", &unused]).contains("dev cni0"));
    let gw = own.replace(".0/24", ".1/24");
    c.nodes[0].ns.ip(&["addr", "del", &gw, "dev", "cni0"]);
    // The kernel answers a route lookup that hits a blackhole with EINVAL; without it: "via 192.0.2.254 dev eth0".
    let out = c.nodes[0].ns.run("ip", &["route", "get", &unused]);
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(
        !out.status.success() && stderr.contains("Invalid argument") && !stdout.contains("eth0"),
        "{stdout}{stderr}"
    );
}

/// Where upstream starts, we start: `bridge-nf-call-iptables=0` and IP
/// forwarding that cannot be turned on are warnings naming the sysctl (and a
/// metric), not refusals; readiness does not depend on them. A missing
/// br_netfilter is refused in iptables mode only, as upstream.
#[test]
fn sysctls_off_start_with_a_warning_and_a_metric() {
    let mut c = Cluster::new("fs");
    c.put_config(VXLAN);
    c.add_node();
    e2e::cluster::run_in(&c.nodes[0].ns, "sysctl", &["-qw", "net.bridge.bridge-nf-call-iptables=0"]);
    c.start_agent(0, &[]);
    assert!(c.wait_ready(0, READY), "{}", c.nodes[0].log());
    let log = c.nodes[0].log();
    assert!(log.contains("net.bridge.bridge-nf-call-iptables is 0") && log.contains("sysctl -w"), "{log}");
    let (_, metrics) = c.nodes[0].http_get("/metrics").expect("metrics");
    assert!(
        metrics.contains(r#"flannel_node_prerequisite_unmet{sysctl="net.bridge.bridge-nf-call-iptables"} 1"#),
        "{metrics}"
    );
    // Left as the node has it.
    let v = e2e::cluster::run_in(&c.nodes[0].ns, "sysctl", &["-n", "net.bridge.bridge-nf-call-iptables"]);
    assert_eq!(v.trim(), "0");
    e2e::cluster::run_in(&c.nodes[0].ns, "sysctl", &["-qw", "net.bridge.bridge-nf-call-iptables=1"]);
}

/// Steady state on a real kernel: a peer's lease re-put unchanged (what a
/// renewal or a Node heartbeat looks like to the agent) runs no pass and
/// writes nothing; a real change (a VtepMAC, as after a reinstall) reaches
/// the kernel as that peer's own writes, whose notifications wake no pass,
/// and leaves the kernel as a full pass would have it.
#[test]
fn unchanged_leases_run_no_pass_and_a_change_runs_only_its_writes() {
    let mut c = cluster(3, VXLAN);
    c.assert_idle();
    // The peer whose lease we play with is stopped, so it does not put its own back.
    let peer_subnet = c.nodes[1].subnet().unwrap();
    c.stop_agent(1);
    let runs = || c.nodes[0].metric("flannel_reconcile_runs_total").unwrap();
    let before = runs();
    let mentions = || c.nodes[0].log().matches(&format!("peer lease {peer_subnet}")).count();
    let mentioned = mentions();
    let (_, value) = c.leases().into_iter().find(|(s, _)| *s == peer_subnet).unwrap();
    let key = format!("/coreos.com/network/subnets/{}", peer_subnet.replace('/', "-"));
    for _ in 0..10 {
        c.etcdctl(&["put", "--ignore-lease", &key, &value.to_string()]);
    }
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(runs(), before, "unchanged lease values ran a pass:\n{}", c.nodes[0].log());
    assert_eq!(mentions(), mentioned, "unchanged lease values were logged:\n{}", c.nodes[0].log());

    let mut changed = value.clone();
    changed["BackendData"]["VtepMAC"] = Value::from("0e:11:22:33:44:55");
    c.etcdctl(&["put", "--ignore-lease", &key, &changed.to_string()]);
    let fdb = || {
        let out = c.nodes[0].ns.run("bridge", &["fdb", "show", "dev", "flannel.1"]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let peer_ip = value["PublicIP"].as_str().unwrap().to_string();
    let arrived = wait_until(Duration::from_secs(5), || {
        fdb().lines().any(|l| l.starts_with("0e:11:22:33:44:55") && l.contains(&format!("dst {peer_ip}")))
    });
    assert!(arrived, "{}\n{}", fdb(), c.nodes[0].log());
    assert!(matches_leases(&c, 0, true).is_ok(), "{:?}", matches_leases(&c, 0, true));
    assert!(!fdb().contains(value["BackendData"]["VtepMAC"].as_str().unwrap()), "stale FDB entry left: {}", fdb());
    // Our own writes' notifications must not wake a pass.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(runs(), before, "a one-peer change ran a full pass:\n{}", c.nodes[0].log());
    assert_eq!(mentions(), mentioned + 1, "one line per real change:\n{}", c.nodes[0].log());
    // A foreign change still wakes one: the echo bookkeeping hides only our own writes.
    c.nodes[0].ns.ip(&["neigh", "del", &peer_subnet.replace("/24", ""), "dev", "flannel.1"]);
    assert!(wait_until(Duration::from_secs(5), || runs() > before), "a foreign ARP delete woke no pass");
    assert!(wait_until(Duration::from_secs(5), || matches_leases(&c, 0, true).is_ok()));
}
