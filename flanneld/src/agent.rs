//! The agent: claim a subnet, publish it in subnet.env, keep the kernel in
//! step with the peers' leases, keep the firewall rules in place, renew the
//! lease. Orchestration only: leases come from a [`SubnetManager`], the node
//! side from a [`Backend`], kernel state through [`Kernel`] and the
//! reconciler, rules through a [`Firewall`]. Everything runs on one thread;
//! the lease watch feeds it events through a channel.
//!
//! Restart and SIGTERM leave kernel state and the lease alone, so traffic
//! keeps flowing while the agent is away.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use flannel_shared::IpNet;
use flannel_shared::lease::LeaseAttrs;
use flannel_shared::netconf::NetConfig;
use flannel_shared::netlink::{Netlink, Route};
use flannel_shared::subnet_env::SubnetEnv;

use crate::backend::{self, Backend, FamilyNet, Uplink};
use crate::backoff::Backoff;
use crate::config::Opts;
use crate::kernel::Kernel;
use crate::kernel::watch::{Interest, KernelWatch};
use crate::metrics::{self, Metrics};
use crate::peers::{Change, Known, PeerTable};
use crate::preflight::{self, PreflightError};
use crate::reconcile::{self, Peer, RTPROT_FLANNEL};
use crate::subnet::etcd::{self, EtcdManager};
use crate::subnet::{Claim, LeaseEvent, OwnLease, SubnetError, SubnetManager};
use flannel_shared::firewall::{Firewall, RuleSet};

/// Metric of the `--ip-blackhole-route` route: above cni0's connected route,
/// so it only catches traffic while the bridge route is absent.
const BLACKHOLE_METRIC: u32 = 4096;

/// How long a burst of kernel notifications may take to arrive before the pass it wakes.
const KERNEL_SETTLE: Duration = Duration::from_millis(50);

/// Above this many changed peers in one batch, one full pass (three dumps) is
/// cheaper than writing them one by one blind.
const INCREMENTAL_MAX: usize = 256;

/// Lease changes not yet in the kernel.
#[derive(Debug)]
struct Pending<D> {
    /// A full pass is due (a listing, our lease re-claimed, a failed write).
    all: bool,
    /// Changed peers, with what each was before the first change of the batch.
    peers: std::collections::BTreeMap<IpNet, Option<Box<Known<D>>>>,
}

