//! Per-pod masquerading (`ipMasq`), with the bridge plugin's exact chains so a
//! node can move between upstream and this plugin without orphaned rules:
//! nat `POSTROUTING -s <pod ip> -j CNI-<hash>`, and in `CNI-<hash>`: ACCEPT to the
//! pod subnet, MASQUERADE everything else except multicast.
//!
//! Upstream flannel turns this on when flanneld runs without `--ip-masq`.

use std::net::IpAddr;
use std::process::Command;

use flannel_shared::IpNet;
use sha2::{Digest, Sha512};

use crate::error::{CniError, Result, code};

/// `CNI-` + the first 24 hex digits of sha512(name + containerID).
pub fn chain_name(network: &str, container_id: &str) -> String {
    let d = Sha512::digest(format!("{network}{container_id}").as_bytes());
    let hex: String = d.iter().map(|b| format!("{b:02x}")).collect();
    format!("CNI-{}", &hex[..24])
}

pub fn comment(network: &str, container_id: &str) -> String {
    format!("name: {network:?} id: {container_id:?}")
}

fn iptables(v4: bool, args: &[&str]) -> std::result::Result<(), String> {
    let bin = if v4 { "iptables" } else { "ip6tables" };
    let out =
        Command::new(bin).args(["-w", "5", "-t", "nat"]).args(args).output().map_err(|e| format!("{bin}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{bin} -t nat {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// The pieces of one pod address's rules.
struct Parts {
    v4: bool,
    chain: String,
    comment: String,
    subnet: String,
    host: String,
    mcast: &'static str,
}

impl Parts {
    fn new(network: &str, container_id: &str, addr: &IpNet) -> Parts {
        let v4 = addr.is_ipv4();
        Parts {
            v4,
            chain: chain_name(network, container_id),
            comment: comment(network, container_id),
            subnet: addr.network().to_string(),
            host: format!("{}/{}", addr.addr(), if v4 { 32 } else { 128 }),
            mcast: if v4 { "224.0.0.0/4" } else { "ff00::/8" },
        }
    }
}

/// Installs the masquerade chain for one pod address (`addr` carries the subnet's prefix).
pub fn setup(network: &str, container_id: &str, addr: &IpNet) -> Result<()> {
    let Parts { v4, chain, comment: c, subnet, host, mcast } = Parts::new(network, container_id, addr);
    let fail = |e: String| CniError::new(code::IPTABLES_FAILURE, "failed to set up ipMasq").with_details(e);
    // A chain left by an interrupted ADD is reused after a flush.
    if iptables(v4, &["-N", &chain]).is_err() {
        iptables(v4, &["-F", &chain]).map_err(fail)?;
    }
    iptables(v4, &["-A", &chain, "-d", &subnet, "-j", "ACCEPT", "-m", "comment", "--comment", &c]).map_err(fail)?;
    iptables(v4, &["-A", &chain, "!", "-d", mcast, "-j", "MASQUERADE", "-m", "comment", "--comment", &c])
        .map_err(fail)?;
    let jump = ["POSTROUTING", "-s", &host, "-j", &chain, "-m", "comment", "--comment", &c];
    if iptables(v4, &[&["-C"][..], &jump[..]].concat()).is_err() {
        iptables(v4, &[&["-A"][..], &jump[..]].concat()).map_err(fail)?;
    }
    Ok(())
}

/// What of [`setup`]'s rules is missing for `addr` (empty when all are in place).
pub fn verify(network: &str, container_id: &str, addr: &IpNet) -> Vec<String> {
    let Parts { v4, chain, comment: c, subnet, host, mcast } = Parts::new(network, container_id, addr);
    let rules: [(&str, Vec<&str>); 3] = [
        ("jump", vec!["POSTROUTING", "-s", &host, "-j", &chain, "-m", "comment", "--comment", &c]),
        ("ACCEPT to the pod subnet", vec![&chain, "-d", &subnet, "-j", "ACCEPT", "-m", "comment", "--comment", &c]),
        ("MASQUERADE", vec![&chain, "!", "-d", mcast, "-j", "MASQUERADE", "-m", "comment", "--comment", &c]),
    ];
    rules
        .iter()
        .filter(|(_, r)| iptables(v4, &[&["-C"][..], &r[..]].concat()).is_err())
        .map(|(what, _)| format!("ipMasq rule missing for {}: {what} ({chain})", addr.addr()))
        .collect()
}

/// Removes what [`setup`] installed; missing pieces are fine (DEL is idempotent).
pub fn teardown(network: &str, container_id: &str, ip: IpAddr) -> std::result::Result<(), String> {
    let v4 = ip.is_ipv4();
    let chain = chain_name(network, container_id);
    let c = comment(network, container_id);
    let host = format!("{ip}/{}", if v4 { 32 } else { 128 });
    while iptables(v4, &["-D", "POSTROUTING", "-s", &host, "-j", &chain, "-m", "comment", "--comment", &c]).is_ok() {}
    if iptables(v4, &["-F", &chain]).is_ok() {
        iptables(v4, &["-X", &chain])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_names_match_the_bridge_plugin() {
        let c = chain_name("cbr0", "abc");
        assert_eq!(c.len(), 28);
        assert!(c.starts_with("CNI-"));
        assert_eq!(comment("cbr0", "abc"), r#"name: "cbr0" id: "abc""#);
    }
}
