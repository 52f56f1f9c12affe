//! The agent's orchestration against a fake subnet manager, the in-memory
//! kernel and a recording firewall: no root, no netlink, no processes.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;

use clap::Parser;

use crate::backend::vxlan::VxlanData;
use flannel_shared::Mac;
use flannel_shared::lease::Lease;

use super::*;
use crate::backend::hostgw::HostGw;
use crate::backend::vxlan::Vxlan;
use crate::kernel::fake::FakeKernel;
use flannel_shared::firewall::{FirewallError, Mode};

const NET_CONF: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;
const HOST_GW_CONF: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#;

/// What the fake manager was asked and will answer.
#[derive(Default)]
struct Store {
    /// Subnets handed out by successive claims (the last one repeats).
    grants: VecDeque<IpNet>,
    claims: Vec<(Option<IpNet>, LeaseAttrs)>,
    renewals: usize,
    /// Answers for the next renewals; `Ok` when empty.
    renew_errors: VecDeque<SubnetError>,
    /// Answers for the next claims; a grant when empty.
    claim_errors: VecDeque<SubnetError>,
    network_up: usize,
    previous_mac: Option<String>,
}

#[derive(Clone, Default)]
struct FakeManager {
    store: Rc<RefCell<Store>>,
}

impl FakeManager {
    fn granting(subnets: &[&str]) -> FakeManager {
        let m = FakeManager::default();
        m.store.borrow_mut().grants = subnets.iter().map(|s| s.parse().unwrap()).collect();
        m
    }
}

fn lease_for(subnet: IpNet, attrs: &LeaseAttrs, ttl: Duration) -> OwnLease {
    OwnLease { subnet, subnet6: None, attrs: attrs.clone(), expiration: SystemTime::now() + ttl, id: 1 }
}

impl SubnetManager for FakeManager {
    async fn network_config(&mut self) -> Result<String, SubnetError> {
        Ok(NET_CONF.into())
    }
    async fn acquire(&mut self, claim: &Claim<'_>) -> Result<OwnLease, SubnetError> {
        let mut s = self.store.borrow_mut();
        s.claims.push((claim.prefer, claim.attrs.clone()));
        if let Some(e) = s.claim_errors.pop_front() {
            return Err(e);
        }
        let subnet = if s.grants.len() > 1 { s.grants.pop_front() } else { s.grants.front().copied() };
        Ok(lease_for(subnet.expect("a subnet to grant"), claim.attrs, Duration::from_secs(24 * 3600)))
    }
    async fn renew(&mut self, lease: &OwnLease) -> Result<OwnLease, SubnetError> {
        let mut s = self.store.borrow_mut();
        s.renewals += 1;
        match s.renew_errors.pop_front() {
            Some(e) => Err(e),
            None => Ok(lease_for(lease.subnet, &lease.attrs, Duration::from_secs(48 * 3600))),
        }
    }
    async fn previous_lease(&mut self, _public_ip: std::net::IpAddr) -> Option<LeaseAttrs> {
        let mac = self.store.borrow().previous_mac.clone()?;
        let mut l = peer("10.244.9.0/24", "192.0.2.1", 0).attrs;
        l.backend_data = serde_json::json!({"VNI": 1, "VtepMAC": mac});
        Some(l)
    }
    fn spawn_watch(&self, _tx: mpsc::Sender<LeaseEvent>, _metrics: Arc<Metrics>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async {})
    }
    async fn network_up(&mut self) -> Result<(), SubnetError> {
        self.store.borrow_mut().network_up += 1;
        Ok(())
    }
}

/// Keeps the sets it was asked for as if they were in the kernel.
#[derive(Clone, Default)]
struct FakeFirewall {
    /// Sets currently "in the kernel".
    present: Rc<RefCell<Vec<RuleSet>>>,
    failing: Rc<RefCell<bool>>,
}

impl Firewall for FakeFirewall {
    fn mode(&self) -> Mode {
        Mode::Iptables
    }
    fn sync(&mut self, v6: bool, sets: &[RuleSet]) -> Result<Vec<String>, FirewallError> {
        if *self.failing.borrow() {
            return Err(FirewallError::Command { cmd: "fake".into(), msg: "refused".into() });
        }
        let mut p = self.present.borrow_mut();
        let mut changes = Vec::new();
        p.retain(|s| {
            let keep = s.is_ipv4() == v6 || sets.contains(s);
            if !keep {
                changes.push(format!("removed {s:?}"));
            }
            keep
        });
        for set in sets {
            if !p.contains(set) {
                p.push(set.clone());
                changes.push(format!("wrote {set:?}"));
            }
        }
        Ok(changes)
    }
}

