//! The iptables driver. The agent's masquerade and forward rules are upstream
//! flannel's exact ones so existing dashboards and runbooks still apply:
//! written with `iptables-restore --noflush` (our chains are replaced whole,
//! nothing else is touched) and verified against `iptables-save`, so a resync
//! is one read when all is well. A pod's `ipMasq` chain is the bridge
//! plugin's, so a node can move between upstream and us without orphans.

use std::io::Write;
use std::net::IpAddr;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use sha2::{Digest, Sha512};

use super::{Firewall, FirewallError, Mode, PodMasq, RuleSet};
use crate::IpNet;

pub const MASQ_CHAIN: &str = "FLANNEL-POSTRTG";
pub const FWD_CHAIN: &str = "FLANNEL-FWD";
const MASQ_COMMENT: &str = "\"flanneld masq\"";
const FWD_COMMENT: &str = "\"flanneld forward\"";

/// One table's worth of rules, in `iptables-save` form.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableRules {
    pub table: &'static str,
    pub chain: &'static str,
    /// The jump from the built-in chain, e.g. `-A POSTROUTING -m comment ... -j FLANNEL-POSTRTG`.
    pub jump: String,
    pub rules: Vec<String>,
}

/// The nat rules for `network` (cluster) and `subnet` (this node's lease).
pub fn masq_rules(network: &IpNet, subnet: &IpNet, random_fully: bool) -> TableRules {
    let (n, s) = (network.network(), subnet.network());
    let rf = if random_fully { " --random-fully" } else { "" };
    let multicast = if network.is_ipv4() { "224.0.0.0/4" } else { "ff00::/8" };
    let c = MASQ_COMMENT;
    TableRules {
        table: "nat",
        chain: MASQ_CHAIN,
        jump: format!("-A POSTROUTING -m comment --comment {c} -j {MASQ_CHAIN}"),
        rules: vec![
            // kube-proxy marks what it masquerades itself; without this, Service calls stall.
            format!("-A {MASQ_CHAIN} -m mark --mark 0x4000/0x4000 -m comment --comment {c} -j RETURN"),
            format!("-A {MASQ_CHAIN} -s {s} -d {n} -m comment --comment {c} -j RETURN"),
            format!("-A {MASQ_CHAIN} -s {n} -d {s} -m comment --comment {c} -j RETURN"),
            format!("-A {MASQ_CHAIN} ! -s {n} -d {s} -m comment --comment {c} -j RETURN"),
            format!("-A {MASQ_CHAIN} -s {n} ! -d {multicast} -m comment --comment {c} -j MASQUERADE{rf}"),
            format!("-A {MASQ_CHAIN} ! -s {n} -d {n} -m comment --comment {c} -j MASQUERADE{rf}"),
        ],
    }
}

/// The filter rules that let pod traffic through a FORWARD policy of DROP.
pub fn forward_rules(network: &IpNet) -> TableRules {
    let n = network.network();
    let c = FWD_COMMENT;
    TableRules {
        table: "filter",
        chain: FWD_CHAIN,
        jump: format!("-A FORWARD -m comment --comment {c} -j {FWD_CHAIN}"),
        rules: vec![
            format!("-A {FWD_CHAIN} -s {n} -m comment --comment {c} -j ACCEPT"),
            format!("-A {FWD_CHAIN} -d {n} -m comment --comment {c} -j ACCEPT"),
        ],
    }
}

