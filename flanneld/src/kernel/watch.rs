//! Kernel change notifications: anything that touches what the agent owns
//! (a route of ours or inside the pod network, an ARP/FDB entry, address or
//! setting of a VTEP) wakes the agent for a reconcile pass at once, so the
//! periodic pass is only a safety net and an idle agent does no work.
//!
//! Our own writes come back here too. Those of a full pass cost one more
//! pass, which finds nothing to do and writes nothing, so they cannot loop.
//! Those of the incremental path (one peer changed) are announced first with
//! [`KernelWatch::expect`] and swallowed when they arrive, so a peer change
//! costs its few writes and no pass. An announced echo that never comes is
//! dropped after [`ECHO_TTL`]; until then it could hide one foreign change of
//! the same kind, which the periodic pass then repairs.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{trace, warn};

use flannel_shared::IpNet;
use flannel_shared::netlink::{KernelEvent, Monitor, RTPROT_FLANNEL};

use crate::metrics::Metrics;
use crate::reconcile::Echo;

/// How long an announced echo of our own write is waited for.
pub const ECHO_TTL: Duration = Duration::from_secs(2);

/// Notifications our own incremental writes will cause.
#[derive(Debug, Default)]
struct Echoes(Vec<(Echo, Instant)>);

impl Echoes {
    /// Whether `ev` is one of ours (consuming it).
    fn take(&mut self, ev: &KernelEvent, now: Instant) -> bool {
        self.0.retain(|(_, at)| now.duration_since(*at) < ECHO_TTL);
        let pos = self.0.iter().position(|(e, _)| match (e, ev) {
            (Echo::Route(d), KernelEvent::Route { dst, protocol }) => d == dst && *protocol == RTPROT_FLANNEL,
            (Echo::Neighbour { index: i, fdb: f }, KernelEvent::Neighbour { index, fdb }) => i == index && f == fdb,
            _ => false,
        });
        pos.map(|p| self.0.remove(p)).is_some()
    }
}

/// What the agent owns, as far as notifications can tell.
#[derive(Clone, Debug, Default)]
pub struct Interest {
    /// VTEP names (`flannel.1`, `flannel-v6.1`): a device of that name appearing or going.
    pub names: Vec<String>,
    /// VTEP link indices: their ARP/NDP/FDB entries, addresses and settings.
    pub links: Vec<u32>,
    /// The pod networks: routes into them, whoever wrote them.
    pub nets: Vec<IpNet>,
}

impl Interest {
    /// Whether `ev` may have changed state the agent reconciles.
    pub fn touched_by(&self, ev: &KernelEvent) -> bool {
        match ev {
            KernelEvent::Overrun => true,
            KernelEvent::Link { index, name } => self.links.contains(index) || self.names.contains(name),
            KernelEvent::Address { index } => self.links.contains(index),
            KernelEvent::Neighbour { index, .. } => self.links.contains(index),
            KernelEvent::Route { dst, protocol } => {
                *protocol == RTPROT_FLANNEL || self.nets.iter().any(|n| n.contains_net(dst))
            }
        }
    }
}

/// A running subscription; [`KernelWatch::changed`] yields once per burst of relevant changes.
pub struct KernelWatch {
    interest: Arc<Mutex<Interest>>,
    echoes: Arc<Mutex<Echoes>>,
    rx: mpsc::Receiver<()>,
    task: Option<JoinHandle<()>>,
}

impl KernelWatch {
    /// Subscribes in the caller's namespace. Without a subscription (it failed)
    /// [`KernelWatch::changed`] never fires and the periodic pass does all the work.
    pub fn start(metrics: Arc<Metrics>) -> KernelWatch {
        let interest = Arc::new(Mutex::new(Interest::default()));
        let echoes = Arc::new(Mutex::new(Echoes::default()));
        let (tx, rx) = mpsc::channel(1);
        let task = match Monitor::subscribe() {
            Ok(monitor) => Some(tokio::spawn(forward(monitor, interest.clone(), echoes.clone(), tx, metrics))),
            Err(e) => {
                warn!("kernel change notifications unavailable ({e}); relying on the periodic reconcile pass");
                None
            }
        };
        KernelWatch { interest, echoes, rx, task }
    }

    /// A watch that never fires (a kernel without notifications, as in the agent's unit tests).
    pub fn inert() -> KernelWatch {
        let (_, rx) = mpsc::channel(1);
        KernelWatch { interest: Default::default(), echoes: Default::default(), rx, task: None }
    }

