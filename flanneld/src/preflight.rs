//! Node prerequisites, checked as upstream checks them and no harder: where
//! upstream flanneld starts, this one starts too, and says loudly what is
//! wrong (a warning naming the sysctl and what breaks, and
//! `flannel_node_prerequisite_unmet{sysctl=...}` on /metrics; /readyz is not
//! affected).
//!
//! Upstream (v0.28) refuses only one thing: in iptables mode, a missing
//! `net.bridge.bridge-nf-call-iptables` (`-ip6tables` for IPv6), i.e.
//! br_netfilter not loaded. A value of 0 starts there, and so here, with a
//! warning. IP forwarding is turned on when it is off and `/proc/sys` is
//! writable (upstream leaves it; pods on other nodes are unreachable until
//! someone turns it on); when it cannot be, the agent warns and starts.

use std::path::Path;

use flannel_shared::netconf::NetConfig;

/// A node prerequisite upstream also refuses to start without.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PreflightError(pub String);

/// A prerequisite that is not met but does not stop the agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unmet {
    /// The sysctl, dotted (`net.bridge.bridge-nf-call-iptables`).
    pub sysctl: String,
    /// What is wrong, what breaks, and the fix.
    pub message: String,
}

/// What the checks found and did.
#[derive(Debug, Default)]
pub struct Report {
    pub unmet: Vec<Unmet>,
    /// Sysctls this check turned on.
    pub enabled: Vec<String>,
}

fn dotted(rel: &str) -> String {
    rel.trim_start_matches("sys/").replace('/', ".")
}

/// Checks the node for `cfg` under `proc` (normally `/proc`).
pub fn check(proc: &Path, cfg: &NetConfig) -> Result<Report, PreflightError> {
    let mut report = Report::default();
    let mut bridge = |rel: &str, tool: &str| -> Result<(), PreflightError> {
        let p = proc.join(rel);
        let key = dotted(rel);
        match std::fs::read_to_string(&p) {
            Ok(v) if v.trim() == "1" => Ok(()),
            Ok(_) => {
                report.unmet.push(Unmet {
                    sysctl: key.clone(),
                    message: format!(
                        "{key} is 0: bridged pod traffic skips {tool}, so a Service reply between two pods on \
                         this node misses kube-proxy's reverse NAT and the connection hangs; \
                         set it with `sysctl -w {key}=1` (and in /etc/sysctl.d to survive reboots)"
                    ),
                });
                Ok(())
            }
            Err(_) if cfg.enable_nftables => Ok(()),
            Err(_) => Err(PreflightError(format!(
                "{} is missing: the br_netfilter module is not loaded (run `modprobe br_netfilter`); \
                 without it Services between pods on one node silently break",
                p.display()
            ))),
        }
    };
    if cfg.ipv4.is_some() {
        bridge("sys/net/bridge/bridge-nf-call-iptables", "iptables")?;
    }
    if cfg.ipv6.is_some() {
        bridge("sys/net/bridge/bridge-nf-call-ip6tables", "ip6tables")?;
    }
    let mut forward = |rel: &str, what: &str| {
        let key = dotted(rel);
        match turn_on(proc, rel) {
            Ok(true) => report.enabled.push(key),
            Ok(false) => {}
            Err(e) => report.unmet.push(Unmet {
                sysctl: key.clone(),
                message: format!(
                    "{key} is off and cannot be turned on here ({e}): {what} pods on other nodes are unreachable \
                     until the node turns it on (`sysctl -w {key}=1`, and in /etc/sysctl.d to survive reboots)"
                ),
            }),
        }
    };
    if cfg.ipv4.is_some() {
        forward("sys/net/ipv4/ip_forward", "IPv4");
    }
    if cfg.ipv6.is_some() {
        forward("sys/net/ipv6/conf/all/forwarding", "IPv6");
    }
    Ok(report)
}

