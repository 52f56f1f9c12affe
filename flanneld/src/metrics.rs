//! The agent's counters and gauges and their exposition, through
//! prometheus-client (OpenMetrics text). The metric handles are atomics
//! shared with the registry: the agent updates them from one thread, the
//! health server encodes them from another.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// The content type of [`Metrics::render`].
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Debug)]
pub struct Metrics {
    pub peers: Gauge,
    pub routes: Gauge,
    pub neighbours: Gauge,
    pub fdb_entries: Gauge,
    pub skipped_peers: Gauge,
    /// Unix seconds at which our lease expires (0 = no lease).
    pub lease_expiry: Gauge,
    pub reconcile_runs: Counter,
    pub reconcile_errors: Counter,
    pub reconcile_changes: Counter,
    /// Duration of the last reconcile pass, seconds.
    pub reconcile_last: Gauge<f64, AtomicU64>,
    pub reconcile_total: Counter<f64, AtomicU64>,
    pub watch_restarts: Counter,
    /// Kernel notifications about state the agent owns (each burst wakes a pass).
    pub kernel_changes: Counter,
    pub iptables_restores: Counter,
    pub iptables_errors: Counter,
    pub vtep_recreations: Counter,
    pub lease_held: AtomicBool,
    pub subnet_env_written: AtomicBool,
    pub rules_in_place: AtomicBool,
    /// The peers known from the first full lease listing are in the kernel.
    pub peers_synced: AtomicBool,
    /// Node prerequisites found unmet at start (1 per sysctl; see the log).
    unmet: Family<Vec<(String, String)>, Gauge>,
    /// Mirrors [`Metrics::readiness`], set when encoding.
    ready: Gauge,
    registry: Registry,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut m = Metrics {
            peers: Gauge::default(),
            routes: Gauge::default(),
            neighbours: Gauge::default(),
            fdb_entries: Gauge::default(),
            skipped_peers: Gauge::default(),
            lease_expiry: Gauge::default(),
            reconcile_runs: Counter::default(),
            reconcile_errors: Counter::default(),
            reconcile_changes: Counter::default(),
            reconcile_last: Gauge::default(),
            reconcile_total: Counter::default(),
            watch_restarts: Counter::default(),
            kernel_changes: Counter::default(),
            iptables_restores: Counter::default(),
            iptables_errors: Counter::default(),
            vtep_recreations: Counter::default(),
            lease_held: AtomicBool::new(false),
            subnet_env_written: AtomicBool::new(false),
            rules_in_place: AtomicBool::new(false),
            peers_synced: AtomicBool::new(false),
            unmet: Family::default(),
            ready: Gauge::default(),
            registry: Registry::with_prefix("flannel"),
        };
        // Names as exposed: the prefix, then counters get `_total` appended.
        let r = &mut m.registry;
        r.register("peers", "Peer leases known to this agent", m.peers.clone());
        r.register("routes_programmed", "Routes to peers this agent keeps in the kernel", m.routes.clone());
        r.register("neighbours_programmed", "ARP/NDP entries on the VXLAN device", m.neighbours.clone());
        r.register("fdb_entries_programmed", "FDB entries on the VXLAN device", m.fdb_entries.clone());
        r.register("peers_skipped", "Peers that cannot be programmed (see the log)", m.skipped_peers.clone());
        r.register(
            "lease_expiry_timestamp_seconds",
            "When this node's subnet lease expires (Unix time)",
            m.lease_expiry.clone(),
        );
        r.register("reconcile_runs", "Reconcile passes", m.reconcile_runs.clone());
        r.register("reconcile_errors", "Reconcile passes that failed", m.reconcile_errors.clone());
        r.register("reconcile_changes", "Kernel entries added or removed by reconcile", m.reconcile_changes.clone());
        r.register("reconcile_last_duration_seconds", "Duration of the last reconcile pass", m.reconcile_last.clone());
        r.register("reconcile_duration_seconds", "Time spent reconciling", m.reconcile_total.clone());
        r.register("watch_restarts", "Times the lease watch broke and was re-listed", m.watch_restarts.clone());
        r.register(
            "kernel_changes",
            "Kernel notifications touching our routes, ARP/FDB entries or VXLAN devices",
            m.kernel_changes.clone(),
        );
        r.register("iptables_restores", "Times iptables rules had to be (re)written", m.iptables_restores.clone());
        r.register("iptables_errors", "Failed iptables checks or writes", m.iptables_errors.clone());
        r.register(
            "vtep_recreations",
            "Times the VXLAN device was missing or wrong and was rebuilt",
            m.vtep_recreations.clone(),
        );
        r.register(
            "node_prerequisite_unmet",
            "1 for each node sysctl found wrong at start; the agent runs, the log says what breaks",
            m.unmet.clone(),
        );
        r.register(
            "ready",
            "1 when the lease is held, subnet.env written, rules in place and the known peers programmed",
            m.ready.clone(),
        );
        m
    }
}

/// A count or size as a gauge value.
pub fn count(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Metrics {
    /// Records a prerequisite that is not met (`sysctl` dotted).
    pub fn prerequisite_unmet(&self, sysctl: &str) {
        self.unmet.get_or_create(&vec![("sysctl".to_string(), sysctl.to_string())]).set(1);
    }

    /// What /readyz checks, with the reason when not ready.
    pub fn readiness(&self) -> Result<(), &'static str> {
        if !self.lease_held.load(Ordering::Relaxed) {
            return Err("no subnet lease held");
        }
        if !self.subnet_env_written.load(Ordering::Relaxed) {
            return Err("subnet.env not written");
        }
        if !self.rules_in_place.load(Ordering::Relaxed) {
            return Err("firewall rules (iptables or nftables) not in place");
        }
        if !self.peers_synced.load(Ordering::Relaxed) {
            return Err("peers from the first lease listing not programmed yet");
        }
        Ok(())
    }

    /// The exposition, in [`CONTENT_TYPE`].
    pub fn render(&self) -> String {
        self.ready.set(i64::from(self.readiness().is_ok()));
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_is_prometheus_text() {
        let m = Metrics::default();
        m.peers.set(3);
        m.reconcile_last.set(0.0015);
        m.reconcile_runs.inc();
        let text = m.render();
        assert!(text.contains("# TYPE flannel_peers gauge\nflannel_peers 3\n"), "{text}");
        assert!(text.contains("flannel_reconcile_last_duration_seconds 0.0015\n"), "{text}");
        assert!(text.contains("# TYPE flannel_reconcile_runs counter\nflannel_reconcile_runs_total 1\n"), "{text}");
        assert!(text.contains("flannel_ready 0\n"));
        assert!(text.ends_with("# EOF\n"), "{text}");
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
