//! Leases in etcd v3, in upstream's layout: `<prefix>/config` holds
//! net-conf.json, `<prefix>/subnets/10.244.1.0-24` holds the lease JSON,
//! bound to an etcd lease so a node that disappears frees its subnet.
//! Claims are create-if-absent transactions, never read-then-write.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity, KeyValue, PutOptions,
    TlsOptions, Txn, TxnOp, WatchOptions,
};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use flannel_shared::IpNet;
use flannel_shared::lease::{
    Lease, LeaseAttrs, choose_subnet, lease_key, no_ipv4, parse_subnet_key_pair, subnet_key_pair,
};

use super::{Claim, LeaseEvent, OwnLease, SubnetError, SubnetManager};
use crate::config::Opts;
use crate::metrics::Metrics;

/// Bound on every unary etcd call, so an unreachable etcd never wedges the agent.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

fn store_err(e: impl std::fmt::Display) -> SubnetError {
    SubnetError::Store(e.to_string())
}

async fn timed<T>(what: &str, f: impl Future<Output = Result<T, etcd_client::Error>>) -> Result<T, SubnetError> {
    match tokio::time::timeout(CALL_TIMEOUT, f).await {
        Ok(r) => r.map_err(|e| SubnetError::Store(format!("{what}: {e}"))),
        Err(_) => Err(SubnetError::Store(format!("{what}: no answer from etcd within {CALL_TIMEOUT:?}"))),
    }
}

/// Connection settings taken from the flags.
pub async fn connect(opts: &Opts) -> Result<Client, SubnetError> {
    let mut co = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(3))
        .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3))
        .with_keep_alive_while_idle(true);
    // As with Go's flags, an empty value means "not set".
    let text = |s: &Option<String>| s.clone().filter(|s| !s.is_empty());
    let path = |p: &Option<String>| text(p).map(std::path::PathBuf::from);
    if let (Some(u), Some(p)) = (text(&opts.etcd_username), text(&opts.etcd_password)) {
        co = co.with_user(u, p);
    }
    let (ca, cert, key) = (path(&opts.etcd_cafile), path(&opts.etcd_certfile), path(&opts.etcd_keyfile));
    if ca.is_some() || cert.is_some() {
        let read = |p: &std::path::Path| std::fs::read(p).map_err(|e| store_err(format!("{}: {e}", p.display())));
        let mut tls = TlsOptions::new();
        if let Some(ca) = &ca {
            tls = tls.ca_certificate(Certificate::from_pem(read(ca)?));
        }
        match (&cert, &key) {
            (Some(c), Some(k)) => tls = tls.identity(Identity::from_pem(read(c)?, read(k)?)),
            (None, None) => {}
            _ => return Err(store_err("--etcd-certfile and --etcd-keyfile must be given together")),
        }
        co = co.with_tls(tls);
    }
    Client::connect(&opts.etcd_endpoints, Some(co)).await.map_err(store_err)
}

pub struct EtcdManager {
    client: Client,
    prefix: String,
    ttl: i64,
}

fn decode(kv: &KeyValue) -> Result<Lease, SubnetError> {
    let key = String::from_utf8_lossy(kv.key()).into_owned();
    let (subnet, subnet6) = parse_subnet_key_pair(&key)
        .ok_or_else(|| SubnetError::BadLease { key: key.clone(), msg: "not <ip>-<len>[&<ip6>-<len>]".into() })?;
    let attrs: LeaseAttrs =
        serde_json::from_slice(kv.value()).map_err(|e| SubnetError::BadLease { key, msg: e.to_string() })?;
    Ok(Lease { subnet, subnet6, attrs })
}