    /// What the agent owns, as last set.
    pub fn interest(&self) -> Interest {
        self.interest.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn set_interest(&self, interest: Interest) {
        *self.interest.lock().unwrap_or_else(|p| p.into_inner()) = interest;
    }

    /// Announces the notifications writes about to be made will cause, so they wake no pass.
    pub fn expect(&self, echoes: impl IntoIterator<Item = Echo>) {
        let now = Instant::now();
        self.echoes.lock().unwrap_or_else(|p| p.into_inner()).0.extend(echoes.into_iter().map(|e| (e, now)));
    }

    /// Waits for a relevant change (forever without a subscription).
    pub async fn changed(&mut self) {
        if self.rx.recv().await.is_none() {
            std::future::pending::<()>().await;
        }
    }

    /// Forgets changes already signalled (they are covered by the pass about to start).
    pub fn clear(&mut self) {
        while self.rx.try_recv().is_ok() {}
    }
}

impl Drop for KernelWatch {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

async fn forward(
    mut monitor: Monitor,
    interest: Arc<Mutex<Interest>>,
    echoes: Arc<Mutex<Echoes>>,
    tx: mpsc::Sender<()>,
    metrics: Arc<Metrics>,
) {
    while let Some(ev) = monitor.next().await {
        let relevant = interest.lock().unwrap_or_else(|p| p.into_inner()).touched_by(&ev);
        if !relevant || echoes.lock().unwrap_or_else(|p| p.into_inner()).take(&ev, Instant::now()) {
            continue;
        }
        metrics.kernel_changes.inc();
        if matches!(ev, KernelEvent::Overrun) {
            warn!("kernel notifications overflowed; running a full reconcile pass");
        } else {
            trace!("kernel change: {ev:?}");
        }
        // A full channel already holds a wake-up; the burst shares it.
        let _ = tx.try_send(());
    }
    warn!("kernel change notifications stopped; relying on the periodic reconcile pass");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn only_our_devices_routes_and_networks_matter() {
        let i = Interest {
            names: vec!["flannel.1".into()],
            links: vec![7],
            nets: vec![net("10.244.0.0/16"), net("fd00:10:244::/56")],
        };
        assert!(i.touched_by(&KernelEvent::Overrun));
        assert!(i.touched_by(&KernelEvent::Link { index: 7, name: "flannel.1".into() }));
        // Recreated by someone else under a new index.
        assert!(i.touched_by(&KernelEvent::Link { index: 9, name: "flannel.1".into() }));
        assert!(!i.touched_by(&KernelEvent::Link { index: 3, name: "veth1234".into() }));
        assert!(i.touched_by(&KernelEvent::Neighbour { index: 7, fdb: true }));
        assert!(!i.touched_by(&KernelEvent::Neighbour { index: 2, fdb: false }));
        assert!(i.touched_by(&KernelEvent::Address { index: 7 }));
        assert!(!i.touched_by(&KernelEvent::Address { index: 2 }));
        let route = |dst: &str, protocol: u8| KernelEvent::Route { dst: net(dst), protocol };
        assert!(i.touched_by(&route("10.244.3.0/24", 3)));
        assert!(i.touched_by(&route("fd00:10:244:3::/64", 3)));
        assert!(i.touched_by(&route("192.168.0.0/24", RTPROT_FLANNEL)));
        assert!(!i.touched_by(&route("192.168.0.0/24", 3)));
        assert!(!i.touched_by(&route("0.0.0.0/0", 3)));
    }

    #[test]
    fn announced_echoes_are_swallowed_once_and_expire() {
        let mut e = Echoes::default();
        let t0 = Instant::now();
        e.0.push((Echo::Route(net("10.244.3.0/24")), t0));
        e.0.push((Echo::Neighbour { index: 7, fdb: true }, t0));
        let route = |dst: &str, protocol: u8| KernelEvent::Route { dst: net(dst), protocol };
        // Someone else's route to the same place is not ours.
        assert!(!e.take(&route("10.244.3.0/24", 3), t0));
        assert!(!e.take(&KernelEvent::Neighbour { index: 7, fdb: false }, t0));
        assert!(e.take(&route("10.244.3.0/24", RTPROT_FLANNEL), t0));
        assert!(!e.take(&route("10.244.3.0/24", RTPROT_FLANNEL), t0), "each echo is swallowed once");
        // Expired: the next FDB change wakes a pass again.
        assert!(!e.take(&KernelEvent::Neighbour { index: 7, fdb: true }, t0 + ECHO_TTL));
        assert!(e.0.is_empty());
    }
}
