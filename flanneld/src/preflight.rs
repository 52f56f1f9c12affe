//! Node prerequisites checked before the agent starts: br_netfilter, and IP
//! forwarding (turned on when it may be).

use std::path::Path;

/// A node prerequisite that is not met, with what to do about it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PreflightError(pub String);

/// `br_netfilter` makes bridged pod traffic traverse iptables; without it a
/// Service reply between two pods on one node skips kube-proxy's reverse NAT
/// and the connection silently hangs. `proc` is normally `/proc`.
pub fn check_br_netfilter(proc: &Path) -> Result<(), PreflightError> {
    let p = proc.join("sys/net/bridge/bridge-nf-call-iptables");
    match std::fs::read_to_string(&p) {
        Ok(v) if v.trim() == "1" => Ok(()),
        Ok(_) => Err(PreflightError(format!(
            "{} is 0: Services between pods on one node would break; set net.bridge.bridge-nf-call-iptables=1",
            p.display()
        ))),
        Err(_) => Err(PreflightError(format!(
            "{} is missing: the br_netfilter module is not loaded (run `modprobe br_netfilter`); \
             without it Services between pods on one node silently break",
            p.display()
        ))),
    }
}

/// Sets a `0/1` sysctl under `proc` (normally `/proc`) to 1; returns whether it had to.
fn turn_on(proc: &Path, rel: &str) -> Result<bool, PreflightError> {
    let p = proc.join(rel);
    let cur = std::fs::read_to_string(&p).map_err(|e| PreflightError(format!("{}: {e}", p.display())))?;
    if cur.trim() == "1" {
        return Ok(false);
    }
    std::fs::write(&p, "1").map_err(|e| {
        // A container's /proc/sys is read-only unless it is privileged; the node must do it.
        let key = rel.trim_start_matches("sys/").replace('/', ".");
        PreflightError(format!(
            "{key} is 0 and cannot be turned on here ({}: {e}); set it on the node \
             (sysctl -w {key}=1, and in /etc/sysctl.d to survive reboots)",
            p.display()
        ))
    })?;
    Ok(true)
}

/// Turns on IPv4 forwarding; returns whether it had to.
pub fn enable_ip_forward(proc: &Path) -> Result<bool, PreflightError> {
    turn_on(proc, "sys/net/ipv4/ip_forward")
}

/// Turns on IPv6 forwarding (dual-stack); returns whether it had to.
pub fn enable_ipv6_forward(proc: &Path) -> Result<bool, PreflightError> {
    turn_on(proc, "sys/net/ipv6/conf/all/forwarding")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    fn fake_proc(bridge: Option<&str>, forward: &str) -> std::path::PathBuf {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let root = std::env::temp_dir().join(format!("flanneld-proc-{}-{n}", std::process::id()));
        std::fs::create_dir_all(root.join("sys/net/ipv4")).unwrap();
        std::fs::write(root.join("sys/net/ipv4/ip_forward"), forward).unwrap();
        if let Some(v) = bridge {
            std::fs::create_dir_all(root.join("sys/net/bridge")).unwrap();
            std::fs::write(root.join("sys/net/bridge/bridge-nf-call-iptables"), v).unwrap();
        }
        root
    }

    #[test]
    fn preflight_refuses_without_br_netfilter_and_turns_on_forwarding() {
        let p = fake_proc(None, "0\n");
        let e = check_br_netfilter(&p).unwrap_err().to_string();
        assert!(e.contains("br_netfilter") && e.contains("modprobe"), "{e}");
        assert!(enable_ip_forward(&p).unwrap());
        assert_eq!(std::fs::read_to_string(p.join("sys/net/ipv4/ip_forward")).unwrap(), "1");
        assert!(!enable_ip_forward(&p).unwrap());
        std::fs::remove_dir_all(&p).unwrap();

        let p = fake_proc(Some("0\n"), "1\n");
        assert!(check_br_netfilter(&p).unwrap_err().to_string().contains("bridge-nf-call-iptables=1"));
        std::fs::remove_dir_all(&p).unwrap();
        let p = fake_proc(Some("1\n"), "1\n");
        assert!(check_br_netfilter(&p).is_ok());
        std::fs::remove_dir_all(&p).unwrap();
    }
}