/// Every well-formed lease under `subnets/`, and the store revision they were read at.
async fn list(client: &mut Client, subnets_prefix: &str) -> Result<(Vec<(Lease, KeyValue)>, i64), SubnetError> {
    let resp = timed("list leases", client.get(subnets_prefix, Some(GetOptions::new().with_prefix()))).await?;
    let rev = resp.header().map_or(0, |h| h.revision());
    let mut out = Vec::new();
    for kv in resp.kvs() {
        match decode(kv) {
            Ok(l) => out.push((l, kv.clone())),
            Err(e) => warn!("skipping {e}"),
        }
    }
    Ok((out, rev))
}

impl EtcdManager {
    pub fn new(client: Client, prefix: &str, ttl: i64) -> EtcdManager {
        EtcdManager { client, prefix: prefix.trim_end_matches('/').to_string(), ttl }
    }

    fn subnets_prefix(&self) -> String {
        format!("{}/subnets/", self.prefix)
    }

    fn key(&self, subnet: &IpNet, subnet6: Option<&IpNet>) -> String {
        format!("{}{}", self.subnets_prefix(), subnet_key_pair(subnet, subnet6))
    }

    /// Puts our lease under the key for (`subnet`, `subnet6`) if every condition
    /// holds, deleting `replaces` (our previous key in another form) in the same transaction.
    async fn try_claim(
        &mut self,
        (subnet, subnet6): (IpNet, Option<IpNet>),
        attrs: &LeaseAttrs,
        conds: Vec<Compare>,
        replaces: Option<Vec<u8>>,
    ) -> Result<Option<OwnLease>, SubnetError> {
        let value = serde_json::to_string(attrs).map_err(store_err)?;
        let grant = timed("grant lease", self.client.lease_grant(self.ttl, None)).await?;
        let id = grant.id();
        let mut ops = Vec::new();
        if let Some(old) = replaces {
            ops.push(TxnOp::delete(old, None));
        }
        ops.push(TxnOp::put(self.key(&subnet, subnet6.as_ref()), value, Some(PutOptions::new().with_lease(id))));
        let resp = timed("claim subnet", self.client.txn(Txn::new().when(conds).and_then(ops))).await?;
        if !resp.succeeded() {
            // Lost the race; the fresh etcd lease holds nothing, let it go.
            let _ = timed("revoke lease", self.client.lease_revoke(id)).await;
            return Ok(None);
        }
        let expiration = SystemTime::now() + Duration::from_secs(grant.ttl().max(0) as u64);
        Ok(Some(OwnLease { subnet, subnet6, attrs: attrs.clone(), expiration, id }))
    }
}

/// One list + watch cycle. Returns Ok only when the receiver is gone.
async fn watch_once(
    client: &mut Client,
    prefix: &str,
    tx: &mpsc::Sender<LeaseEvent>,
    listed: &mut bool,
) -> Result<(), SubnetError> {
    let (leases, rev) = list(client, prefix).await?;
    if tx.send(LeaseEvent::Snapshot(leases.into_iter().map(|(l, _)| l).collect())).await.is_err() {
        return Ok(());
    }
    *listed = true;
    let opts = WatchOptions::new().with_prefix().with_start_revision(rev + 1);
    let mut stream = timed("watch leases", client.watch(prefix, Some(opts))).await?;
    debug!("watching {prefix} from revision {}", rev + 1);
    loop {
        let Some(resp) = stream.message().await.map_err(store_err)? else {
            return Err(store_err("watch stream ended"));
        };
        if resp.canceled() {
            return Err(store_err(format!("watch canceled: {}", resp.cancel_reason())));
        }
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            let event = match ev.event_type() {
                EventType::Put => match decode(kv) {
                    Ok(l) => LeaseEvent::Added(l),
                    Err(e) => {
                        warn!("ignoring {e}");
                        continue;
                    }
                },
                EventType::Delete => match parse_subnet_key_pair(&String::from_utf8_lossy(kv.key())) {
                    Some((s, s6)) => LeaseEvent::Removed(lease_key(s, s6)),
                    None => continue,
                },
            };
            if tx.send(event).await.is_err() {
                return Ok(());
            }
        }
    }
}

