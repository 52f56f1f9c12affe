//! The agent's counters and gauges, and their Prometheus text exposition.
//! Plain atomics: the agent updates them from one thread, the health server
//! reads them from another.

use std::fmt::Write;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct Metrics {
    pub peers: AtomicU64,
    pub routes: AtomicU64,
    pub neighbours: AtomicU64,
    pub fdb_entries: AtomicU64,
    pub skipped_peers: AtomicU64,
    /// Unix seconds at which our lease expires (0 = no lease).
    pub lease_expiry: AtomicI64,
    pub reconcile_runs: AtomicU64,
    pub reconcile_errors: AtomicU64,
    pub reconcile_changes: AtomicU64,
    /// Duration of the last reconcile pass, microseconds.
    pub reconcile_last_us: AtomicU64,
    pub reconcile_total_us: AtomicU64,
    pub watch_restarts: AtomicU64,
    /// Kernel notifications about state the agent owns (each burst wakes a pass).
    pub kernel_changes: AtomicU64,
    pub iptables_restores: AtomicU64,
    pub iptables_errors: AtomicU64,
    pub vtep_recreations: AtomicU64,
    pub lease_held: AtomicBool,
    pub subnet_env_written: AtomicBool,
    pub rules_in_place: AtomicBool,
    /// The peers known from the first full lease listing are in the kernel.
    pub peers_synced: AtomicBool,
}

impl Metrics {
    /// What /readyz checks, with the reason when not ready.
    pub fn readiness(&self) -> Result<(), &'static str> {
        if !self.lease_held.load(Ordering::Relaxed) {
            return Err("no subnet lease held");
        }
        if !self.subnet_env_written.load(Ordering::Relaxed) {
            return Err("subnet.env not written");
        }
        if !self.rules_in_place.load(Ordering::Relaxed) {
            return Err("iptables rules not in place");
        }
        if !self.peers_synced.load(Ordering::Relaxed) {
            return Err("peers from the first lease listing not programmed yet");
        }
        Ok(())
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut put = |name: &str, kind: &str, help: &str, value: String| {
            let _ = write!(out, "# HELP flannel_{name} {help}\n# TYPE flannel_{name} {kind}\nflannel_{name} {value}\n");
        };
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed).to_string();
        put("peers", "gauge", "Peer leases known to this agent.", g(&self.peers));
        put("routes_programmed", "gauge", "Routes to peers this agent keeps in the kernel.", g(&self.routes));
        put("neighbours_programmed", "gauge", "ARP/NDP entries on the VXLAN device.", g(&self.neighbours));
        put("fdb_entries_programmed", "gauge", "FDB entries on the VXLAN device.", g(&self.fdb_entries));
        put("peers_skipped", "gauge", "Peers that cannot be programmed (see the log).", g(&self.skipped_peers));
        put(
            "lease_expiry_timestamp_seconds",
            "gauge",
            "When this node's subnet lease expires (Unix time).",
            self.lease_expiry.load(Ordering::Relaxed).to_string(),
        );
        put("reconcile_runs_total", "counter", "Reconcile passes.", g(&self.reconcile_runs));
        put("reconcile_errors_total", "counter", "Reconcile passes that failed.", g(&self.reconcile_errors));
        put(
            "reconcile_changes_total",
            "counter",
            "Kernel entries added or removed by reconcile.",
            g(&self.reconcile_changes),
        );
        let secs = |a: &AtomicU64| format!("{:.6}", a.load(Ordering::Relaxed) as f64 / 1e6);
        put(
            "reconcile_last_duration_seconds",
            "gauge",
            "Duration of the last reconcile pass.",
            secs(&self.reconcile_last_us),
        );
        put("reconcile_duration_seconds_total", "counter", "Time spent reconciling.", secs(&self.reconcile_total_us));
        put(
            "watch_restarts_total",
            "counter",
            "Times the lease watch broke and was re-listed.",
            g(&self.watch_restarts),
        );
        put(
            "kernel_changes_total",
            "counter",
            "Kernel notifications touching our routes, ARP/FDB entries or VXLAN devices.",
            g(&self.kernel_changes),
        );
        put(
            "iptables_restores_total",
            "counter",
            "Times iptables rules had to be (re)written.",
            g(&self.iptables_restores),
        );
        put("iptables_errors_total", "counter", "Failed iptables checks or writes.", g(&self.iptables_errors));
        put(
            "vtep_recreations_total",
            "counter",
            "Times the VXLAN device was missing or wrong and was rebuilt.",
            g(&self.vtep_recreations),
        );
        put(
            "ready",
            "gauge",
            "1 when the lease is held, subnet.env written, rules in place and the known peers programmed.",
            u8::from(self.readiness().is_ok()).to_string(),
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_is_prometheus_text() {
        let m = Metrics::default();
        m.peers.store(3, Ordering::Relaxed);
        m.reconcile_last_us.store(1500, Ordering::Relaxed);
        let text = m.render();
        assert!(text.contains("# TYPE flannel_peers gauge\nflannel_peers 3\n"), "{text}");
        assert!(text.contains("flannel_reconcile_last_duration_seconds 0.001500\n"));
        assert!(text.contains("flannel_ready 0\n"));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (name, value) = line.split_once(' ').unwrap();
            assert!(name.starts_with("flannel_") && value.parse::<f64>().is_ok(), "{line}");
        }
        assert_eq!(m.readiness(), Err("no subnet lease held"));
        m.lease_held.store(true, Ordering::Relaxed);
        m.subnet_env_written.store(true, Ordering::Relaxed);
        m.rules_in_place.store(true, Ordering::Relaxed);
        assert_eq!(m.readiness(), Err("peers from the first lease listing not programmed yet"));
        m.peers_synced.store(true, Ordering::Relaxed);
        assert_eq!(m.readiness(), Ok(()));
    }
}
