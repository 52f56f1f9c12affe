//! Masquerade and forward rules, upstream flannel's exact ones so existing
//! dashboards and runbooks still apply. Written with `iptables-restore
//! --noflush` (our chains are replaced whole, nothing else is touched) and
//! verified against `iptables-save`, so a resync is one read when all is well.

use std::io::Write;
use std::process::{Command, Stdio};

use flannel_shared::IpNet;

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

#[derive(Debug, thiserror::Error)]
pub enum IptablesError {
    #[error("{cmd}: {msg}")]
    Command { cmd: String, msg: String },
}

fn run(cmd: &str, args: &[&str], stdin: Option<&str>) -> Result<String, IptablesError> {
    let fail = |msg: String| IptablesError::Command { cmd: format!("{cmd} {}", args.join(" ")), msg };
    let mut child = Command::new(cmd)
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
pub fn ensure(t: &TableRules) -> Result<bool, IptablesError> {
    ensure_with(&Flavour::default(), t)
}

/// Makes sure the rules are in place; returns true when it had to write them.
/// Stale content of our chain (an old Network or subnet) is replaced whole.
pub fn ensure_with(f: &Flavour, t: &TableRules) -> Result<bool, IptablesError> {
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
pub fn remove_with(f: &Flavour, t: &TableRules) -> Result<bool, IptablesError> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