struct Bed {
    dir: std::path::PathBuf,
    kernel: FakeKernel,
    fw: FakeFirewall,
    metrics: Arc<Metrics>,
}

impl Bed {
    fn new() -> Bed {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("flanneld-agent-{}-{n}", std::process::id()));
        for f in [
            "sys/net/ipv6/conf/all/forwarding",
            "sys/net/ipv4/ip_forward",
            "sys/net/bridge/bridge-nf-call-iptables",
            "sys/net/bridge/bridge-nf-call-ip6tables",
        ] {
            let p = dir.join("proc").join(f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, "1").unwrap();
        }
        Bed {
            dir,
            kernel: FakeKernel::node("192.0.2.1/24"),
            fw: FakeFirewall::default(),
            metrics: Arc::new(Metrics::default()),
        }
    }

    fn opts(&self, extra: &[&str]) -> Opts {
        let file = self.dir.join("subnet.env");
        let mut args = vec!["flanneld", "--subnet-file", file.to_str().unwrap(), "--ip-masq"];
        args.extend_from_slice(extra);
        Opts::try_parse_from(args).unwrap()
    }

    fn subnet_env(&self) -> String {
        std::fs::read_to_string(self.dir.join("subnet.env")).unwrap_or_default()
    }

    async fn agent<B: Backend>(
        &self,
        mgr: &FakeManager,
        backend: B,
        conf: &str,
        extra: &[&str],
    ) -> Agent<FakeManager, FakeKernel, B, FakeFirewall> {
        let cfg = NetConfig::parse(conf, |_| {}).unwrap();
        let parts = Parts { mgr: mgr.clone(), kernel: self.kernel.clone(), backend, firewall: self.fw.clone() };
        Agent::start(self.opts(extra), parts, &cfg, self.metrics.clone(), &self.dir.join("proc")).await.unwrap()
    }

    async fn vxlan(&self, mgr: &FakeManager) -> Agent<FakeManager, FakeKernel, Vxlan, FakeFirewall> {
        self.vxlan_with(mgr, &[]).await
    }

    async fn vxlan_with(
        &self,
        mgr: &FakeManager,
        extra: &[&str],
    ) -> Agent<FakeManager, FakeKernel, Vxlan, FakeFirewall> {
        let cfg = NetConfig::parse(NET_CONF, |_| {}).unwrap();
        self.agent(mgr, Vxlan::new(Vxlan::config(&cfg.backend, &mut |_| {}).unwrap()), NET_CONF, extra).await
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn peer(subnet: &str, ip: &str, mac: u8) -> Lease {
    Lease {
        subnet: subnet.parse().unwrap(),
        subnet6: None,
        attrs: LeaseAttrs {
            public_ip: ip.parse().unwrap(),
            public_ipv6: None,
            backend_type: "vxlan".into(),
            backend_data: serde_json::to_value(VxlanData { vni: 1, vtep_mac: Mac([0x0e, 9, 9, 9, 9, mac]) }).unwrap(),
            backend_v6_data: None,
        },
    }
}

fn host_gw_peer(subnet: &str, ip: &str) -> Lease {
    let mut l = peer(subnet, ip, 0);
    l.attrs.backend_type = "host-gw".into();
    l.attrs.backend_data = serde_json::Value::Null;
    l
}

/// Our own lease as the store lists it.
fn echo<B: Backend>(a: &Agent<FakeManager, FakeKernel, B, FakeFirewall>) -> Lease {
    let own = a.own.as_ref().expect("a lease");
    Lease { subnet: own.subnet, subnet6: own.subnet6, attrs: own.attrs.clone() }
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

#[test]
fn start_sets_up_the_vtep_lease_and_subnet_env_and_readiness_waits_for_the_listing() {
    rt().block_on(async {
        let bed = Bed::new();
        let mgr = FakeManager::granting(&["10.244.7.0/24"]);
        let mut a = bed.vxlan(&mgr).await;
        let vtep = bed.kernel.link("flannel.1").expect("flannel.1 created");
        assert!(vtep.up);
        assert_eq!(vtep.mtu, 1450);
        let vx = vtep.vxlan.clone().unwrap();
        assert_eq!((vx.vni, vx.port, vx.local, vx.uplink), (1, 8472, Some("192.0.2.1".parse().unwrap()), Some(2)));
        // No router advertisements on the VTEP, as upstream.
        assert_eq!(bed.kernel.with(|s| s.accept_ra_off.clone()), ["flannel.1"]);
        assert!(
            bed.kernel.with(|s| s.addresses.iter().any(|x| x.index == vtep.index && x.net == net("10.244.7.0/32")))
        );
        // What the lease advertises is the device's own MAC.
        let claimed = mgr.store.borrow().claims[0].1.clone();
        assert_eq!(claimed.backend_type, "vxlan");
        assert_eq!(claimed.backend_data["VtepMAC"], vtep.mac.unwrap().to_string());
        let env = bed.subnet_env();
        assert!(env.contains("FLANNEL_SUBNET=10.244.7.1/24") && env.contains("FLANNEL_MTU=1450"), "{env}");
        assert!(env.contains("FLANNEL_IPMASQ=true"), "{env}");
        // Rules are written for the lease at start.
        let masq = RuleSet::Masq { network: net("10.244.0.0/16"), subnet: net("10.244.7.0/24"), random_fully: true };
        assert_eq!(*bed.fw.present.borrow(), [masq, RuleSet::Forward { network: net("10.244.0.0/16") }]);

        // A pass before the first listing programs nothing and is not ready.
        a.reconcile().await;
        assert_eq!(bed.metrics.readiness(), Err("peers from the first lease listing not programmed yet"));
        assert!(!a.on_event(LeaseEvent::Snapshot(vec![
            echo(&a),
            peer("10.244.2.0/24", "192.0.2.2", 2),
            peer("10.244.3.0/24", "192.0.2.3", 3),
        ])));
        a.reconcile().await;
        assert_eq!(bed.metrics.readiness(), Ok(()));
        assert_eq!(mgr.store.borrow().network_up, 1);
        let dev = vtep.index;
        assert_eq!(
            bed.kernel.routes_by(RTPROT_FLANNEL),
            [
                format!("10.244.2.0/24 via 10.244.2.0 dev {dev} onlink"),
                format!("10.244.3.0/24 via 10.244.3.0 dev {dev} onlink")
            ]
        );
        bed.kernel.with(|s| {
            assert_eq!(s.neighbours.len(), 2);
            assert!(
                s.fdb
                    .iter()
                    .any(|f| f.mac == Some(Mac([0x0e, 9, 9, 9, 9, 3])) && f.ip == Some("192.0.2.3".parse().unwrap()))
            );
        });
        // A second pass with nothing changed writes nothing.
        let writes = bed.kernel.with(|s| s.writes);
        a.reconcile().await;
        assert_eq!(bed.kernel.with(|s| s.writes), writes);
    });
}

#[test]
fn added_and_removed_leases_follow_into_the_kernel() {
    rt().block_on(async {
        let bed = Bed::new();
        let mgr = FakeManager::granting(&["10.244.1.0/24"]);
        let mut a = bed.vxlan(&mgr).await;
        a.on_event(LeaseEvent::Snapshot(vec![peer("10.244.2.0/24", "192.0.2.2", 2)]));
        a.reconcile().await;
        assert!(!a.on_event(LeaseEvent::Added(peer("10.244.5.0/24", "192.0.2.5", 5))));
        // A lease of another backend is left out and counted.
        assert!(!a.on_event(LeaseEvent::Added(host_gw_peer("10.244.6.0/24", "192.0.2.6"))));
        a.reconcile().await;
        assert_eq!(bed.kernel.routes_by(RTPROT_FLANNEL).len(), 2);
        assert_eq!(bed.metrics.skipped_peers.get(), 1);
        assert_eq!(bed.metrics.peers.get(), 3);

        assert!(!a.on_event(LeaseEvent::Removed(net("10.244.2.0/24"))));
        // Removing what is not known changes nothing.
        assert!(!a.on_event(LeaseEvent::Removed(net("10.244.99.0/24"))));
        a.reconcile().await;
        let routes = bed.kernel.routes_by(RTPROT_FLANNEL);
        assert_eq!(routes.len(), 1);
        assert!(routes[0].starts_with("10.244.5.0/24 via 10.244.5.0"), "{routes:?}");
        bed.kernel.with(|s| {
            assert_eq!(s.neighbours.iter().map(|n| n.ip.unwrap().to_string()).collect::<Vec<_>>(), ["10.244.5.0"]);
            assert_eq!(s.fdb.len(), 1);
        });
        // A snapshot replaces everything known.
        a.on_event(LeaseEvent::Snapshot(vec![peer("10.244.8.0/24", "192.0.2.8", 8)]));
        a.reconcile().await;
        let routes = bed.kernel.routes_by(RTPROT_FLANNEL);
        assert!(routes.len() == 1 && routes[0].starts_with("10.244.8.0/24"), "{routes:?}");
        // Routes not ours (other protocols) are never touched.
        assert_eq!(bed.kernel.with(|s| s.routes.iter().filter(|r| r.protocol != RTPROT_FLANNEL).count()), 2);
    });
}

#[test]
fn our_lease_taken_over_or_gone_is_claimed_again() {
    rt().block_on(async {
        let bed = Bed::new();
        let mgr = FakeManager::granting(&["10.244.1.0/24", "10.244.9.0/24"]);
        let mut a = bed.vxlan(&mgr).await;
        // Our own lease echoed back is not a peer and not a loss.
        assert!(!a.on_event(LeaseEvent::Added(echo(&a))));
        assert!(!a.on_event(LeaseEvent::Snapshot(vec![echo(&a), peer("10.244.2.0/24", "192.0.2.2", 2)])));
        assert_eq!(a.peers.len(), 1);

        // Someone else's attributes on our subnet: a takeover.
        let (tx, mut rx) = mpsc::channel(4);
        tx.send(LeaseEvent::Added(peer("10.244.1.0/24", "192.0.2.77", 7))).await.unwrap();
        let first = rx.recv().await.unwrap();
        a.on_events(first, &mut rx).await;
        {
            let s = mgr.store.borrow();
            assert_eq!(s.claims.len(), 2);
            assert_eq!(s.claims[1].0, Some(net("10.244.1.0/24")), "the claim prefers our old subnet");
        }
        assert_eq!(a.own_subnet(), Some(net("10.244.9.0/24")));
        assert!(bed.subnet_env().contains("FLANNEL_SUBNET=10.244.9.1/24"));
        let vtep = bed.kernel.link("flannel.1").unwrap();
        bed.kernel.with(|s| {
            let addrs: Vec<_> = s.addresses.iter().filter(|x| x.index == vtep.index).map(|x| x.net).collect();
            assert_eq!(addrs, [net("10.244.9.0/32")], "the VTEP follows the new subnet");
        });

        // A snapshot without our lease is a loss as well.
        assert!(a.on_event(LeaseEvent::Snapshot(vec![peer("10.244.2.0/24", "192.0.2.2", 2)])));
        assert!(a.on_event(LeaseEvent::Removed(net("10.244.9.0/24"))));
    });
}

#[test]
fn renewal_extends_the_lease_and_a_lost_one_is_claimed_again_with_backoff_on_failure() {
    rt().block_on(async {
        let bed = Bed::new();
        let mgr = FakeManager::granting(&["10.244.1.0/24"]);
        let mut a = bed.vxlan(&mgr).await;
        let before = a.own.as_ref().unwrap().expiration;
        a.renew_or_reclaim().await;
        assert_eq!(mgr.store.borrow().renewals, 1);
        assert!(a.own.as_ref().unwrap().expiration > before);
        // The next renewal is scheduled a margin (60 min) before the new expiry.
        let wait = a.next_renew.saturating_duration_since(Instant::now());
        assert!(wait > Duration::from_secs(46 * 3600) && wait < Duration::from_secs(47 * 3600), "{wait:?}");

        // The store is away: retried soon, the lease kept.
        mgr.store.borrow_mut().renew_errors.push_back(SubnetError::Store("connection refused".into()));
        a.renew_or_reclaim().await;
        assert!(a.next_renew.saturating_duration_since(Instant::now()) <= Duration::from_secs(1));
        assert!(bed.metrics.lease_held.load(Ordering::Relaxed));

        // The lease is gone: claimed again; that fails once, so the lease is marked for a claim.
        {
            let mut s = mgr.store.borrow_mut();
            s.renew_errors.push_back(SubnetError::LeaseLost(net("10.244.1.0/24")));
            s.claim_errors.push_back(SubnetError::Store("connection refused".into()));
        }
        a.renew_or_reclaim().await;
        assert!(!bed.metrics.lease_held.load(Ordering::Relaxed));
        assert_eq!(bed.metrics.readiness(), Err("no subnet lease held"));
        assert_eq!(a.own.as_ref().unwrap().id, 0);
        // The next turn claims rather than renews.
        let renewals = mgr.store.borrow().renewals;
        a.renew_or_reclaim().await;
        assert_eq!(mgr.store.borrow().renewals, renewals);
        assert_eq!(mgr.store.borrow().claims.len(), 3);
        assert!(bed.metrics.lease_held.load(Ordering::Relaxed));
        assert_eq!(a.own.as_ref().unwrap().id, 1);
    });
}

#[test]
fn a_deleted_vtep_is_rebuilt_with_the_advertised_mac_and_every_peer_replayed() {
    rt().block_on(async {
        let bed = Bed::new();
        let mgr = FakeManager::granting(&["10.244.1.0/24"]);
        let mut a = bed.vxlan(&mgr).await;
        a.on_event(LeaseEvent::Snapshot(vec![peer("10.244.2.0/24", "192.0.2.2", 2)]));
        a.reconcile().await;
        let old = bed.kernel.link("flannel.1").unwrap();
        bed.kernel.remove_link("flannel.1");
        assert!(bed.kernel.routes_by(RTPROT_FLANNEL).is_empty());
        a.reconcile().await;
        let new = bed.kernel.link("flannel.1").expect("rebuilt");
        assert_ne!(new.index, old.index);
        assert_eq!(new.mac, old.mac, "peers' FDB entries keep pointing at us");
        assert_eq!(bed.metrics.vtep_recreations.get(), 1);
        assert_eq!(
            bed.kernel.routes_by(RTPROT_FLANNEL),
            [format!("10.244.2.0/24 via 10.244.2.0 dev {} onlink", new.index)]
        );
        assert!(a.kernel.interest().links.contains(&new.index), "the kernel watch follows the new index");
        // A hand-deleted route comes back too.
        bed.kernel.tamper(|s| s.routes.retain(|r| r.protocol != RTPROT_FLANNEL));
        a.reconcile().await;
        assert_eq!(bed.kernel.routes_by(RTPROT_FLANNEL).len(), 1);
    });
}

#[test]
fn a_rebuilt_node_recreates_its_vtep_with_the_mac_it_advertised_before() {
    rt().block_on(async {
        let bed = Bed::new();
        let mgr = FakeManager::granting(&["10.244.1.0/24"]);
        mgr.store.borrow_mut().previous_mac = Some("0e:aa:bb:cc:dd:ee".into());
        let _a = bed.vxlan(&mgr).await;
        assert_eq!(bed.kernel.link("flannel.1").unwrap().mac, Some(Mac([0x0e, 0xaa, 0xbb, 0xcc, 0xdd, 0xee])));
        assert_eq!(mgr.store.borrow().claims[0].1.backend_data["VtepMAC"], "0e:aa:bb:cc:dd:ee");
    });
}

#[test]
fn switching_backends_leaves_nothing_of_the_other_behind() {
    rt().block_on(async {
        let bed = Bed::new();
        let mgr = FakeManager::granting(&["10.244.1.0/24"]);
        let peers = || vec![peer("10.244.2.0/24", "192.0.2.2", 2), host_gw_peer("10.244.3.0/24", "192.0.2.3")];
        let mut a = bed.vxlan(&mgr).await;
        a.on_event(LeaseEvent::Snapshot(peers()));
        a.reconcile().await;
        drop(a);

        let mut h = bed.agent(&mgr, HostGw, HOST_GW_CONF, &[]).await;
        assert!(bed.kernel.link("flannel.1").is_none(), "the VTEP goes with a switch to host-gw");
        let claimed = mgr.store.borrow().claims.last().unwrap().1.clone();
        assert_eq!((claimed.backend_type.as_str(), &claimed.backend_data), ("host-gw", &serde_json::Value::Null));
        assert!(bed.subnet_env().contains("FLANNEL_MTU=1500"), "{}", bed.subnet_env());
        h.on_event(LeaseEvent::Snapshot(peers()));
        h.reconcile().await;
        assert_eq!(bed.kernel.routes_by(RTPROT_FLANNEL), ["10.244.3.0/24 via 192.0.2.3 dev 2"]);
        bed.kernel.with(|s| assert!(s.neighbours.is_empty() && s.fdb.is_empty()));
        // The vxlan peer is not programmed, and says why.
        assert_eq!(h.last_skipped[0].1, "backend vxlan (this node runs host-gw)");
        drop(h);

        let mut a = bed.vxlan(&mgr).await;
        a.on_event(LeaseEvent::Snapshot(peers()));
        a.reconcile().await;
        let dev = bed.kernel.link("flannel.1").expect("back").index;
        assert_eq!(bed.kernel.routes_by(RTPROT_FLANNEL), [format!("10.244.2.0/24 via 10.244.2.0 dev {dev} onlink")]);
    });
}

#[test]
fn host_gw_refuses_peers_off_the_uplink_network() {
    rt().block_on(async {
        let bed = Bed::new();
        let mgr = FakeManager::granting(&["10.244.1.0/24"]);
        let mut h = bed.agent(&mgr, HostGw, HOST_GW_CONF, &[]).await;
        h.on_event(LeaseEvent::Snapshot(vec![
            host_gw_peer("10.244.2.0/24", "192.0.2.2"),
            host_gw_peer("10.244.3.0/24", "203.0.113.3"),
        ]));
        h.reconcile().await;
        assert_eq!(bed.kernel.routes_by(RTPROT_FLANNEL), ["10.244.2.0/24 via 192.0.2.2 dev 2"]);
        assert_eq!(h.last_skipped.len(), 1);
        assert!(h.last_skipped[0].1.starts_with("203.0.113.3 is not on-link via eth0"), "{:?}", h.last_skipped);
        // Refused peers do not hold readiness.
        assert_eq!(bed.metrics.readiness(), Ok(()));
    });
}

#[test]
fn rules_follow_the_flags_and_a_failing_firewall_holds_readiness() {
    rt().block_on(async {
        let bed = Bed::new();
        let mgr = FakeManager::granting(&["10.244.1.0/24"]);
        bed.fw.present.borrow_mut().push(RuleSet::Masq {
            network: net("10.244.0.0/16"),
            subnet: net("10.244.1.0/24"),
            random_fully: true,
        });
        let mut a = bed.vxlan_with(&mgr, &["--ip-masq=false"]).await;
        assert!(bed.fw.present.borrow().iter().all(|s| matches!(s, RuleSet::Forward { .. })), "masq turned off");
        assert!(bed.subnet_env().contains("FLANNEL_IPMASQ=false"));
        a.on_event(LeaseEvent::Snapshot(vec![]));
        a.reconcile().await;
        assert_eq!(bed.metrics.readiness(), Ok(()));

        // Someone flushes our rules: the resync puts them back.
        bed.fw.present.borrow_mut().clear();
        a.ensure_rules();
        assert_eq!(*bed.fw.present.borrow(), [RuleSet::Forward { network: net("10.244.0.0/16") }]);
        // A firewall that refuses makes the node unready until it works again.
        *bed.fw.failing.borrow_mut() = true;
        bed.fw.present.borrow_mut().clear();
        a.ensure_rules();
        assert_eq!(bed.metrics.readiness(), Err("firewall rules (iptables or nftables) not in place"));
        assert_eq!(bed.metrics.iptables_errors.get(), 1);
        *bed.fw.failing.borrow_mut() = false;
        a.ensure_rules();
        assert_eq!(bed.metrics.readiness(), Ok(()));
    });
}

#[test]
fn the_loop_applies_events_and_stops_on_request() {
    rt().block_on(async {
        let bed = Bed::new();
        let mgr = FakeManager::granting(&["10.244.1.0/24"]);
        let a = bed.vxlan(&mgr).await;
        let (tx, rx) = mpsc::channel(8);
        tx.send(LeaseEvent::Snapshot(vec![peer("10.244.2.0/24", "192.0.2.2", 2)])).await.unwrap();
        tx.send(LeaseEvent::Added(peer("10.244.3.0/24", "192.0.2.3", 3))).await.unwrap();
        let kernel = bed.kernel.clone();
        let stop = async move {
            // Until both events are in the kernel.
            while kernel.routes_by(RTPROT_FLANNEL).len() < 2 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Stop::Signal("test")
        };
        tokio::time::timeout(Duration::from_secs(30), a.run(rx, stop)).await.expect("stopped").unwrap();
        assert_eq!(bed.metrics.readiness(), Ok(()));
        // A closed watch is an error, not a silent stall.
        let a = bed.vxlan(&mgr).await;
        let (tx, rx) = mpsc::channel(1);
        drop(tx);
        let e = a.run(rx, std::future::pending()).await.unwrap_err();
        assert_eq!(e.to_string(), "lease watch stopped");
    });
}

/// `Backend.MTU` is the underlay's MTU, as upstream reads it: the VTEP and
/// FLANNEL_MTU get it minus VXLAN's 50 bytes. `Learning` reaches the device.
#[test]
fn backend_mtu_is_the_underlay_mtu_and_learning_is_honoured() {
    rt().block_on(async {
        for (conf, mtu, learning) in [
            (r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","MTU":1400}}"#, 1350, false),
            (r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","Learning":true}}"#, 1450, true),
            (r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","mtu":9000,"learning":false}}"#, 8950, false),
        ] {
            let bed = Bed::new();
            let mgr = FakeManager::granting(&["10.244.7.0/24"]);
            let cfg = NetConfig::parse(conf, |_| {}).unwrap();
            let _a = bed.agent(&mgr, Vxlan::new(Vxlan::config(&cfg.backend, &mut |_| {}).unwrap()), conf, &[]).await;
            let vtep = bed.kernel.link("flannel.1").expect("flannel.1 created");
            assert_eq!(vtep.mtu, mtu, "{conf}");
            assert_eq!(vtep.vxlan.unwrap().learning, learning, "{conf}");
            assert!(bed.subnet_env().contains(&format!("FLANNEL_MTU={mtu}\n")), "{conf}: {}", bed.subnet_env());
        }
    });
}

/// Sends `evs` through the agent's batch path (what the event loop does).
async fn feed<B: Backend>(a: &mut Agent<FakeManager, FakeKernel, B, FakeFirewall>, evs: Vec<LeaseEvent>) {
    let (tx, mut rx) = mpsc::channel(evs.len().max(1));
    for ev in evs {
        tx.send(ev).await.unwrap();
    }
    let first = rx.recv().await.unwrap();
    a.on_events(first, &mut rx).await;
}

/// After an incremental step, a full pass must find nothing to change.
async fn full_pass_is_a_noop<B: Backend>(a: &mut Agent<FakeManager, FakeKernel, B, FakeFirewall>, bed: &Bed) {
    let (writes, changes) = (bed.kernel.with(|s| s.writes), bed.metrics.reconcile_changes.get());
    let (routes, neigh, fdb) = (bed.metrics.routes.get(), bed.metrics.neighbours.get(), bed.metrics.fdb_entries.get());
    a.reconcile().await;
    assert_eq!(bed.kernel.with(|s| s.writes), writes, "the full pass had to write after the incremental one");
    assert_eq!(bed.metrics.reconcile_changes.get(), changes);
    // The gauges the incremental path kept up agree with the full pass's counts.
    assert_eq!(
        (bed.metrics.routes.get(), bed.metrics.neighbours.get(), bed.metrics.fdb_entries.get()),
        (routes, neigh, fdb)
    );
}

/// A Node heartbeat (or an etcd renewal re-putting the same value) changes
/// nothing: no pass, no write. A real change costs that peer's writes only,
/// and leaves nothing for the full pass to do.
#[test]
fn unchanged_leases_cost_nothing_and_a_change_costs_one_peer() {
    rt().block_on(async {
        let bed = Bed::new();
        let mgr = FakeManager::granting(&["10.244.1.0/24"]);
        let mut a = bed.vxlan(&mgr).await;
        let peers: Vec<Lease> =
            (2..40u8).map(|i| peer(&format!("10.244.{i}.0/24"), &format!("192.0.2.{i}"), i)).collect();
        feed(&mut a, vec![LeaseEvent::Snapshot(peers.clone())]).await;
        assert_eq!(bed.kernel.routes_by(RTPROT_FLANNEL).len(), 38);
        let runs = bed.metrics.reconcile_runs.get();
        let writes = bed.kernel.with(|s| s.writes);

        // Heartbeats: the same leases again, and removals of Nodes that were never peers.
        let mut beats: Vec<LeaseEvent> = peers.iter().cloned().map(LeaseEvent::Added).collect();
        beats.push(LeaseEvent::Removed(net("10.244.200.0/24")));
        beats.push(LeaseEvent::Added(echo(&a)));
        feed(&mut a, beats).await;
        assert_eq!(bed.metrics.reconcile_runs.get(), runs, "a heartbeat ran a pass");
        assert_eq!(bed.kernel.with(|s| s.writes), writes, "a heartbeat wrote to the kernel");

        // A peer reinstalled: new VtepMAC. Its ARP and FDB entries change, its route stays.
        feed(&mut a, vec![LeaseEvent::Added(peer("10.244.7.0/24", "192.0.2.7", 77))]).await;
        assert_eq!(bed.metrics.reconcile_runs.get(), runs, "one peer's change ran a full pass");
        // ARP replaced, FDB added, the stale FDB entry removed.
        assert_eq!(bed.kernel.with(|s| s.writes), writes + 3);
        let mac = Mac([0x0e, 9, 9, 9, 9, 77]);
        bed.kernel.with(|s| {
            let gw: std::net::IpAddr = "10.244.7.0".parse().unwrap();
            assert_eq!(s.neighbours.iter().find(|n| n.ip == Some(gw)).and_then(|n| n.mac), Some(mac));
            let fdb: Vec<_> = s.fdb.iter().filter(|n| n.ip == Some("192.0.2.7".parse().unwrap())).collect();
            assert_eq!(fdb.len(), 1);
            assert_eq!(fdb[0].mac, Some(mac));
        });
        full_pass_is_a_noop(&mut a, &bed).await;

        // A new peer, one gone, one moved to another address, in one batch.
        let runs = bed.metrics.reconcile_runs.get();
        let writes = bed.kernel.with(|s| s.writes);
        feed(
            &mut a,
            vec![
                LeaseEvent::Added(peer("10.244.50.0/24", "192.0.2.50", 50)),
                LeaseEvent::Removed(net("10.244.3.0/24")),
                LeaseEvent::Added(peer("10.244.4.0/24", "192.0.2.104", 4)),
            ],
        )
        .await;
        assert_eq!(bed.metrics.reconcile_runs.get(), runs);
        // New: ARP + FDB + route; gone: route + ARP + FDB; moved: FDB set + stale FDB removed.
        assert_eq!(bed.kernel.with(|s| s.writes), writes + 8);
        assert_eq!(bed.kernel.routes_by(RTPROT_FLANNEL).len(), 38);
        assert_eq!(bed.metrics.peers.get(), 38);
        full_pass_is_a_noop(&mut a, &bed).await;

        // A peer switching to another backend is dropped from the kernel at once.
        feed(&mut a, vec![LeaseEvent::Added(host_gw_peer("10.244.5.0/24", "192.0.2.5"))]).await;
        assert!(!bed.kernel.routes_by(RTPROT_FLANNEL).iter().any(|r| r.starts_with("10.244.5.0/24")));
        full_pass_is_a_noop(&mut a, &bed).await;
    });
}

/// host-gw: a peer's new address moves its route, nothing else is written.
#[test]
fn host_gw_peer_change_is_incremental() {
    rt().block_on(async {
        let bed = Bed::new();
        let mgr = FakeManager::granting(&["10.244.1.0/24"]);
        let mut a = bed.agent(&mgr, HostGw, HOST_GW_CONF, &[]).await;
        let peers = vec![host_gw_peer("10.244.2.0/24", "192.0.2.2"), host_gw_peer("10.244.3.0/24", "192.0.2.3")];
        feed(&mut a, vec![LeaseEvent::Snapshot(peers.clone())]).await;
        let runs = bed.metrics.reconcile_runs.get();
        let writes = bed.kernel.with(|s| s.writes);
        feed(&mut a, peers.into_iter().map(LeaseEvent::Added).collect()).await;
        assert_eq!((bed.metrics.reconcile_runs.get(), bed.kernel.with(|s| s.writes)), (runs, writes));
        feed(&mut a, vec![LeaseEvent::Added(host_gw_peer("10.244.3.0/24", "192.0.2.33"))]).await;
        assert_eq!(bed.kernel.with(|s| s.writes), writes + 1);
        assert!(bed.kernel.routes_by(RTPROT_FLANNEL).iter().any(|r| r.starts_with("10.244.3.0/24 via 192.0.2.33")));
        // A peer off our L2 is refused here as in the full pass.
        feed(&mut a, vec![LeaseEvent::Added(host_gw_peer("10.244.4.0/24", "198.51.100.4"))]).await;
        assert!(!bed.kernel.routes_by(RTPROT_FLANNEL).iter().any(|r| r.starts_with("10.244.4.0/24")));
        full_pass_is_a_noop(&mut a, &bed).await;
        assert_eq!(bed.metrics.reconcile_runs.get(), runs + 1);
    });
}

/// A restarted agent runs a pass before its first lease listing (the periodic
/// tick fires at once, and a big listing takes a while): it must not take away
/// what the previous run programmed, which carries the node's traffic until
/// the listing says what is stale. Then the listing prunes exactly that.
#[test]
fn a_restart_keeps_every_entry_until_the_first_listing_prunes_the_stale_ones() {
    rt().block_on(async {
        let bed = Bed::new();
        let mgr = FakeManager::granting(&["10.244.7.0/24"]);
        let mut a = bed.vxlan(&mgr).await;
        a.on_event(LeaseEvent::Snapshot(vec![
            peer("10.244.2.0/24", "192.0.2.2", 2),
            peer("10.244.3.0/24", "192.0.2.3", 3),
        ]));
        a.reconcile().await;
        let programmed = bed.kernel.routes_by(RTPROT_FLANNEL);
        assert_eq!(programmed.len(), 2);
        let counts = || bed.kernel.with(|s| (s.neighbours.len(), s.fdb.len()));
        assert_eq!(counts(), (2, 2));
        drop(a);

        let mut b = bed.vxlan(&mgr).await;
        b.reconcile().await;
        assert_eq!(bed.kernel.routes_by(RTPROT_FLANNEL), programmed, "routes kept before the listing");
        assert_eq!(counts(), (2, 2), "ARP and FDB entries kept before the listing");
        // 10.244.2.0/24 left while the agent was down.
        b.on_event(LeaseEvent::Snapshot(vec![peer("10.244.3.0/24", "192.0.2.3", 3)]));
        b.reconcile().await;
        let dev = bed.kernel.link("flannel.1").unwrap().index;
        assert_eq!(bed.kernel.routes_by(RTPROT_FLANNEL), [format!("10.244.3.0/24 via 10.244.3.0 dev {dev} onlink")]);
        assert_eq!(counts(), (1, 1));
    });
}

mod wireguard;
