//! The rules against real iptables, inside a private network namespace (root).
//! The test re-runs itself under `ip netns exec` so iptables sees only that namespace.

use std::process::Command;

use e2e::Netns;

const CHILD: &str = "FLANNELD_IPTABLES_TEST_CHILD";

fn save(ns: &Netns, table: &str) -> String {
    String::from_utf8_lossy(&ns.run("iptables-save", &["-t", table]).stdout).into_owned()
}

#[test]
fn masq_and_forward_rules_are_installed_verified_and_repaired() {
    if std::env::var_os(CHILD).is_some() {
        return child();
    }
    let ns = Netns::new("ipt");
    ns.rerun_test_inside("masq_and_forward_rules_are_installed_verified_and_repaired", CHILD);
    // Seen from outside: the rules live in the namespace (the masquerade set was removed at the end).
    let filter = save(&ns, "filter");
    assert!(filter.contains("-A FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD"), "{filter}");
    assert!(!save(&ns, "nat").contains("FLANNEL-POSTRTG"));
}

fn child() {
    use flannel_shared::firewall::iptables::{Flavour, ensure, forward_rules, masq_rules, remove_with};
    let net = "10.244.0.0/16".parse().unwrap();
    let old = masq_rules(&"10.245.0.0/16".parse().unwrap(), &"10.245.7.0/24".parse().unwrap(), true);
    let masq = masq_rules(&net, &"10.244.1.0/24".parse().unwrap(), true);
    let fwd = forward_rules(&net);

    // Stale rules of an old network are replaced, not kept beside the new ones.
    assert!(ensure(&old).unwrap());
    assert!(ensure(&masq).unwrap());
    assert!(ensure(&fwd).unwrap());
    let nat = String::from_utf8_lossy(&Command::new("iptables-save").args(["-t", "nat"]).output().unwrap().stdout)
        .into_owned();
    assert!(!nat.contains("10.245."), "stale rules left: {nat}");
    for r in &masq.rules {
        assert!(nat.lines().any(|l| l == r), "missing {r:?} in:\n{nat}");
    }
    assert_eq!(nat.lines().filter(|l| l.contains("-j FLANNEL-POSTRTG")).count(), 1, "{nat}");

    // In place: a resync only reads.
    assert!(!ensure(&masq).unwrap());
    assert!(!ensure(&fwd).unwrap());

    // A rule deleted by hand is restored on the next resync.
    let del = Command::new("iptables").args(["-t", "nat", "-D", "FLANNEL-POSTRTG", "1"]).status().unwrap();
    assert!(del.success());
    assert!(ensure(&masq).unwrap());
    assert!(!ensure(&masq).unwrap());
    let fwd_jump = Command::new("iptables")
        .args(["-D", "FORWARD", "-m", "comment", "--comment", "flanneld forward", "-j", "FLANNEL-FWD"])
        .status()
        .unwrap();
    assert!(fwd_jump.success());
    assert!(ensure(&fwd).unwrap());
    let filter =
        String::from_utf8_lossy(&Command::new("iptables-save").args(["-t", "filter"]).output().unwrap().stdout)
            .into_owned();
    assert!(filter.lines().any(|l| l == fwd.jump), "{filter}");

    // Turned off: chain and jump go, the rest of the table stays.
    let keep = Command::new("iptables")
        .args(["-t", "nat", "-A", "POSTROUTING", "-s", "192.0.2.0/24", "-j", "RETURN"])
        .status();
    assert!(keep.unwrap().success());
    assert!(remove_with(&Flavour::default(), &masq).unwrap());
    assert!(!remove_with(&Flavour::default(), &masq).unwrap());
    let nat = String::from_utf8_lossy(&Command::new("iptables-save").args(["-t", "nat"]).output().unwrap().stdout)
        .into_owned();
    assert!(!nat.contains("FLANNEL-POSTRTG"), "{nat}");
    assert!(nat.contains("-A POSTROUTING -s 192.0.2.0/24 -j RETURN"), "{nat}");
}