impl<D> Default for Pending<D> {
    fn default() -> Self {
        Pending { all: false, peers: Default::default() }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Preflight(#[from] PreflightError),
    #[error("{0}")]
    Subnet(#[from] SubnetError),
    #[error("{0}")]
    Backend(#[from] backend::BackendError),
    #[error("netlink: {0}")]
    Io(#[from] std::io::Error),
}

fn unix_secs(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// What ends the agent's loop.
pub enum Stop {
    /// SIGTERM or SIGINT (the name is logged).
    Signal(&'static str),
}

/// What an agent is made of: where leases live, the kernel, the backend, the firewall driver.
pub struct Parts<M, K, B, F> {
    pub mgr: M,
    pub kernel: K,
    pub backend: B,
    pub firewall: F,
}

pub struct Agent<M: SubnetManager, K: Kernel, B: Backend, F: Firewall> {
    opts: Opts,
    mgr: M,
    k: K,
    backend: B,
    fw: F,
    metrics: Arc<Metrics>,
    /// The pod network's families: IPv4 first, then IPv6 when dual-stack.
    fams: Vec<FamilyNet>,
    uplink: Uplink,
    attrs: LeaseAttrs,
    own: Option<OwnLease>,
    peers: PeerTable<B::PeerData>,
    pending: Pending<B::PeerData>,
    last_skipped: Vec<(IpNet, String)>,
    renew_backoff: Backoff,
    next_renew: Instant,
    /// Whether the manager has been told the data path is up.
    announced_up: bool,
    /// Whether rule sets turned off by the flags have been removed.
    /// Wakes a reconcile pass when the kernel reports a change to what we own.
    kernel: KernelWatch,
    /// Set while the last pass failed: when to try again (sooner than the periodic pass).
    retry_at: Option<Instant>,
    retry_backoff: Backoff,
}

/// Reads and validates the network config, retrying while the store is away.
pub async fn load_config<M: SubnetManager>(mgr: &mut M) -> Result<NetConfig, AgentError> {
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(10));
    let text = loop {
        match mgr.network_config().await {
            Ok(t) => break t,
            Err(e) if e.is_transient() => {
                let d = backoff.delay();
                warn!("reading the network config: {e}; retrying in {d:?}");
                tokio::time::sleep(d).await;
            }
            Err(e) => return Err(e.into()),
        }
    };
    let cfg = NetConfig::parse(&text, |w| warn!("{w}")).map_err(|e| AgentError::Config(e.to_string()))?;
    backend::check(&cfg.backend, &mut |w| warn!("{w}")).map_err(|e| AgentError::Config(e.to_string()))?;
    Ok(cfg)
}

/// The pod network's families on this uplink: IPv4, IPv6, or both (IPv4 first).
fn families(cfg: &NetConfig, uplink: &Uplink) -> Result<Vec<FamilyNet>, AgentError> {
    let mut fams = Vec::new();
    if let Some(v4) = &cfg.ipv4 {
        fams.push(FamilyNet::v4(v4.clone(), uplink).ok_or_else(|| {
            AgentError::Config(format!("{} has no IPv4 address; give --public-ip or another --iface", uplink.name))
        })?);
    }
    if let Some(f6) = &cfg.ipv6 {
        let fam = FamilyNet::v6(f6.clone(), uplink).ok_or_else(|| {
            AgentError::Config(format!(
                "network config: EnableIPv6: {} has no global IPv6 address; give --public-ipv6 or another --iface",
                uplink.name
            ))
        })?;
        let what = if cfg.ipv4.is_some() { "dual-stack" } else { "IPv6-only" };
        info!("{what}: IPv6 network {}, public IPv6 {:?}", f6.network, uplink.public_ipv6);
        fams.push(fam);
    }
    Ok(fams)
}

impl<M: SubnetManager, K: Kernel, B: Backend, F: Firewall> Agent<M, K, B, F> {
    /// Everything up to the first lease: uplink, backend devices, claim, subnet.env, rules.
    /// `proc` is normally `/proc`.
    pub async fn start(
        opts: Opts,
        parts: Parts<M, K, B, F>,
        cfg: &NetConfig,
        metrics: Arc<Metrics>,
        proc: &Path,
    ) -> Result<Self, AgentError> {
        let Parts { mut mgr, kernel: k, mut backend, firewall: fw } = parts;
        let report = preflight::check(proc, cfg)?;
        for key in &report.enabled {
            info!("enabled {key} (pods' traffic is routed through this host)");
        }
        for u in &report.unmet {
            warn!("node prerequisite: {}", u.message);
            metrics.prerequisite_unmet(&u.sysctl);
        }
        // Subscribed before the first write, so nothing done to our state from here on goes unseen.
        let kernel = k.watch(metrics.clone());
        let stored = mgr.stored_public_ips().await;
        let uplink = backend::find_uplink(&k, &opts, stored, cfg.ipv4.is_some()).await?;
        let addr = uplink.ip.map(IpAddr::V4).or(uplink.ip6.map(IpAddr::V6));
        let public = uplink.public_ip.map(IpAddr::V4).or(uplink.public_ipv6.map(IpAddr::V6));
        info!(
            "uplink {} ({}), public IP {}, MTU {}, backend {}",
            uplink.name,
            addr.map(|a| a.to_string()).unwrap_or_default(),
            public.map(|a| a.to_string()).unwrap_or_default(),
            uplink.mtu,
            cfg.backend.kind
        );
        let fams = families(cfg, &uplink)?;
        backend::teardown_others(&k, &cfg.backend).await?;
        let (mut data, mut data6) = (Value::Null, None);
        for fam in &fams {
            let d = backend.setup(&k, &mut mgr, fam, &uplink).await?;
            if fam.v6 { data6 = Some(d) } else { data = d }
        }
        // An IPv6-only lease says 0.0.0.0 for its IPv4 address, as upstream's does.
        let has_v4 = fams.iter().any(|f| !f.v6);
        let attrs = LeaseAttrs {
            public_ip: uplink.public_ip.filter(|_| has_v4).unwrap_or(Ipv4Addr::UNSPECIFIED),
            public_ipv6: data6.as_ref().and(uplink.public_ipv6),
            backend_type: backend.kind().to_string(),
            backend_data: data,
            backend_v6_data: data6,
        };

        let mut agent = Agent {
            opts,
            mgr,
            k,
            backend,
            fw,
            metrics,
            fams,
            uplink,
            attrs,
            own: None,
            peers: PeerTable::new(B::peer_data),
            pending: Pending::default(),
            last_skipped: Vec::new(),
            renew_backoff: Backoff::new(Duration::from_secs(1), Duration::from_secs(60)),
            next_renew: Instant::now(),
            announced_up: false,
            kernel,
            retry_at: None,
            retry_backoff: Backoff::new(Duration::from_secs(1), Duration::from_secs(30)),
        };
        agent.update_interest();
        // Our previous subnets, if subnet.env still names them in this network.
        let env = SubnetEnv::read(&agent.opts.subnet_file).ok();
        let prefer = env
            .as_ref()
            .filter(|e| e.network.is_some() && e.network == agent.family(false).map(|f| f.config.network))
            .and_then(|e| e.subnet)
            .map(|s| s.network());
        let prefer6 = env
            .as_ref()
            .filter(|e| e.ipv6_network.is_some() && e.ipv6_network == agent.family(true).map(|f| f.config.network))
            .and_then(|e| e.ipv6_subnet)
            .map(|s| s.network());
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        while agent.own.is_none() {
            if let Err(e) = agent.acquire(prefer, prefer6).await {
                if !e.is_transient() {
                    return Err(e.into());
                }
                let d = backoff.delay();
                error!("claiming a subnet: {e}; retrying in {d:?}");
                tokio::time::sleep(d).await;
            }
        }
        agent.ensure_rules();
        Ok(agent)
    }

    /// What our lease is known by (its IPv4 subnet; the IPv6 one on an IPv6-only network).
    pub fn own_subnet(&self) -> Option<IpNet> {
        self.own.as_ref().map(|l| l.key())
    }

    /// The pod network's family `v6`, if configured.
    fn family(&self, v6: bool) -> Option<&FamilyNet> {
        self.fams.iter().find(|f| f.v6 == v6)
    }

    /// The pods' MTU: what fits through the backend in every family (an IPv6 tunnel has 20 bytes more overhead).
    fn mtu(&self) -> u32 {
        self.fams.iter().map(|f| self.backend.mtu(f, &self.uplink)).min().unwrap_or(self.uplink.mtu)
    }

    /// Claims (or re-claims) a subnet, then points the backend and subnet.env at it.
    async fn acquire(&mut self, prefer: Option<IpNet>, prefer6: Option<IpNet>) -> Result<(), SubnetError> {
        let claim = Claim {
            family: self.fams.iter().find(|f| !f.v6).map(|f| &f.config),
            family6: self.fams.iter().find(|f| f.v6).map(|f| &f.config),
            attrs: &self.attrs,
            prefer,
            prefer6,
        };
        let lease = self.mgr.acquire(&claim).await?;
        let subnet = lease.key();
        // The manager may have overridden the public IP (Kubernetes annotations).
        self.attrs = lease.attrs.clone();
        self.metrics.lease_held.store(true, Ordering::Relaxed);
        self.metrics.lease_expiry.set(unix_secs(lease.expiration));
        self.schedule_renew(&lease);
        if let Some(old) = self.own.replace(lease)
            && old.key() != subnet
        {
            warn!("our subnet changed from {} to {subnet}; pods started earlier keep old addresses", old.key());
        }
        self.peers.forget(&subnet);
        if let Err(e) = self.ensure_backend().await {
            warn!("configuring the {} backend: {e}", self.backend.kind());
        }
        self.write_subnet_env();
        Ok(())
    }

    fn schedule_renew(&mut self, lease: &OwnLease) {
        let left = lease.expiration.duration_since(SystemTime::now()).unwrap_or_default();
        let margin = Duration::from_secs(self.opts.subnet_lease_renew_margin.max(1) as u64 * 60);
        // A margin longer than the lease itself would renew in a tight loop: renew at half-life then.
        let wait = if margin < left { left - margin } else { left / 2 };
        self.next_renew = Instant::now() + wait;
        debug!("lease on {} renews in {wait:?}", lease.key());
    }

    fn write_subnet_env(&self) {
        let Some(own) = &self.own else { return };
        let gw = |s: &IpNet| s.nth(1).and_then(|ip| IpNet::new(ip, s.prefix()).ok());
        let env = SubnetEnv {
            network: self.family(false).map(|f| f.config.network),
            subnet: self.family(false).and(gw(&own.subnet)),
            ipv6_network: self.family(true).map(|f| f.config.network),
            ipv6_subnet: own.subnet6.as_ref().and_then(gw),
            mtu: self.mtu(),
            ipmasq: self.opts.ip_masq,
        };
        let path = &self.opts.subnet_file;
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        match env.write_atomic(path) {
            Ok(()) => {
                self.metrics.subnet_env_written.store(true, Ordering::Relaxed);
                info!("wrote {} (subnet {}, MTU {})", path.display(), own.key(), self.mtu());
            }
            Err(e) => {
                self.metrics.subnet_env_written.store(false, Ordering::Relaxed);
                error!("writing {}: {e}", path.display());
            }
        }
    }

    /// Puts back what the backend set up (a VTEP rebuilt with our advertised MAC and our subnet's address).
    async fn ensure_backend(&mut self) -> Result<(), backend::BackendError> {
        for fam in &self.fams {
            let subnet = self.own.as_ref().and_then(|l| fam.subnet_of(l));
            let data = if fam.v6 { self.attrs.backend_v6_data.as_ref() } else { Some(&self.attrs.backend_data) };
            if self.backend.ensure(&self.k, fam, &self.uplink, subnet, data).await? {
                self.metrics.vtep_recreations.inc();
            }
        }
        self.update_interest();
        Ok(())
    }

    /// Tells the kernel watch what we own now (device indices change when one is rebuilt).
    fn update_interest(&self) {
        let (names, links) = self.backend.devices();
        let nets = self.fams.iter().map(|f| f.config.network).collect();
        self.kernel.set_interest(Interest { names, links, nets });
    }

    /// The rule sets the flags ask for, per configured family.
    fn rule_sets(&self, own: &OwnLease) -> Vec<(bool, Vec<RuleSet>)> {
        let mut out = Vec::new();
        for fam in &self.fams {
            let Some(subnet) = fam.subnet_of(own) else { continue };
            let network = fam.config.network;
            let mut sets = Vec::new();
            if self.opts.ip_masq {
                let random_fully = !self.opts.ip_masq_fully_random_disable;
                sets.push(RuleSet::Masq { network, subnet, random_fully });
            }
            if self.opts.iptables_forward_rules {
                sets.push(RuleSet::Forward { network });
            }
            out.push((fam.v6, sets));
        }
        out
    }

    /// Makes the firewall hold exactly the sets the flags ask for (sets of
    /// kinds turned off, or of an old network, go).
    fn ensure_rules(&mut self) {
        let Some(own) = &self.own else { return };
        let name = self.fw.mode();
        let mut ok = true;
        for (v6, sets) in self.rule_sets(own) {
            match self.fw.sync(v6, &sets) {
                Ok(changes) => {
                    for c in &changes {
                        info!("{name}: {c}");
                    }
                    if !changes.is_empty() {
                        self.metrics.iptables_restores.inc();
                    }
                }
                Err(e) => {
                    ok = false;
                    self.metrics.iptables_errors.inc();
                    error!("{name}: {e}");
                }
            }
        }
        self.metrics.rules_in_place.store(ok, Ordering::Relaxed);
    }

    /// Applies one lease event to the peer table and notes what the kernel
    /// now lacks; returns whether our own lease needs claiming again.
    pub fn on_event(&mut self, ev: LeaseEvent) -> bool {
        let own = self.own.as_ref().map(|l| (l.key(), &l.attrs));
        let out = self.peers.apply(ev, own);
        match out.change {
            Change::None => {}
            Change::All => self.pending.all = true,
            Change::Peer { subnet, old } => {
                self.pending.peers.entry(subnet).or_insert(old);
            }
        }
        out.lost
    }

    /// Brings the kernel up to date with the events so far: nothing when they
    /// changed nothing, the changed peers' own entries when a few changed, a
    /// full pass after a listing or an error.
    pub async fn sync(&mut self) {
        if self.pending.all || self.pending.peers.len() > INCREMENTAL_MAX {
            self.reconcile().await;
        } else if !self.pending.peers.is_empty() {
            self.apply_changes().await;
        }
    }

    /// The incremental path: each changed peer's routes, ARP and FDB entries,
    /// planned from the same desired state as the full pass, written without
    /// reading the kernel. Their notifications are announced to the kernel
    /// watch so they wake no pass; a failure leaves a full pass due.
    async fn apply_changes(&mut self) {
        let changes = std::mem::take(&mut self.pending.peers);
        let m = self.metrics.clone();
        let backend_type = self.backend.kind();
        let mut ok = true;
        let (mut routes, mut neighbours, mut fdb) = (0i64, 0i64, 0i64);
        // The changed peers' old reasons for being left out go; their new ones are said once.
        let subnets_of = |k: &Known<B::PeerData>| [Some(k.lease.subnet), k.lease.subnet6];
        let changed: std::collections::HashSet<IpNet> = changes
            .iter()
            .flat_map(|(s, old)| {
                let now = self.peers.get(s).map(subnets_of).unwrap_or_default();
                let was = old.as_deref().map(subnets_of).unwrap_or_default();
                now.into_iter().chain(was).flatten().chain([*s])
            })
            .collect();
        self.last_skipped.retain(|(s, _)| !changed.contains(s));
        for fam in &self.fams {
            let Some(all) = self.backend.desired(fam, &self.uplink, &[]) else { continue };
            let vtep = all.device;
            let of = |p: Option<Peer<B::PeerData>>| {
                self.backend.desired(fam, &self.uplink, p.as_slice()).unwrap_or_default()
            };
            let refuse = |ip| self.backend.refuse(fam, &self.uplink, ip);
            let mut ops = Vec::new();
            for (subnet, old) in &changes {
                let was = old.as_ref().and_then(|k| k.peer(fam, backend_type, refuse).ok());
                let now = match self.peers.get(subnet).map(|k| k.peer(fam, backend_type, refuse)) {
                    Some(Ok(p)) => Some(p),
                    Some(Err(Some((s, why)))) => {
                        warn!("peer {s} not programmed: {why}");
                        self.last_skipped.push((s, why));
                        None
                    }
                    _ => None,
                };
                let plan = reconcile::plan_peer(&of(was), &of(now), !fam.v6);
                ops.extend(plan.ops);
                (routes, neighbours, fdb) = (routes + plan.routes, neighbours + plan.neighbours, fdb + plan.fdb);
            }
            if B::SYNCS_PEERS {
                let (peers, _) = self.peers.for_family(fam, backend_type, refuse);
                if let Err(e) = self.backend.sync_peers(&self.k, fam, &peers, self.peers.listed()).await {
                    ok = false;
                    m.reconcile_errors.inc();
                    error!("applying peer changes{}: {} peers: {e}", fam.label(), backend_type);
                }
            }
            self.kernel.expect(ops.iter().filter_map(|op| op.echo(vtep)));
            match reconcile::run_ops(&self.k, &ops, vtep).await {
                Ok(done) => {
                    m.reconcile_changes.inc_by(ops.len() as u64);
                    debug!("peer changes{}: {done:?}", fam.label());
                }
                Err(e) => {
                    ok = false;
                    m.reconcile_errors.inc();
                    error!("applying peer changes{}: {e}", fam.label());
                }
            }
        }
        // Sorted as the full pass keeps it, so it does not say them all again.
        self.last_skipped.sort();
        m.peers.set(metrics::count(self.peers.len()));
        m.skipped_peers.set(metrics::count(self.last_skipped.len()));
        m.routes.inc_by(routes);
        m.neighbours.inc_by(neighbours);
        m.fdb_entries.inc_by(fdb);
        if !ok {
            self.pending.all = true;
            let d = self.retry_backoff.delay();
            self.retry_at = Some(Instant::now() + d);
        }
    }

    /// One full pass: the backend's devices present, then routes/ARP/FDB from the peers.
    pub async fn reconcile(&mut self) {
        let started = Instant::now();
        // Changes signalled so far are covered by this pass: it reads the kernel afresh.
        self.kernel.clear();
        self.pending = Pending::default();
        let m = self.metrics.clone();
        m.reconcile_runs.inc();
        if let Err(e) = self.ensure_backend().await {
            m.reconcile_errors.inc();
            let d = self.retry_backoff.delay();
            error!("reconcile: {} backend: {e}; retrying in {d:?}", self.backend.kind());
            self.retry_at = Some(Instant::now() + d);
            return;
        }
        let mut skipped = Vec::new();
        let (mut routes, mut neighbours, mut fdb) = (0, 0, 0);
        let mut ok = true;
        let backend_type = self.backend.kind();
        for fam in &self.fams {
            let (peers, mut skip) =
                self.peers.for_family(fam, backend_type, |ip| self.backend.refuse(fam, &self.uplink, ip));
            let Some(mut want) = self.backend.desired(fam, &self.uplink, &peers) else { continue };
            skipped.append(&mut skip);
            skipped.append(&mut want.skipped);
            if self.opts.ip_blackhole_route
                && let Some(own) = self.own.as_ref().and_then(|l| fam.subnet_of(l))
            {
                want.routes.push(Route::new(own).blackhole().metric(BLACKHOLE_METRIC).protocol(RTPROT_FLANNEL));
            }
            routes += want.routes.len();
            neighbours += want.neighbours.len();
            fdb += want.fdb.len();
            if let Err(e) = self.backend.sync_peers(&self.k, fam, &peers, self.peers.listed()).await {
                ok = false;
                m.reconcile_errors.inc();
                error!("reconcile{}: {} peers: {e}", fam.label(), self.backend.kind());
            }
            match reconcile::apply_family(&self.k, &want, want.device, !fam.v6, self.peers.listed()).await {
                Ok(done) => {
                    let changes = done.routes_added
                        + done.routes_removed
                        + done.neighbours_set
                        + done.neighbours_removed
                        + done.fdb_set
                        + done.fdb_removed;
                    m.reconcile_changes.inc_by(changes as u64);
                    if !done.is_noop() {
                        info!(
                            "reconcile{}: routes +{} -{}, neighbours +{} -{}, fdb +{} -{}",
                            fam.label(),
                            done.routes_added,
                            done.routes_removed,
                            done.neighbours_set,
                            done.neighbours_removed,
                            done.fdb_set,
                            done.fdb_removed
                        );
                    }
                }
                Err(e) => {
                    ok = false;
                    m.reconcile_errors.inc();
                    error!("reconcile{}: {e}", fam.label());
                }
            }
        }
        // Ready follows the data path; a failing NetworkUnavailable patch is retried
        // (and logged) but does not hold readiness, so it cannot stall a rollout.
        if ok && self.peers.listed() && !m.peers_synced.swap(true, Ordering::Relaxed) {
            info!("ready: {} peers programmed", self.peers.len());
        }
        if ok && !self.announced_up && self.opts.set_node_network_unavailable {
            match self.mgr.network_up().await {
                Ok(()) => self.announced_up = true,
                Err(e) => {
                    warn!("{e}; retrying on the next pass");
                    ok = false;
                }
            }
        }
        if ok {
            self.retry_at = None;
            self.retry_backoff.reset();
        } else {
            let d = self.retry_backoff.delay();
            debug!("reconcile pass incomplete; next pass in {d:?}");
            self.retry_at = Some(Instant::now() + d);
        }
        skipped.sort();
        if skipped != self.last_skipped {
            for (s, why) in &skipped {
                warn!("peer {s} not programmed: {why}");
            }
            self.last_skipped = skipped;
        }
        m.peers.set(metrics::count(self.peers.len()));
        m.routes.set(metrics::count(routes));
        m.neighbours.set(metrics::count(neighbours));
        m.fdb_entries.set(metrics::count(fdb));
        m.skipped_peers.set(metrics::count(self.last_skipped.len()));
        let secs = started.elapsed().as_secs_f64();
        m.reconcile_last.set(secs);
        m.reconcile_total.inc_by(secs);
    }

    async fn renew(&mut self) {
        let Some(own) = self.own.clone() else { return };
        match self.mgr.renew(&own).await {
            Ok(l) => {
                self.renew_backoff.reset();
                self.metrics.lease_expiry.set(unix_secs(l.expiration));
                self.schedule_renew(&l);
                info!(
                    "renewed lease on {} (expires in {:?})",
                    l.subnet,
                    l.expiration.duration_since(SystemTime::now()).unwrap_or_default()
                );
                self.own = Some(l);
            }
            Err(SubnetError::LeaseLost(s)) => {
                warn!("our lease on {s} is gone; claiming it again");
                self.reclaim().await;
            }
            Err(e) => {
                let d = self.renew_backoff.delay();
                warn!("renewing lease on {}: {e}; retrying in {d:?}", own.subnet);
                self.next_renew = Instant::now() + d;
            }
        }
    }

    /// Claims our subnet again after losing it (preferring the same one).
    async fn reclaim(&mut self) {
        let prefer = self.own_subnet();
        let prefer6 = self.own.as_ref().and_then(|l| l.subnet6);
        if let Err(e) = self.acquire(prefer, prefer6).await {
            self.metrics.lease_held.store(false, Ordering::Relaxed);
            let d = self.renew_backoff.delay();
            error!("claiming a subnet again: {e}; retrying in {d:?}");
            self.next_renew = Instant::now() + d;
            // Marks the lease as needing a claim rather than a renewal.
            self.own = self.own.take().map(|l| OwnLease { id: 0, ..l });
        } else {
            self.renew_backoff.reset();
            self.ensure_rules();
        }
    }

    /// Renews the lease, or claims it again when it was lost.
    async fn renew_or_reclaim(&mut self) {
        if self.own.as_ref().is_some_and(|l| l.id == 0) { self.reclaim().await } else { self.renew().await }
    }

    /// A batch of lease events (drained so a burst is applied at once), then
    /// whatever the kernel needs for them ([`Agent::sync`]): nothing for events
    /// that changed nothing.
    async fn on_events(&mut self, first: LeaseEvent, events: &mut mpsc::Receiver<LeaseEvent>) {
        let mut lost = self.on_event(first);
        while let Ok(ev) = events.try_recv() {
            lost |= self.on_event(ev);
        }
        if lost {
            self.reclaim().await;
            self.pending.all = true;
        }
        self.sync().await;
    }

    /// The event loop; returns when `stop` fires, leaving kernel state and the lease in place.
    pub async fn run(
        mut self,
        mut events: mpsc::Receiver<LeaseEvent>,
        stop: impl std::future::Future<Output = Stop>,
    ) -> Result<(), AgentError> {
        let mut reconcile_tick = tokio::time::interval(Duration::from_secs(self.opts.reconcile_interval.max(1)));
        reconcile_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut rules_tick = tokio::time::interval(Duration::from_secs(self.opts.iptables_resync.max(1)));
        rules_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stop = std::pin::pin!(stop);
        loop {
            let renew_at = tokio::time::Instant::from_std(self.next_renew);
            let retry_at = self.retry_at.map(tokio::time::Instant::from_std);
            tokio::select! {
                Stop::Signal(name) = &mut stop => {
                    info!("{name}: exiting, leaving routes and lease in place");
                    self.backend.stop(&self.k).await;
                    return Ok(());
                }
                ev = events.recv() => {
                    let Some(ev) = ev else { return Err(AgentError::Config("lease watch stopped".into())) };
                    self.on_events(ev, &mut events).await;
                }
                _ = reconcile_tick.tick() => self.reconcile().await,
                _ = self.kernel.changed() => {
                    // Let a burst (an `ip route flush`, a device deleted with all its
                    // entries) arrive whole, then look once.
                    tokio::time::sleep(KERNEL_SETTLE).await;
                    self.reconcile().await;
                }
                _ = tokio::time::sleep_until(retry_at.unwrap_or_else(tokio::time::Instant::now)), if retry_at.is_some() => {
                    self.reconcile().await
                }
                _ = rules_tick.tick() => self.ensure_rules(),
                _ = tokio::time::sleep_until(renew_at) => self.renew_or_reclaim().await,
            }
        }
    }
}

/// SIGTERM or SIGINT, whichever comes first.
async fn signals() -> Result<impl std::future::Future<Output = Stop>, AgentError> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => Stop::Signal("SIGTERM"),
            _ = int.recv() => Stop::Signal("SIGINT"),
        }
    })
}

/// Starts an agent with `backend` and follows the manager's peer watch until a signal.
async fn run_with<M: SubnetManager, B: Backend>(
    opts: Opts,
    mgr: M,
    backend: B,
    cfg: &NetConfig,
    metrics: Arc<Metrics>,
) -> Result<(), AgentError> {
    let firewall = crate::firewall::choose(&opts, cfg).map_err(AgentError::Config)?;
    let kernel = Netlink::connect()?;
    let parts = Parts { mgr, kernel, backend, firewall };
    let agent = Agent::start(opts, parts, cfg, metrics.clone(), Path::new("/proc")).await?;
    let stop = signals().await?;
    let (tx, rx) = mpsc::channel(1024);
    let _watch = agent.mgr.spawn_watch(tx, metrics);
    agent.run(rx, stop).await
}

/// The whole agent with any subnet manager: read the config, pick the backend, run.
pub async fn run<M: SubnetManager>(opts: Opts, mut mgr: M, metrics: Arc<Metrics>) -> Result<(), AgentError> {
    let cfg = load_config(&mut mgr).await?;
    let run = RunWith { opts, mgr, cfg: &cfg, metrics };
    backend::with_backend(&cfg.backend, run).await.map_err(|e| AgentError::Config(e.to_string()))?
}

/// The agent's run, handed the backend net-conf.json names.
struct RunWith<'a, M> {
    opts: Opts,
    mgr: M,
    cfg: &'a NetConfig,
    metrics: Arc<Metrics>,
}

impl<M: SubnetManager> backend::WithBackend for RunWith<'_, M> {
    type Out = Result<(), AgentError>;
    async fn run<B: Backend>(self, b: B) -> Self::Out {
        run_with(self.opts, self.mgr, b, self.cfg, self.metrics).await
    }
}

/// The whole agent in Kubernetes mode.
pub async fn run_kube(opts: Opts, metrics: Arc<Metrics>) -> Result<(), AgentError> {
    let client = crate::subnet::kube::connect(&opts).await?;
    let node = crate::subnet::kube::node_name(&client).await?;
    info!("Kubernetes subnet manager for node {node}");
    let mgr = crate::subnet::kube::KubeManager::new(client, node, &opts)?;
    run(opts, mgr, metrics).await
}

/// The whole agent in etcd mode.
pub async fn run_etcd(opts: Opts, metrics: Arc<Metrics>) -> Result<(), AgentError> {
    let client = etcd::connect(&opts).await?;
    let mgr = EtcdManager::new(client, &opts.etcd_prefix, opts.subnet_lease_ttl);
    run(opts, mgr, metrics).await
}

#[cfg(test)]
mod tests;