impl SubnetManager for EtcdManager {
    /// Starts the task that lists, then watches, the subnets prefix and sends
    /// what it sees to `tx`; a broken watch is re-listed (a `Snapshot`) after a backoff.
    fn spawn_watch(&self, tx: mpsc::Sender<LeaseEvent>, metrics: Arc<Metrics>) -> tokio::task::JoinHandle<()> {
        let mut client = self.client.clone();
        let prefix = self.subnets_prefix();
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(200);
            loop {
                let mut listed = false;
                match watch_once(&mut client, &prefix, &tx, &mut listed).await {
                    Ok(()) => return, // the agent hung up
                    Err(e) => {
                        if listed {
                            // The store was there for this cycle: start the backoff over.
                            backoff = Duration::from_millis(200);
                        }
                        metrics.watch_restarts.inc();
                        warn!("watching {prefix}: {e}; re-listing in {backoff:?}");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            }
        })
    }

    async fn network_config(&mut self) -> Result<String, SubnetError> {
        let key = format!("{}/config", self.prefix);
        let resp = timed("read network config", self.client.get(key.as_str(), None)).await?;
        match resp.kvs().first() {
            Some(kv) => Ok(String::from_utf8_lossy(kv.value()).into_owned()),
            None => Err(SubnetError::NoConfig(key)),
        }
    }

    async fn acquire(&mut self, c: &Claim<'_>) -> Result<OwnLease, SubnetError> {
        let attrs = c.attrs;
        let prefix = self.subnets_prefix();
        for attempt in 0..16u64 {
            let (leases, _) = list(&mut self.client, &prefix).await?;
            // By what each lease is known by: its IPv4 subnet, its IPv6 one when IPv6-only.
            let by_key: HashMap<IpNet, &(Lease, KeyValue)> = leases.iter().map(|e| (e.0.key(), e)).collect();
            let taken6: HashSet<IpNet> = leases.iter().filter_map(|(l, _)| l.subnet6).collect();
            let v6_seed = attrs.public_ipv6.map_or(0, |ip| u128::from(ip) as u64);
            let seed =
                u64::from(u32::from(attrs.public_ip)) ^ v6_seed ^ (u64::from(std::process::id()) << 32) ^ attempt;

            // Ours already (a restart): the subnet from subnet.env, else any lease with our public IP.
            let (previous, s4) = match c.family {
                Some(family) => {
                    let mine = |s: &IpNet| by_key.get(s).is_some_and(|(l, _)| l.attrs.public_ip == attrs.public_ip);
                    let previous = c
                        .prefer
                        .filter(|p| family.allows(p) && (mine(p) || !by_key.contains_key(p)))
                        .or_else(|| leases.iter().map(|(l, _)| l.subnet).find(|s| mine(s) && family.allows(s)));
                    let s4 = match previous {
                        Some(p) => p,
                        None => {
                            let taken: HashSet<IpNet> = leases.iter().map(|(l, _)| l.subnet).collect();
                            choose_subnet(family, &taken, None, seed).ok_or_else(|| SubnetError::Exhausted {
                                network: family.network,
                                min: family.subnet_min,
                                max: family.subnet_max,
                                taken: taken.iter().filter(|s| family.allows(s)).count(),
                            })?
                        }
                    };
                    (previous, s4)
                }
                // IPv6-only: the lease is known by its IPv6 subnet; ours is the one with our public IPv6.
                None => {
                    let f6 = c.family6.ok_or_else(|| store_err("a claim needs IPv4 or IPv6"))?;
                    let mine = |s: &IpNet| {
                        by_key.get(s).is_some_and(|(l, _)| !l.has_ipv4() && l.attrs.public_ipv6 == attrs.public_ipv6)
                    };
                    let previous = c
                        .prefer6
                        .filter(|p| f6.allows(p) && (mine(p) || !taken6.contains(p)))
                        .or_else(|| leases.iter().filter_map(|(l, _)| l.subnet6).find(|s| mine(s) && f6.allows(s)));
                    (previous, no_ipv4())
                }
            };
            let old = previous.and_then(|p| by_key.get(&p).copied());
            let s6 = match c.family6 {
                None => None,
                Some(f6) => {
                    let old6 = old.and_then(|(l, _)| l.subnet6).or(previous.filter(|_| c.family.is_none()));
                    let usable = |s: &IpNet| f6.allows(s) && (!taken6.contains(s) || Some(*s) == old6);
                    let pick = c.prefer6.filter(usable).or(old6.filter(usable));
                    Some(pick.or_else(|| choose_subnet(f6, &taken6, None, seed)).ok_or_else(|| {
                        SubnetError::Exhausted {
                            network: f6.network,
                            min: f6.subnet_min,
                            max: f6.subnet_max,
                            taken: taken6.iter().filter(|s| f6.allows(s)).count(),
                        }
                    })?)
                }
            };
            let key = self.key(&s4, s6.as_ref());
            let mut conds = Vec::new();
            let mut replaces = None;
            match old {
                Some((_, kv)) => {
                    conds.push(Compare::mod_revision(kv.key(), CompareOp::Equal, kv.mod_revision()));
                    if kv.key() != key.as_bytes() {
                        conds.push(Compare::create_revision(key.as_str(), CompareOp::Equal, 0));
                        replaces = Some(kv.key().to_vec());
                    }
                }
                None => conds.push(Compare::create_revision(key.as_str(), CompareOp::Equal, 0)),
            }
            if let Some(l) = self.try_claim((s4, s6), attrs, conds, replaces).await? {
                if let Some((_, kv)) = old
                    && kv.lease() != 0
                {
                    let _ = timed("revoke old lease", self.client.lease_revoke(kv.lease())).await;
                }
                if previous.is_some() {
                    info!("reusing subnet {} (previous lease of this node)", l.key());
                } else {
                    info!("claimed subnet {}", l.key());
                }
                if let Some(s6) = l.subnet6.filter(|_| l.subnet.prefix() != 0) {
                    info!("IPv6 subnet {s6}");
                }
                return Ok(l);
            }
            debug!("lost the race for {key}, retrying");
        }
        Err(store_err("could not claim a subnet after 16 attempts (heavy contention)"))
    }

