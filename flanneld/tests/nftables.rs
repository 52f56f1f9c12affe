//! The nftables driver against real `nft`, inside a private network namespace
//! (root). The test re-runs itself under `ip netns exec` so nft sees only
//! that namespace's ruleset.

use std::process::Command;

use e2e::Netns;
use flannel_shared::IpNet;
use flannel_shared::firewall::nftables::{self, Nftables};
use flannel_shared::firewall::{Firewall, Mode, PodMasq, RuleSet, iptables};

const CHILD: &str = "FLANNELD_NFTABLES_TEST_CHILD";

fn in_namespace(test: &str) {
    Netns::new("nft").rerun_test_inside(test, CHILD);
}

fn nft(args: &[&str]) -> String {
    let out = Command::new("nft").args(args).output().unwrap();
    assert!(out.status.success(), "nft {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn sets_v4() -> Vec<RuleSet> {
    vec![
        RuleSet::Masq { network: net("10.244.0.0/16"), subnet: net("10.244.1.0/24"), random_fully: true },
        RuleSet::Forward { network: net("10.244.0.0/16") },
    ]
}

#[test]
fn tables_are_written_whole_kept_and_removed() {
    if std::env::var_os(CHILD).is_none() {
        return in_namespace("tables_are_written_whole_kept_and_removed");
    }
    let mut fw = Nftables::new();
    let v6 = vec![RuleSet::Masq { network: net("fd00:10::/56"), subnet: net("fd00:10:0:1::/64"), random_fully: false }];
    assert_eq!(fw.sync(false, &sets_v4()).unwrap(), ["wrote table ip flannel-ipv4 (chains postrtg, forward)"]);
    assert_eq!(fw.sync(true, &v6).unwrap().len(), 1);
    let t = nft(&["list", "table", "ip", "flannel-ipv4"]);
    for want in [
        "chain postrtg {",
        "type nat hook postrouting priority srcnat; policy accept;",
        "meta mark & 0x00004000 == 0x00004000 return",
        "ip saddr 10.244.1.0/24 ip daddr 10.244.0.0/16 return",
        "ip saddr 10.244.0.0/16 ip daddr 10.244.1.0/24 return",
        "ip saddr != 10.244.0.0/16 ip daddr 10.244.1.0/24 return",
        "ip saddr 10.244.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random",
        "ip saddr != 10.244.0.0/16 ip daddr 10.244.0.0/16 masquerade fully-random",
        "chain forward {",
        "type filter hook forward priority filter; policy accept;",
        "ip saddr 10.244.0.0/16 accept",
        "ip daddr 10.244.0.0/16 accept",
    ] {
        assert!(t.contains(want), "missing {want:?} in:\n{t}");
    }
    let t6 = nft(&["list", "table", "ip6", "flannel-ipv6"]);
    assert!(t6.contains("ip6 saddr fd00:10::/56 ip6 daddr != ff00::/8 masquerade\n"), "{t6}");

    // In place: a resync only reads.
    assert!(fw.sync(false, &sets_v4()).unwrap().is_empty());
    assert!(fw.sync(true, &v6).unwrap().is_empty());

    // A rule deleted by hand, one added by hand, the whole table deleted: rewritten.
    let handles = nft(&["-a", "list", "chain", "ip", "flannel-ipv4", "postrtg"]);
    let h = handles.lines().find(|l| l.contains("masquerade")).and_then(|l| l.rsplit("handle ").next()).unwrap();
    nft(&["delete", "rule", "ip", "flannel-ipv4", "postrtg", "handle", h.trim()]);
    assert_eq!(fw.sync(false, &sets_v4()).unwrap().len(), 1);
    nft(&["add", "rule", "ip", "flannel-ipv4", "forward", "ip", "saddr", "192.0.2.0/24", "drop"]);
    assert_eq!(fw.sync(false, &sets_v4()).unwrap().len(), 1);
    assert!(!nft(&["list", "table", "ip", "flannel-ipv4"]).contains("192.0.2.0"));
    nft(&["delete", "table", "ip", "flannel-ipv4"]);
    assert_eq!(fw.sync(false, &sets_v4()).unwrap().len(), 1);
    assert!(fw.sync(false, &sets_v4()).unwrap().is_empty());

    // A new lease: the table is replaced, nothing of the old subnet stays.
    let moved = vec![RuleSet::Masq { network: net("10.244.0.0/16"), subnet: net("10.244.7.0/24"), random_fully: true }];
    assert_eq!(fw.sync(false, &moved).unwrap().len(), 1);
    let t = nft(&["list", "table", "ip", "flannel-ipv4"]);
    assert!(!t.contains("10.244.1.0/24") && !t.contains("chain forward"), "{t}");

    // Nothing wanted: no table at all. Only flannel's tables were ever there.
    assert_eq!(fw.sync(true, &[]).unwrap(), ["removed table ip6 flannel-ipv6"]);
    assert!(fw.sync(true, &[]).unwrap().is_empty());
    assert_eq!(nft(&["list", "tables"]).trim(), "table ip flannel-ipv4");
    assert_eq!(nftables::purge_tables().unwrap(), ["removed table ip flannel-ipv4"]);
    assert_eq!(nft(&["list", "ruleset"]).trim(), "");
}

#[test]
fn iptables_nft_chains_are_purged_with_nft_alone_and_drop_policies_seen() {
    if std::env::var_os(CHILD).is_none() {
        return in_namespace("iptables_nft_chains_are_purged_with_nft_alone_and_drop_policies_seen");
    }
    // What the iptables driver leaves with iptables-nft, plus a rule of someone else's.
    let mut ipt = iptables::Iptables::new(iptables::Flavour {
        save: "iptables-nft-save".into(),
        restore: "iptables-nft-restore".into(),
    });
    assert_eq!(ipt.sync(false, &sets_v4()).unwrap().len(), 2);
    let other = Command::new("iptables-nft")
        .args(["-t", "nat", "-A", "POSTROUTING", "-s", "192.0.2.0/24", "-j", "ACCEPT"])
        .status()
        .unwrap();
    assert!(other.success());
    assert!(Command::new("iptables-nft").args(["-P", "FORWARD", "DROP"]).status().unwrap().success());

    assert_eq!(nftables::forward_drop_chains().unwrap(), ["ip filter/FORWARD"]);
    let mut removed = nftables::purge_iptables_nft(&[iptables::MASQ_CHAIN, iptables::FWD_CHAIN]).unwrap();
    removed.sort();
    assert_eq!(
        removed,
        ["removed iptables chain FLANNEL-FWD from ip filter", "removed iptables chain FLANNEL-POSTRTG from ip nat"]
    );
    let after = nft(&["list", "ruleset"]);
    assert!(!after.contains("FLANNEL"), "{after}");
    assert!(after.contains("ip saddr 192.0.2.0/24"), "someone else's rule stays:\n{after}");
    assert!(nftables::purge_iptables_nft(&[iptables::MASQ_CHAIN, iptables::FWD_CHAIN]).unwrap().is_empty());
}

#[test]
fn pod_masquerade_follows_the_bridge_plugins_layout() {
    if std::env::var_os(CHILD).is_none() {
        return in_namespace("pod_masquerade_follows_the_bridge_plugins_layout");
    }
    let a = PodMasq { network: "cbr0", container_id: "pod-a", ifname: "eth0" };
    let b = PodMasq { network: "cbr0", container_id: "pod-b", ifname: "eth0" };
    let a_addrs = [net("10.244.1.2/24"), net("fd00:10:0:1::2/64")];
    assert_eq!(a.missing(Mode::Nftables, &a_addrs).len(), 1);
    a.setup(Mode::Nftables, &a_addrs).unwrap();
    // A repeated ADD replaces, it does not add a second copy.
    a.setup(Mode::Nftables, &a_addrs).unwrap();
    b.setup(Mode::Nftables, &[net("10.244.1.3/24")]).unwrap();
    assert!(a.missing(Mode::Nftables, &a_addrs).is_empty());
    let t = nft(&["list", "table", "inet", "cni_plugins_masquerade"]);
    assert_eq!(t.matches("ip saddr 10.244.1.2 ip daddr != 10.244.1.0/24 masquerade").count(), 1, "{t}");
    assert!(t.contains("ip6 saddr fd00:10:0:1::2 ip6 daddr != fd00:10:0:1::/64 masquerade"), "{t}");
    assert!(t.contains("type nat hook postrouting priority srcnat; policy accept;"), "{t}");
    assert!(t.contains("ip daddr 224.0.0.0/4 return") && t.contains("goto masq_checks"), "{t}");

    a.teardown(Mode::Nftables, &[]).unwrap();
    a.teardown(Mode::Nftables, &[]).unwrap();
    let t = nft(&["list", "table", "inet", "cni_plugins_masquerade"]);
    assert!(!t.contains("10.244.1.2") && t.contains("ip saddr 10.244.1.3"), "{t}");
    assert_eq!(a.missing(Mode::Nftables, &a_addrs).len(), 1);
}