/// Sets a `0/1` sysctl under `proc` to 1; returns whether it had to.
fn turn_on(proc: &Path, rel: &str) -> Result<bool, String> {
    let p = proc.join(rel);
    let cur = std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))?;
    if cur.trim() == "1" {
        return Ok(false);
    }
    // A container's /proc/sys is read-only unless it is privileged.
    std::fs::write(&p, "1").map_err(|e| format!("{}: {e}", p.display()))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    struct FakeProc(std::path::PathBuf);

    impl FakeProc {
        fn new(files: &[(&str, &str)]) -> FakeProc {
            static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = N.fetch_add(1, Ordering::Relaxed);
            let root = std::env::temp_dir().join(format!("flanneld-proc-{}-{n}", std::process::id()));
            for (rel, v) in files {
                let p = root.join(rel);
                std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                std::fs::write(p, v).unwrap();
            }
            FakeProc(root)
        }
        fn read(&self, rel: &str) -> String {
            std::fs::read_to_string(self.0.join(rel)).unwrap()
        }
    }

    impl Drop for FakeProc {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn conf(s: &str) -> NetConfig {
        NetConfig::parse(s, |_| {}).unwrap()
    }

    const BR4: &str = "sys/net/bridge/bridge-nf-call-iptables";
    const BR6: &str = "sys/net/bridge/bridge-nf-call-ip6tables";
    const FWD4: &str = "sys/net/ipv4/ip_forward";
    const FWD6: &str = "sys/net/ipv6/conf/all/forwarding";

    #[test]
    fn refuses_only_a_missing_br_netfilter_in_iptables_mode() {
        let v4 = conf(r#"{"Network":"10.244.0.0/16"}"#);
        let nft = conf(r#"{"Network":"10.244.0.0/16","EnableNFTables":true}"#);
        let p = FakeProc::new(&[(FWD4, "1\n")]);
        let e = check(&p.0, &v4).unwrap_err().to_string();
        assert!(e.contains("br_netfilter") && e.contains("modprobe"), "{e}");
        // nftables mode: upstream does not check, neither do we.
        let r = check(&p.0, &nft).unwrap();
        assert!(r.unmet.is_empty() && r.enabled.is_empty(), "{r:?}");
        // IPv6 needs the ip6tables one too.
        let dual = conf(r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/56"}"#);
        let p = FakeProc::new(&[(BR4, "1\n"), (FWD4, "1\n"), (FWD6, "1\n")]);
        assert!(check(&p.0, &dual).unwrap_err().to_string().contains("bridge-nf-call-ip6tables"));
    }

    #[test]
    fn bridge_nf_off_starts_with_a_warning_naming_the_sysctl() {
        let v4 = conf(r#"{"Network":"10.244.0.0/16"}"#);
        let p = FakeProc::new(&[(BR4, "0\n"), (FWD4, "1\n")]);
        let r = check(&p.0, &v4).unwrap();
        assert_eq!(r.unmet.len(), 1, "{r:?}");
        assert_eq!(r.unmet[0].sysctl, "net.bridge.bridge-nf-call-iptables");
        assert!(r.unmet[0].message.contains("sysctl -w net.bridge.bridge-nf-call-iptables=1"), "{r:?}");
        // The sysctl is the node's: left as it is.
        assert_eq!(p.read(BR4), "0\n");
    }

    #[test]
    fn forwarding_is_turned_on_or_reported() {
        let dual = conf(r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/56"}"#);
        let p = FakeProc::new(&[(BR4, "1\n"), (BR6, "1\n"), (FWD4, "0\n"), (FWD6, "0\n")]);
        let r = check(&p.0, &dual).unwrap();
        assert_eq!(r.enabled, ["net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"]);
        assert!(r.unmet.is_empty());
        assert_eq!((p.read(FWD4), p.read(FWD6)), ("1".into(), "1".into()));
        assert!(check(&p.0, &dual).unwrap().enabled.is_empty(), "already on: nothing to do");
        // Unreadable/unwritable (here: absent): a warning, not a refusal.
        let p = FakeProc::new(&[(BR4, "1\n")]);
        let r = check(&p.0, &conf(r#"{"Network":"10.244.0.0/16"}"#)).unwrap();
        assert_eq!(r.unmet.len(), 1);
        assert_eq!(r.unmet[0].sysctl, "net.ipv4.ip_forward");
        assert!(r.unmet[0].message.contains("sysctl -w net.ipv4.ip_forward=1"), "{r:?}");
    }
}