    async fn previous_lease(&mut self, public_ip: IpAddr) -> Option<LeaseAttrs> {
        let prefix = self.subnets_prefix();
        let (leases, _) = list(&mut self.client, &prefix).await.ok()?;
        let ours = |l: &Lease| match public_ip {
            IpAddr::V4(ip) => l.attrs.public_ip == ip,
            IpAddr::V6(ip) => l.attrs.public_ipv6 == Some(ip),
        };
        leases.into_iter().map(|(l, _)| l).find(ours).map(|l| l.attrs)
    }

    async fn renew(&mut self, lease: &OwnLease) -> Result<OwnLease, SubnetError> {
        let key = self.key(&lease.subnet, lease.subnet6.as_ref());
        let resp = timed("read own lease", self.client.get(key.as_str(), None)).await?;
        let Some(kv) = resp.kvs().first() else { return Err(SubnetError::LeaseLost(lease.key())) };
        let theirs: Option<LeaseAttrs> = serde_json::from_slice(kv.value()).ok();
        if kv.lease() != lease.id || theirs.as_ref() != Some(&lease.attrs) {
            return Err(SubnetError::LeaseLost(lease.key()));
        }
        let (mut keeper, mut stream) = timed("keep lease alive", self.client.lease_keep_alive(lease.id)).await?;
        timed("keep lease alive", keeper.keep_alive()).await?;
        let ttl = match timed("keep lease alive", stream.message()).await? {
            Some(r) => r.ttl(),
            None => 0,
        };
        if ttl <= 0 {
            return Err(SubnetError::LeaseLost(lease.key()));
        }
        Ok(OwnLease { expiration: SystemTime::now() + Duration::from_secs(ttl as u64), ..lease.clone() })
    }
}