fn run(cmd: &str, args: &[&str], stdin: Option<&str>) -> Result<String, FirewallError> {
    let fail = |msg: String| FirewallError::Command { cmd: format!("{cmd} {}", args.join(" ")), msg };
    let mut command = Command::new(cmd);
    // The tool dies with us: a plugin SIGKILLed by its runtime mid-ADD must not
    // leave an iptables child that writes a pod's chain after the runtime's DEL
    // has cleaned up (found by cni-plugin/tests/crash.rs). The spawning thread is
    // the caller's, which waits for the child, so its exit is ours.
    // SAFETY: prctl is async-signal-safe and touches nothing of the parent.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fail(e.to_string()))?;
    if let Some(input) = stdin {
        child.stdin.take().expect("piped").write_all(input.as_bytes()).map_err(|e| fail(e.to_string()))?;
    }
    let out = child.wait_with_output().map_err(|e| fail(e.to_string()))?;
    if !out.status.success() {
        return Err(fail(String::from_utf8_lossy(&out.stderr).trim().to_string()));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether the table already holds exactly our chain, in order, and the jump.
fn in_place(saved: &str, t: &TableRules) -> bool {
    let ours: Vec<&str> = saved.lines().filter(|l| l.starts_with(&format!("-A {} ", t.chain))).collect();
    ours == t.rules.iter().map(String::as_str).collect::<Vec<_>>() && saved.lines().any(|l| l == t.jump)
}

/// Which iptables flavour to write: the rules must land where kube-proxy's
/// are, or Service traffic and our masquerade live in different worlds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Flavour {
    /// `iptables-save`, `iptables-nft-save` or `iptables-legacy-save`.
    pub save: String,
    pub restore: String,
}

impl Default for Flavour {
    /// Whatever `iptables` points to on this host.
    fn default() -> Flavour {
        Flavour { save: "iptables-save".into(), restore: "iptables-restore".into() }
    }
}

impl Flavour {
    /// The same flavour for IPv6 (`ip6tables-save`, `ip6tables-legacy-restore`, ...).
    pub fn v6(&self) -> Flavour {
        Flavour {
            save: self.save.replacen("iptables", "ip6tables", 1),
            restore: self.restore.replacen("iptables", "ip6tables", 1),
        }
    }

    /// iptables-legacy, whatever the host default is.
    pub fn legacy() -> Flavour {
        Flavour::named("legacy")
    }

    fn named(mode: &str) -> Flavour {
        Flavour { save: format!("iptables-{mode}-save"), restore: format!("iptables-{mode}-restore") }
    }

    /// Picks nft or legacy the way Kubernetes' iptables-wrapper does: the
    /// flavour that already holds kube-proxy's (or our) rules wins; with
    /// neither, or only one flavour installed, the host default.
    pub fn detect() -> (Flavour, String) {
        let count = |f: &Flavour| {
            run(&f.save, &[], None)
                .ok()
                .map(|out| out.lines().filter(|l| l.contains("KUBE-") || l.contains("FLANNEL-")).count())
        };
        let (nft, legacy) = (Flavour::named("nft"), Flavour::named("legacy"));
        match (count(&nft), count(&legacy)) {
            (Some(n), Some(l)) if l > n => (legacy, format!("legacy ({l} kube/flannel rules there, {n} in nft)")),
            (Some(n), Some(l)) if n > l => (nft, format!("nft ({n} kube/flannel rules there, {l} in legacy)")),
            _ => (Flavour::default(), "the host default (no kube/flannel rules to follow yet)".into()),
        }
    }
}

/// Makes sure the rules are in place with the host's default iptables.
pub fn ensure(t: &TableRules) -> Result<bool, FirewallError> {
    ensure_with(&Flavour::default(), t)
}

/// Makes sure the rules are in place; returns true when it had to write them.
/// Stale content of our chain (an old Network or subnet) is replaced whole.
pub fn ensure_with(f: &Flavour, t: &TableRules) -> Result<bool, FirewallError> {
    let saved = run(&f.save, &["-t", t.table], None)?;
    if in_place(&saved, t) {
        return Ok(false);
    }
    let mut payload = format!("*{}\n:{} - [0:0]\n", t.table, t.chain);
    for r in &t.rules {
        payload.push_str(r);
        payload.push('\n');
    }
    if !saved.lines().any(|l| l == t.jump) {
        // Insert the jump at the top of the built-in chain, as upstream does.
        payload.push_str(&t.jump.replacen("-A ", "-I ", 1));
        payload.push('\n');
    }
    payload.push_str("COMMIT\n");
    run(&f.restore, &["--noflush", "-w", "5"], Some(&payload))?;
    Ok(true)
}

/// Removes our chain and its jump (a rule set that was turned off, e.g. a
/// restart without `--ip-masq`); returns true when there was something to remove.
pub fn remove_with(f: &Flavour, t: &TableRules) -> Result<bool, FirewallError> {
    let saved = run(&f.save, &["-t", t.table], None)?;
    let declared = format!(":{} ", t.chain);
    if !saved.lines().any(|l| l.starts_with(&declared)) {
        return Ok(false);
    }
    let mut payload = format!("*{}\n", t.table);
    // Every jump into the chain, whatever its comment.
    let target = format!(" -j {}", t.chain);
    for l in saved
        .lines()
        .filter(|l| l.starts_with("-A ") && l.ends_with(&target) && !l.starts_with(&format!("-A {} ", t.chain)))
    {
        payload.push_str(&l.replacen("-A ", "-D ", 1));
        payload.push('\n');
    }
    payload.push_str(&format!("-F {0}\n-X {0}\nCOMMIT\n", t.chain));
    run(&f.restore, &["--noflush", "-w", "5"], Some(&payload))?;
    Ok(true)
}

/// `set` as iptables rules.
pub fn render(set: &RuleSet) -> TableRules {
    match set {
        RuleSet::Masq { network, subnet, random_fully } => masq_rules(network, subnet, *random_fully),
        RuleSet::Forward { network } => forward_rules(network),
    }
}

/// The agent's driver: iptables-restore/-save in the flavour kube-proxy uses.
pub struct Iptables {
    flavour: Flavour,
}

impl Iptables {
    pub fn new(flavour: Flavour) -> Iptables {
        Iptables { flavour }
    }

    /// Picks nft or legacy as kube-proxy's rules do; returns the reason too.
    pub fn detect() -> (Iptables, String) {
        let (flavour, why) = Flavour::detect();
        (Iptables { flavour }, why)
    }

    /// The restore command rules are written with.
    pub fn restore_command(&self) -> &str {
        &self.flavour.restore
    }

    fn flavour(&self, v6: bool) -> Flavour {
        if v6 { self.flavour.v6() } else { self.flavour.clone() }
    }
}

/// Our two chains by kind, for removal (their rules do not matter then).
fn chains() -> [(&'static str, &'static str); 2] {
    [("nat", MASQ_CHAIN), ("filter", FWD_CHAIN)]
}

impl Firewall for Iptables {
    fn mode(&self) -> Mode {
        Mode::Iptables
    }

    fn sync(&mut self, v6: bool, sets: &[RuleSet]) -> Result<Vec<String>, FirewallError> {
        let f = self.flavour(v6);
        let mut changes = Vec::new();
        let wanted: Vec<TableRules> = sets.iter().map(render).collect();
        for (table, chain) in chains() {
            match wanted.iter().find(|t| t.chain == chain) {
                Some(t) => {
                    if ensure_with(&f, t)? {
                        changes.push(format!("wrote {chain} in table {table}"));
                    }
                }
                None => {
                    let t = TableRules { table, chain, jump: String::new(), rules: Vec::new() };
                    if remove_with(&f, &t)? {
                        changes.push(format!("removed {chain} from table {table}"));
                    }
                }
            }
        }
        Ok(changes)
    }
}

/// A pod's chain: `CNI-` + the first 24 hex digits of sha512(name + containerID).
pub fn pod_chain(network: &str, container_id: &str) -> String {
    let d = Sha512::digest(format!("{network}{container_id}").as_bytes());
    let hex: String = d.iter().map(|b| format!("{b:02x}")).collect();
    format!("CNI-{}", &hex[..24])
}

pub fn pod_comment(network: &str, container_id: &str) -> String {
    format!("name: {network:?} id: {container_id:?}")
}

fn nat(v4: bool, args: &[&str]) -> Result<(), FirewallError> {
    let bin = if v4 { "iptables" } else { "ip6tables" };
    run(bin, &[&["-w", "5", "-t", "nat"][..], args].concat(), None).map(|_| ())
}

/// The pieces of one pod address's rules.
struct PodParts {
    v4: bool,
    chain: String,
    comment: String,
    subnet: String,
    host: String,
    mcast: &'static str,
}

impl PodParts {
    fn new(p: &PodMasq<'_>, addr: &IpNet) -> PodParts {
        let v4 = addr.is_ipv4();
        PodParts {
            v4,
            chain: pod_chain(p.network, p.container_id),
            comment: pod_comment(p.network, p.container_id),
            subnet: addr.network().to_string(),
            host: host_net(addr.addr()),
            mcast: if v4 { "224.0.0.0/4" } else { "ff00::/8" },
        }
    }
}

fn host_net(ip: IpAddr) -> String {
    format!("{ip}/{}", if ip.is_ipv4() { 32 } else { 128 })
}

/// Installs the bridge plugin's masquerade chain for one pod address:
/// nat `POSTROUTING -s <pod ip> -j CNI-<hash>`, and in `CNI-<hash>`: ACCEPT to
/// the pod subnet, MASQUERADE everything else except multicast.
pub fn pod_setup(p: &PodMasq<'_>, addr: &IpNet) -> Result<(), FirewallError> {
    let PodParts { v4, chain, comment: c, subnet, host, mcast } = PodParts::new(p, addr);
    // A chain left by an interrupted ADD is reused after a flush.
    if nat(v4, &["-N", &chain]).is_err() {
        nat(v4, &["-F", &chain])?;
    }
    nat(v4, &["-A", &chain, "-d", &subnet, "-j", "ACCEPT", "-m", "comment", "--comment", &c])?;
    nat(v4, &["-A", &chain, "!", "-d", mcast, "-j", "MASQUERADE", "-m", "comment", "--comment", &c])?;
    let jump = ["POSTROUTING", "-s", &host, "-j", &chain, "-m", "comment", "--comment", &c];
    if nat(v4, &[&["-C"][..], &jump[..]].concat()).is_err() {
        nat(v4, &[&["-A"][..], &jump[..]].concat())?;
    }
    Ok(())
}

/// What of [`pod_setup`]'s rules is missing (empty when all are in place).
pub fn pod_missing(p: &PodMasq<'_>, addr: &IpNet) -> Vec<String> {
    let PodParts { v4, chain, comment: c, subnet, host, mcast } = PodParts::new(p, addr);
    let rules: [(&str, Vec<&str>); 3] = [
        ("jump", vec!["POSTROUTING", "-s", &host, "-j", &chain, "-m", "comment", "--comment", &c]),
        ("ACCEPT to the pod subnet", vec![&chain, "-d", &subnet, "-j", "ACCEPT", "-m", "comment", "--comment", &c]),
        ("MASQUERADE", vec![&chain, "!", "-d", mcast, "-j", "MASQUERADE", "-m", "comment", "--comment", &c]),
    ];
    rules
        .iter()
        .filter(|(_, r)| nat(v4, &[&["-C"][..], &r[..]].concat()).is_err())
        .map(|(what, _)| format!("ipMasq rule missing for {}: {what} ({chain})", addr.addr()))
        .collect()
}

/// Removes what [`pod_setup`] installed for `ip`; missing pieces are fine (DEL is idempotent).
pub fn pod_teardown(network: &str, container_id: &str, ip: IpAddr) -> Result<(), FirewallError> {
    let v4 = ip.is_ipv4();
    let chain = pod_chain(network, container_id);
    let c = pod_comment(network, container_id);
    let host = host_net(ip);
    while nat(v4, &["-D", "POSTROUTING", "-s", &host, "-j", &chain, "-m", "comment", "--comment", &c]).is_ok() {}
    if nat(v4, &["-F", &chain]).is_ok() {
        nat(v4, &["-X", &chain])?;
    }
    Ok(())
}

/// Removes an attachment's masquerade in one family whatever addresses it
/// had: every `POSTROUTING` rule jumping to its chain (found in `-S`, deleted
/// by its exact spec, so a rule someone inserts meanwhile is never hit), then
/// the chain. What a DEL uses when an ADD was killed before it saved its
/// addresses, or a DEL after freeing them. Nothing to do when the tool is absent.
pub fn pod_teardown_chain(network: &str, container_id: &str, v4: bool) -> Result<(), FirewallError> {
    let chain = pod_chain(network, container_id);
    let bin = if v4 { "iptables" } else { "ip6tables" };
    let Ok(listing) = run(bin, &["-w", "5", "-t", "nat", "-S", "POSTROUTING"], None) else { return Ok(()) };
    for line in listing.lines() {
        let Some(spec) = line.strip_prefix("-A POSTROUTING ") else { continue };
        let words = split_rule(spec);
        if !words.windows(2).any(|w| w[0] == "-j" && w[1] == chain) {
            continue;
        }
        let mut args = vec!["-D", "POSTROUTING"];
        args.extend(words.iter().map(String::as_str));
        // Already gone (a concurrent DEL) is fine; one still there makes -X below fail, loudly.
        let _ = nat(v4, &args);
    }
    if nat(v4, &["-F", &chain]).is_ok() {
        nat(v4, &["-X", &chain])?;
    }
    Ok(())
}

/// Whether the attachment's chain exists in one family (ip6tables may be absent: no).
pub fn pod_chain_exists(network: &str, container_id: &str, v4: bool) -> bool {
    nat(v4, &["-S", &pod_chain(network, container_id)]).is_ok()
}

/// Splits a rule as `iptables -S` prints it: words, double-quoted ones (comments) whole.
fn split_rule(spec: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let (mut quoted, mut escaped, mut any) = (false, false, false);
    for c in spec.chars() {
        match c {
            _ if escaped => {
                cur.push(c);
                escaped = false;
            }
            '\\' if quoted => escaped = true,
            '"' => {
                quoted = !quoted;
                any = true;
            }
            ' ' if !quoted => {
                if any || !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
                any = false;
            }
            _ => cur.push(c),
        }
    }
    if any || !cur.is_empty() {
        out.push(cur);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_split_as_iptables_prints_them() {
        let w = split_rule(r#"-s 10.244.1.5/32 -m comment --comment "name: \"cbr0\" id: \"abc\"" -j CNI-0123"#);
        assert_eq!(
            w,
            ["-s", "10.244.1.5/32", "-m", "comment", "--comment", r#"name: "cbr0" id: "abc""#, "-j", "CNI-0123"]
        );
    }

    #[test]
    fn rules_are_upstreams() {
        let t = masq_rules(&"10.244.0.0/16".parse().unwrap(), &"10.244.1.0/24".parse().unwrap(), true);
        assert_eq!(
            t.rules[1],
            "-A FLANNEL-POSTRTG -s 10.244.1.0/24 -d 10.244.0.0/16 -m comment --comment \"flanneld masq\" -j RETURN"
        );
        assert!(t.rules[4].ends_with("-j MASQUERADE --random-fully"));
        let f = forward_rules(&"10.244.0.0/16".parse().unwrap());
        assert_eq!(f.rules[0], "-A FLANNEL-FWD -s 10.244.0.0/16 -m comment --comment \"flanneld forward\" -j ACCEPT");
    }

    #[test]
    fn both_families_render_from_the_same_sets() {
        let v6 = render(&RuleSet::Masq {
            network: "fd00:10::/56".parse().unwrap(),
            subnet: "fd00:10:0:1::/64".parse().unwrap(),
            random_fully: false,
        });
        assert_eq!((v6.table, v6.chain), ("nat", MASQ_CHAIN));
        assert_eq!(
            v6.rules[4],
            "-A FLANNEL-POSTRTG -s fd00:10::/56 ! -d ff00::/8 -m comment --comment \"flanneld masq\" -j MASQUERADE"
        );
        assert_eq!(
            v6.rules[0],
            "-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment \"flanneld masq\" -j RETURN"
        );
        let fwd = render(&RuleSet::Forward { network: "fd00:10::/56".parse().unwrap() });
        assert_eq!(fwd.jump, "-A FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD");
        assert_eq!(fwd.rules[1], "-A FLANNEL-FWD -d fd00:10::/56 -m comment --comment \"flanneld forward\" -j ACCEPT");
    }

    #[test]
    fn pod_chain_names_match_the_bridge_plugin() {
        let c = pod_chain("cbr0", "abc");
        assert_eq!(c.len(), 28);
        assert!(c.starts_with("CNI-"));
        assert_eq!(pod_comment("cbr0", "abc"), r#"name: "cbr0" id: "abc""#);
    }
}
