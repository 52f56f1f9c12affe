//! The agent: claim a subnet, publish it in subnet.env, keep the kernel in
//! step with the peers' leases, keep the iptables rules in place, renew the
//! lease. Everything runs on one thread; the lease watch feeds it events
//! through a channel.
//!
//! Restart and SIGTERM leave kernel state and the lease alone, so traffic
//! keeps flowing while the agent is away.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use flannel_shared::IpNet;
use flannel_shared::lease::{Lease, LeaseAttrs, VxlanData};
use flannel_shared::netconf::{BackendType, Family, NetConfig};
use flannel_shared::netlink::{Netlink, Route, format_mac, parse_mac};
use flannel_shared::subnet_env::SubnetEnv;

use crate::backend::{self, Uplink, VXLAN_OVERHEAD, VXLAN6_OVERHEAD, VtepSpec};
use crate::config::Opts;
use crate::iptables;
use crate::kernel_watch::{Interest, KernelWatch};
use crate::metrics::Metrics;
use crate::reconcile::{self, Mode, Peer, RTPROT_FLANNEL};
use crate::subnet::etcd::{self, EtcdManager};
use crate::subnet::{Claim, LeaseEvent, OwnLease, SubnetError, SubnetManager};

/// Metric of the `--ip-blackhole-route` route: above cni0's connected route,
/// so it only catches traffic while the bridge route is absent.
const BLACKHOLE_METRIC: u32 = 4096;

/// How long a burst of kernel notifications may take to arrive before the pass it wakes.
const KERNEL_SETTLE: Duration = Duration::from_millis(50);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Preflight(String),
    #[error("{0}")]
    Subnet(#[from] SubnetError),
    #[error("{0}")]
    Backend(#[from] backend::BackendError),
    #[error("netlink: {0}")]
    Io(#[from] std::io::Error),
}

/// `br_netfilter` makes bridged pod traffic traverse iptables; without it a
/// Service reply between two pods on one node skips kube-proxy's reverse NAT
/// and the connection silently hangs. `proc` is normally `/proc`.
pub fn check_br_netfilter(proc: &Path) -> Result<(), AgentError> {
    let p = proc.join("sys/net/bridge/bridge-nf-call-iptables");
    match std::fs::read_to_string(&p) {
        Ok(v) if v.trim() == "1" => Ok(()),
        Ok(_) => Err(AgentError::Preflight(format!(
            "{} is 0: Services between pods on one node would break; set net.bridge.bridge-nf-call-iptables=1",
            p.display()
        ))),
        Err(_) => Err(AgentError::Preflight(format!(
            "{} is missing: the br_netfilter module is not loaded (run `modprobe br_netfilter`); \
             without it Services between pods on one node silently break",
            p.display()
        ))),
    }
}

/// Sets a `0/1` sysctl under `proc` (normally `/proc`) to 1; returns whether it had to.
fn turn_on(proc: &Path, rel: &str) -> Result<bool, AgentError> {
    let p = proc.join(rel);
    let cur = std::fs::read_to_string(&p).map_err(|e| AgentError::Preflight(format!("{}: {e}", p.display())))?;
    if cur.trim() == "1" {
        return Ok(false);
    }
    std::fs::write(&p, "1").map_err(|e| {
        // A container's /proc/sys is read-only unless it is privileged; the node must do it.
        let key = rel.trim_start_matches("sys/").replace('/', ".");
        AgentError::Preflight(format!(
            "{key} is 0 and cannot be turned on here ({}: {e}); set it on the node \
             (sysctl -w {key}=1, and in /etc/sysctl.d to survive reboots)",
            p.display()
        ))
    })?;
    Ok(true)
}

/// Turns on IPv4 forwarding; returns whether it had to.
pub fn enable_ip_forward(proc: &Path) -> Result<bool, AgentError> {
    turn_on(proc, "sys/net/ipv4/ip_forward")
}

/// Turns on IPv6 forwarding (dual-stack); returns whether it had to.
pub fn enable_ipv6_forward(proc: &Path) -> Result<bool, AgentError> {
    turn_on(proc, "sys/net/ipv6/conf/all/forwarding")
}

fn unix_secs(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// Exponential backoff between `min` and `max`.
struct Backoff {
    cur: Duration,
    min: Duration,
    max: Duration,
}

impl Backoff {
    fn new(min: Duration, max: Duration) -> Backoff {
        Backoff { cur: min, min, max }
    }
    fn next(&mut self) -> Duration {
        let d = self.cur;
        self.cur = (self.cur * 2).min(self.max);
        d
    }
    fn reset(&mut self) {
        self.cur = self.min;
    }
}

pub struct Agent<M: SubnetManager> {
    opts: Opts,
    mgr: M,
    nl: Netlink,
    metrics: Arc<Metrics>,
    cfg: NetConfig,
    family: Family,
    /// Set when the network is dual-stack.
    family6: Option<Family>,
    uplink: Uplink,
    vtep: Option<VtepSpec>,
    vtep_index: Option<u32>,
    vtep6: Option<VtepSpec>,
    vtep6_index: Option<u32>,
    attrs: LeaseAttrs,
    own: Option<OwnLease>,
    peers: BTreeMap<IpNet, Lease>,
    last_skipped: Vec<(IpNet, String)>,
    renew_backoff: Backoff,
    next_renew: Instant,
    iptables: iptables::Flavour,
    /// Whether the manager has been told the data path is up.
    announced_up: bool,
    /// Whether rule sets turned off by the flags have been removed.
    rules_cleaned: bool,
    /// Wakes a reconcile pass when the kernel reports a change to what we own.
    kernel: KernelWatch,
    /// Set while the last pass failed: when to try again (sooner than the periodic pass).
    retry_at: Option<Instant>,
    retry_backoff: Backoff,
    /// Whether a full listing of the leases has arrived (readiness waits for it to be programmed).
    listed: bool,
}

/// Reads and validates the network config, retrying while the store is away.
async fn load_config<M: SubnetManager>(mgr: &mut M) -> Result<NetConfig, AgentError> {
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(10));
    let text = loop {
        match mgr.network_config().await {
            Ok(t) => break t,
            Err(e) if e.is_transient() => {
                let d = backoff.next();
                warn!("reading the network config: {e}; retrying in {d:?}");
                tokio::time::sleep(d).await;
            }
            Err(e) => return Err(e.into()),
        }
    };
    let cfg =
        NetConfig::parse(&text, |w| warn!("network config: {w}")).map_err(|e| AgentError::Config(e.to_string()))?;
    if cfg.ipv4.is_none() {
        return Err(AgentError::Config(
            "network config: EnableIPv4: IPv6-only networks are not supported; keep IPv4 on (dual-stack works)".into(),
        ));
    }
    Ok(cfg)
}

impl<M: SubnetManager> Agent<M> {
    /// Everything up to the first lease: config, uplink, VTEP, claim, subnet.env, rules.
    pub async fn start(opts: Opts, mut mgr: M, metrics: Arc<Metrics>) -> Result<Agent<M>, AgentError> {
        let cfg = load_config(&mut mgr).await?;
        let family = cfg.ipv4.clone().ok_or_else(|| AgentError::Config("network config: Network: missing".into()))?;
        let nl = Netlink::connect()?;
        // Subscribed before the first write, so nothing done to our state from here on goes unseen.
        let kernel = KernelWatch::start(metrics.clone());
        let uplink = backend::find_uplink(&nl, &opts).await?;
        info!(
            "uplink {} ({}), public IP {}, MTU {}, backend {}",
            uplink.name,
            uplink.ip,
            uplink.public_ip,
            uplink.mtu,
            cfg.backend.kind.as_str()
        );

        let family6 = cfg.ipv6.clone();
        if family6.is_some() {
            if uplink.public_ipv6.is_none() {
                return Err(AgentError::Config(format!(
                    "network config: EnableIPv6: {} has no global IPv6 address; give --public-ipv6 or another --iface",
                    uplink.name
                )));
            }
            if enable_ipv6_forward(Path::new("/proc"))? {
                info!("enabled net.ipv6.conf.all.forwarding (dual-stack pods are routed through this host)");
            }
            info!(
                "dual-stack: IPv6 network {}, public IPv6 {:?}",
                cfg.ipv6.as_ref().map(|f| f.network).unwrap_or(family.network),
                uplink.public_ipv6
            );
        }

        let (mut vtep, mut vtep_index, mut backend_data) = (None, None, serde_json::Value::Null);
        let (mut vtep6, mut vtep6_index, mut backend_v6_data) = (None, None, None);
        match cfg.backend.kind {
            BackendType::Vxlan => {
                let mut specs = vec![(
                    false,
                    VtepSpec {
                        name: format!("flannel.{}", cfg.backend.vni),
                        local: IpAddr::V4(uplink.ip),
                        vni: cfg.backend.vni,
                        port: cfg.backend.port,
                        gbp: cfg.backend.gbp,
                        mtu: cfg.backend.mtu.unwrap_or(uplink.mtu.saturating_sub(VXLAN_OVERHEAD)),
                    },
                )];
                if let (Some(_), Some(ip6)) = (&family6, uplink.ip6) {
                    specs.push((
                        true,
                        VtepSpec {
                            name: format!("flannel-v6.{}", cfg.backend.vni),
                            local: IpAddr::V6(ip6),
                            vni: cfg.backend.vni,
                            port: cfg.backend.port,
                            gbp: cfg.backend.gbp,
                            mtu: cfg.backend.mtu.unwrap_or(uplink.mtu.saturating_sub(VXLAN6_OVERHEAD)),
                        },
                    ));
                } else if family6.is_some() {
                    return Err(AgentError::Config(format!(
                        "network config: EnableIPv6: the IPv6 VXLAN device needs an IPv6 address on {}",
                        uplink.name
                    )));
                }
                for (v6, spec) in specs {
                    // A device that is gone (node rebuilt) comes back with the MAC peers already know.
                    let mac = if nl.link_by_name(&spec.name).await.map_err(backend::BackendError::from)?.is_none() {
                        mgr.previous_vtep_mac(uplink.public_ip, v6).await.and_then(|m| parse_mac(&m))
                    } else {
                        None
                    };
                    if let Some(m) = mac {
                        info!("recreating {} with its previous VtepMAC {}", spec.name, format_mac(&m));
                    }
                    let (link, _) = backend::ensure_vtep(&nl, &spec, &uplink, mac, None).await?;
                    let mac =
                        link.mac.ok_or_else(|| AgentError::Config(format!("{} has no MAC address", spec.name)))?;
                    let data = serde_json::to_value(VxlanData { vni: spec.vni, vtep_mac: format_mac(&mac) })
                        .map_err(|e| AgentError::Config(e.to_string()))?;
                    if v6 {
                        (vtep6, vtep6_index, backend_v6_data) = (Some(spec), Some(link.index), Some(data));
                    } else {
                        (vtep, vtep_index, backend_data) = (Some(spec), Some(link.index), data);
                    }
                }
            }
            BackendType::HostGw => {
                // Switched from vxlan: the old VTEPs and every route/ARP/FDB entry on them go.
                for name in [format!("flannel.{}", cfg.backend.vni), format!("flannel-v6.{}", cfg.backend.vni)] {
                    if let Some(l) = nl.link_by_name(&name).await.map_err(backend::BackendError::from)?
                        && l.vxlan.is_some()
                    {
                        nl.del_link(l.index).await.map_err(backend::BackendError::from)?;
                        info!("backend is host-gw: removed the VXLAN device {name} left from an earlier vxlan run");
                    }
                }
            }
        }
        let attrs = LeaseAttrs {
            public_ip: uplink.public_ip,
            public_ipv6: family6.as_ref().and(uplink.public_ipv6),
            backend_type: cfg.backend.kind.as_str().to_string(),
            backend_data,
            backend_v6_data: if family6.is_some() && cfg.backend.kind == BackendType::HostGw {
                Some(serde_json::Value::Null)
            } else {
                backend_v6_data
            },
        };

        let mut agent = Agent {
            opts,
            mgr,
            nl,
            metrics,
            cfg,
            family,
            family6,
            uplink,
            vtep,
            vtep_index,
            vtep6,
            vtep6_index,
            attrs,
            own: None,
            peers: BTreeMap::new(),
            last_skipped: Vec::new(),
            renew_backoff: Backoff::new(Duration::from_secs(1), Duration::from_secs(60)),
            next_renew: Instant::now(),
            iptables: iptables::Flavour::default(),
            announced_up: false,
            rules_cleaned: false,
            kernel,
            retry_at: None,
            retry_backoff: Backoff::new(Duration::from_secs(1), Duration::from_secs(30)),
            listed: false,
        };
        agent.update_interest();
        {
            let (flavour, why) = iptables::Flavour::detect();
            info!("iptables: writing with {} ({why})", flavour.restore);
            agent.iptables = flavour;
        }
        // Our previous subnets, if subnet.env still names them in this network.
        let env = SubnetEnv::read(&agent.opts.subnet_file).ok();
        let prefer = env
            .as_ref()
            .filter(|e| e.network == Some(agent.family.network))
            .and_then(|e| e.subnet)
            .map(|s| s.network());
        let prefer6 = env
            .as_ref()
            .filter(|e| e.ipv6_network.is_some() && e.ipv6_network == agent.family6.as_ref().map(|f| f.network))
            .and_then(|e| e.ipv6_subnet)
            .map(|s| s.network());
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        while agent.own.is_none() {
            if let Err(e) = agent.acquire(prefer, prefer6).await {
                if !e.is_transient() {
                    return Err(e.into());
                }
                let d = backoff.next();
                error!("claiming a subnet: {e}; retrying in {d:?}");
                tokio::time::sleep(d).await;
            }
        }
        agent.ensure_rules();
        Ok(agent)
    }

    pub fn own_subnet(&self) -> Option<IpNet> {
        self.own.as_ref().map(|l| l.subnet)
    }

    /// The pods' MTU: what fits through every tunnel in use (the IPv6 VTEP has 20 bytes more overhead).
    fn mtu(&self) -> u32 {
        let v4 = self.vtep.as_ref().map_or(self.uplink.mtu, |v| v.mtu);
        self.vtep6.as_ref().map_or(v4, |v| v4.min(v.mtu))
    }

    /// Claims (or re-claims) a subnet, then points the VTEP and subnet.env at it.
    async fn acquire(&mut self, prefer: Option<IpNet>, prefer6: Option<IpNet>) -> Result<(), SubnetError> {
        let claim = Claim { family: &self.family, family6: self.family6.as_ref(), attrs: &self.attrs, prefer, prefer6 };
        let lease = self.mgr.acquire(&claim).await?;
        let subnet = lease.subnet;
        // The manager may have overridden the public IP (Kubernetes annotations).
        self.attrs = lease.attrs.clone();
        self.metrics.lease_held.store(true, Ordering::Relaxed);
        self.metrics.lease_expiry.store(unix_secs(lease.expiration), Ordering::Relaxed);
        self.schedule_renew(&lease);
        if let Some(old) = self.own.replace(lease)
            && old.subnet != subnet
        {
            warn!("our subnet changed from {} to {subnet}; pods started earlier keep old addresses", old.subnet);
        }
        self.peers.remove(&subnet);
        if let Err(e) = self.ensure_vtep().await {
            warn!("configuring the VXLAN device: {e}");
        }
        self.write_subnet_env();
        Ok(())
    }

    fn schedule_renew(&mut self, lease: &OwnLease) {
        let left = lease.expiration.duration_since(SystemTime::now()).unwrap_or_default();
        let margin = Duration::from_secs(self.opts.subnet_lease_renew_margin * 60);
        // A margin longer than the lease itself would renew in a tight loop: renew at half-life then.
        let wait = if margin < left { left - margin } else { left / 2 };
        self.next_renew = Instant::now() + wait;
        debug!("lease on {} renews in {wait:?}", lease.subnet);
    }

    fn write_subnet_env(&self) {
        let Some(own) = &self.own else { return };
        let gw = |s: &IpNet| s.nth(1).and_then(|ip| IpNet::new(ip, s.prefix()).ok());
        let env = SubnetEnv {
            network: Some(self.family.network),
            subnet: gw(&own.subnet),
            ipv6_network: self.family6.as_ref().map(|f| f.network),
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
                info!("wrote {} (subnet {}, MTU {})", path.display(), own.subnet, self.mtu());
            }
            Err(e) => {
                self.metrics.subnet_env_written.store(false, Ordering::Relaxed);
                error!("writing {}: {e}", path.display());
            }
        }
    }

    /// (Re)creates the VTEPs if missing or wrong, with our advertised MACs, and
    /// gives them `<subnet>.0/32` (and `<IPv6 subnet>::/128`).
    async fn ensure_vtep(&mut self) -> Result<(), backend::BackendError> {
        for v6 in [false, true] {
            let spec = if v6 { &self.vtep6 } else { &self.vtep };
            let Some(spec) = spec else { continue };
            let subnet = self.own.as_ref().and_then(|l| if v6 { l.subnet6 } else { Some(l.subnet) });
            let addr = subnet.and_then(|s| IpNet::new(s.network_addr(), if v6 { 128 } else { 32 }).ok());
            let data = if v6 { self.attrs.backend_v6_data.as_ref() } else { Some(&self.attrs.backend_data) };
            let mac = data.and_then(|d| d.get("VtepMAC")).and_then(|v| v.as_str()).and_then(parse_mac);
            let (link, created) = backend::ensure_vtep(&self.nl, spec, &self.uplink, mac, addr).await?;
            if created {
                self.metrics.vtep_recreations.fetch_add(1, Ordering::Relaxed);
                warn!("{} was missing or wrong and has been rebuilt; replaying every peer into it", spec.name);
            }
            if v6 {
                self.vtep6_index = Some(link.index);
            } else {
                self.vtep_index = Some(link.index);
            }
        }
        self.update_interest();
        Ok(())
    }

    /// Tells the kernel watch what we own now (VTEP indices change when a device is rebuilt).
    fn update_interest(&self) {
        let names = [&self.vtep, &self.vtep6].into_iter().flatten().map(|v| v.name.clone()).collect();
        let links = [self.vtep_index, self.vtep6_index].into_iter().flatten().collect();
        let nets = std::iter::once(self.family.network).chain(self.family6.as_ref().map(|f| f.network)).collect();
        self.kernel.set_interest(Interest { names, links, nets });
    }

    fn ensure_rules(&mut self) {
        let Some(own) = &self.own else { return };
        let mut tables = Vec::new();
        let mut off = Vec::new();
        let v6 = self.family6.as_ref().zip(own.subnet6).map(|(f, s)| (f.network, s));
        for (network, subnet, flavour) in std::iter::once((self.family.network, own.subnet, self.iptables.clone()))
            .chain(v6.map(|(n, s)| (n, s, self.iptables.v6())))
        {
            let masq = iptables::masq_rules(&network, &subnet, !self.opts.ip_masq_fully_random_disable);
            if self.opts.ip_masq {
                tables.push((masq, flavour.clone()))
            } else {
                off.push((masq, flavour.clone()))
            }
            let fwd = iptables::forward_rules(&network);
            if self.opts.iptables_forward_rules { tables.push((fwd, flavour)) } else { off.push((fwd, flavour)) }
        }
        let mut ok = true;
        // Rules a previous run wrote but this one is told not to: removed once, at start.
        if !self.rules_cleaned {
            for (t, flavour) in &off {
                match iptables::remove_with(flavour, t) {
                    Ok(true) => info!("iptables: removed {} (turned off by the flags)", t.chain),
                    Ok(false) => {}
                    Err(e) => {
                        ok = false;
                        error!("iptables: removing {}: {e}", t.chain);
                    }
                }
            }
            self.rules_cleaned = ok;
        }
        for (t, flavour) in &tables {
            match iptables::ensure_with(flavour, t) {
                Ok(true) => {
                    self.metrics.iptables_restores.fetch_add(1, Ordering::Relaxed);
                    info!("iptables: wrote {} in table {}", t.chain, t.table);
                }
                Ok(false) => {}
                Err(e) => {
                    ok = false;
                    self.metrics.iptables_errors.fetch_add(1, Ordering::Relaxed);
                    error!("iptables: {e}");
                }
            }
        }
        self.metrics.rules_in_place.store(ok, Ordering::Relaxed);
    }

    /// Applies one lease event; returns whether our own lease needs claiming again.
    fn on_event(&mut self, ev: LeaseEvent) -> bool {
        let own = self.own.as_ref().map(|l| (l.subnet, l.attrs.clone()));
        let is_ours = |l: &Lease| own.as_ref().is_some_and(|(s, a)| *s == l.subnet && *a == l.attrs);
        match ev {
            LeaseEvent::Snapshot(all) => {
                let lost = own.as_ref().is_some_and(|(s, _)| !all.iter().any(|l| l.subnet == *s && is_ours(l)));
                self.peers = all
                    .into_iter()
                    .filter(|l| Some(l.subnet) != own.as_ref().map(|o| o.0))
                    .map(|l| (l.subnet, l))
                    .collect();
                debug!("lease snapshot: {} peers", self.peers.len());
                self.listed = true;
                lost
            }
            LeaseEvent::Added(l) => {
                if own.as_ref().is_some_and(|(s, _)| *s == l.subnet) {
                    if is_ours(&l) {
                        return false;
                    }
                    warn!("our subnet {} was taken over by {}", l.subnet, l.attrs.public_ip);
                    debug!("theirs: {:?}; ours: {:?}", l.attrs, own.as_ref().map(|o| &o.1));
                    return true;
                }
                info!("peer lease {} -> {} ({})", l.subnet, l.attrs.public_ip, l.attrs.backend_type);
                self.peers.insert(l.subnet, l);
                false
            }
            LeaseEvent::Removed(s) => {
                if own.as_ref().is_some_and(|(o, _)| *o == s) {
                    warn!("our lease on {s} disappeared from the store");
                    return true;
                }
                if self.peers.remove(&s).is_some() {
                    info!("peer lease {s} removed");
                }
                false
            }
        }
    }

    fn mode(&self, v6: bool) -> Option<Mode> {
        let nets = if v6 { &self.uplink.nets6 } else { &self.uplink.nets };
        match self.cfg.backend.kind {
            BackendType::Vxlan => Some(Mode::Vxlan {
                vtep: if v6 { self.vtep6_index? } else { self.vtep_index? },
                uplink: self.uplink.index,
                direct_on: if self.cfg.backend.direct_routing { nets.first().copied() } else { None },
            }),
            BackendType::HostGw => Some(Mode::HostGw { uplink: self.uplink.index }),
        }
    }

    /// What one family's peers call for, and the peers that cannot be programmed.
    fn family_want(&self, mode: &Mode, v6: bool) -> (reconcile::Desired, Vec<(IpNet, String)>) {
        let want_type = self.cfg.backend.kind.as_str();
        let nets = if v6 { &self.uplink.nets6 } else { &self.uplink.nets };
        let mut skipped = Vec::new();
        let mut peers = Vec::with_capacity(self.peers.len());
        for l in self.peers.values() {
            if l.attrs.backend_type != want_type {
                if !v6 {
                    skipped.push((l.subnet, format!("backend {} (this node runs {want_type})", l.attrs.backend_type)));
                }
                continue;
            }
            let (subnet, public_ip, data) = if v6 {
                match (l.subnet6, l.attrs.public_ipv6) {
                    (Some(s), Some(ip)) => (s, IpAddr::V6(ip), l.vxlan_v6_data()),
                    _ => {
                        skipped.push((l.subnet, "no IPv6 half in its lease (an IPv4-only node)".to_string()));
                        continue;
                    }
                }
            } else {
                (l.subnet, IpAddr::V4(l.attrs.public_ip), l.vxlan_data())
            };
            if matches!(mode, Mode::HostGw { .. }) && !nets.iter().any(|n| n.contains(public_ip)) {
                skipped.push((
                    subnet,
                    format!(
                        "{public_ip} is not on-link via {} ({nets:?}): host-gw needs every node on one L2 network",
                        self.uplink.name
                    ),
                ));
                continue;
            }
            let vtep_mac = data.and_then(|d| parse_mac(&d.vtep_mac));
            peers.push(Peer { subnet, public_ip, vtep_mac });
        }
        let mut want = reconcile::desired(mode, &peers);
        skipped.append(&mut want.skipped);
        (want, skipped)
    }

    /// One full pass: VTEP present, then routes/ARP/FDB from the peers.
    pub async fn reconcile(&mut self) {
        let started = Instant::now();
        // Changes signalled so far are covered by this pass: it reads the kernel afresh.
        self.kernel.clear();
        let m = self.metrics.clone();
        m.reconcile_runs.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.ensure_vtep().await {
            m.reconcile_errors.fetch_add(1, Ordering::Relaxed);
            let d = self.retry_backoff.next();
            error!("reconcile: VXLAN device: {e}; retrying in {d:?}");
            self.retry_at = Some(Instant::now() + d);
            return;
        }
        let mut skipped = Vec::new();
        let (mut routes, mut neighbours, mut fdb) = (0, 0, 0);
        let mut ok = true;
        for v6 in [false, true] {
            if v6 && self.family6.is_none() {
                continue;
            }
            let Some(mode) = self.mode(v6) else { continue };
            let (mut want, mut skip) = self.family_want(&mode, v6);
            skipped.append(&mut skip);
            if self.opts.ip_blackhole_route
                && let Some(own) = self.own.as_ref().and_then(|l| if v6 { l.subnet6 } else { Some(l.subnet) })
            {
                want.routes.push(Route::new(own).blackhole().metric(BLACKHOLE_METRIC).protocol(RTPROT_FLANNEL));
            }
            routes += want.routes.len();
            neighbours += want.neighbours.len();
            fdb += want.fdb.len();
            let vtep = match mode {
                Mode::Vxlan { vtep, .. } => Some(vtep),
                Mode::HostGw { .. } => None,
            };
            match reconcile::apply_family(&self.nl, &want, vtep, !v6).await {
                Ok(done) => {
                    let changes = done.routes_added
                        + done.routes_removed
                        + done.neighbours_set
                        + done.neighbours_removed
                        + done.fdb_set
                        + done.fdb_removed;
                    m.reconcile_changes.fetch_add(changes as u64, Ordering::Relaxed);
                    if !done.is_noop() {
                        info!(
                            "reconcile{}: routes +{} -{}, neighbours +{} -{}, fdb +{} -{}",
                            if v6 { " (IPv6)" } else { "" },
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
                    m.reconcile_errors.fetch_add(1, Ordering::Relaxed);
                    error!("reconcile{}: {e}", if v6 { " (IPv6)" } else { "" });
                }
            }
        }
        // Ready follows the data path; a failing NetworkUnavailable patch is retried
        // (and logged) but does not hold readiness, so it cannot stall a rollout.
        if ok && self.listed && !m.peers_synced.swap(true, Ordering::Relaxed) {
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
            let d = self.retry_backoff.next();
            debug!("reconcile pass incomplete; next pass in {d:?}");
            self.retry_at = Some(Instant::now() + d);
        }
        if skipped != self.last_skipped {
            for (s, why) in &skipped {
                warn!("peer {s} not programmed: {why}");
            }
            self.last_skipped = skipped;
        }
        m.peers.store(self.peers.len() as u64, Ordering::Relaxed);
        m.routes.store(routes as u64, Ordering::Relaxed);
        m.neighbours.store(neighbours as u64, Ordering::Relaxed);
        m.fdb_entries.store(fdb as u64, Ordering::Relaxed);
        m.skipped_peers.store(self.last_skipped.len() as u64, Ordering::Relaxed);
        let us = started.elapsed().as_micros() as u64;
        m.reconcile_last_us.store(us, Ordering::Relaxed);
        m.reconcile_total_us.fetch_add(us, Ordering::Relaxed);
    }

    async fn renew(&mut self) {
        let Some(own) = self.own.clone() else { return };
        match self.mgr.renew(&own).await {
            Ok(l) => {
                self.renew_backoff.reset();
                self.metrics.lease_expiry.store(unix_secs(l.expiration), Ordering::Relaxed);
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
                let d = self.renew_backoff.next();
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
            let d = self.renew_backoff.next();
            error!("claiming a subnet again: {e}; retrying in {d:?}");
            self.next_renew = Instant::now() + d;
            // Marks the lease as needing a claim rather than a renewal.
            self.own = self.own.take().map(|l| OwnLease { id: 0, ..l });
        } else {
            self.renew_backoff.reset();
            self.ensure_rules();
        }
    }

    /// The event loop; returns on SIGTERM or SIGINT, leaving kernel state and the lease in place.
    pub async fn run(mut self, mut events: mpsc::Receiver<LeaseEvent>) -> Result<(), AgentError> {
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut reconcile_tick = tokio::time::interval(Duration::from_secs(self.opts.reconcile_interval.max(1)));
        reconcile_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut rules_tick = tokio::time::interval(Duration::from_secs(self.opts.iptables_resync.max(1)));
        rules_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let renew_at = tokio::time::Instant::from_std(self.next_renew);
            let retry_at = self.retry_at.map(tokio::time::Instant::from_std);
            tokio::select! {
                _ = term.recv() => { info!("SIGTERM: exiting, leaving routes and lease in place"); return Ok(()) }
                _ = int.recv() => { info!("SIGINT: exiting, leaving routes and lease in place"); return Ok(()) }
                ev = events.recv() => {
                    let Some(ev) = ev else { return Err(AgentError::Config("lease watch stopped".into())) };
                    let mut lost = self.on_event(ev);
                    // Drain what queued up so a burst costs one reconcile pass.
                    while let Ok(ev) = events.try_recv() {
                        lost |= self.on_event(ev);
                    }
                    if lost {
                        self.reclaim().await;
                    }
                    self.reconcile().await;
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
                _ = tokio::time::sleep_until(renew_at) => {
                    if self.own.as_ref().is_some_and(|l| l.id == 0) { self.reclaim().await } else { self.renew().await }
                }
            }
        }
    }
}

/// The whole agent with any subnet manager: claim, then follow its peer watch.
pub async fn run<M: SubnetManager>(opts: Opts, mgr: M, metrics: Arc<Metrics>) -> Result<(), AgentError> {
    let (tx, rx) = mpsc::channel(1024);
    let agent = Agent::start(opts, mgr, metrics.clone()).await?;
    let _watch = agent.mgr.spawn_watch(tx, metrics);
    agent.run(rx).await
}

/// The whole agent in Kubernetes mode.
pub async fn run_kube(opts: Opts, metrics: Arc<Metrics>) -> Result<(), AgentError> {
    let client = crate::subnet::kube::connect(&opts).await?;
    let node = crate::subnet::kube::node_name(&client).await?;
    info!("Kubernetes subnet manager for node {node}");
    let mgr = crate::subnet::kube::KubeManager::new(client, node, &opts);
    run(opts, mgr, metrics).await
}

/// The whole agent in etcd mode.
pub async fn run_etcd(opts: Opts, metrics: Arc<Metrics>) -> Result<(), AgentError> {
    let client = etcd::connect(&opts).await?;
    let mgr = EtcdManager::new(client, &opts.etcd_prefix, opts.subnet_lease_ttl);
    run(opts, mgr, metrics).await
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(5));
        let seq: Vec<u64> = (0..5).map(|_| b.next().as_secs()).collect();
        assert_eq!(seq, [1, 2, 4, 5, 5]);
        b.reset();
        assert_eq!(b.next().as_secs(), 1);
    }
}
