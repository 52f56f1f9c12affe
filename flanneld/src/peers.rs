//! The peers' leases as the agent knows them, kept from the subnet manager's
//! events, and what one backend family makes of them.
//!
//! Each lease is decoded once, when its event arrives (by the backend's
//! decoder: vxlan's VTEP MACs out of the backend data JSON), not on every pass. An event that changes nothing
//! (a Node heartbeat, an etcd lease renewal re-putting the same value) is
//! reported as [`Change::None`]: no log line, no pass, no kernel write.

use std::collections::BTreeMap;
use std::net::IpAddr;

use tracing::{debug, info, warn};

use flannel_shared::IpNet;
use flannel_shared::lease::{Lease, LeaseAttrs};

use crate::backend::FamilyNet;
use crate::reconcile::Peer;
use crate::subnet::LeaseEvent;

/// Decodes what a backend needs of a lease in one family (`true`: IPv6).
pub type Decode<D> = fn(&Lease, bool) -> Option<D>;

/// A peer's lease and what the backend needs of it, decoded once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Known<D> {
    pub lease: Lease,
    /// By family: `[IPv4, IPv6]`.
    data: [Option<D>; 2],
}

impl<D: Clone> Known<D> {
    pub fn new(lease: Lease, decode: Decode<D>) -> Known<D> {
        let data = [decode(&lease, false), decode(&lease, true)];
        Known { lease, data }
    }

    /// What `fam` makes of this lease on a node running `backend_type`, or why it cannot be programmed.
    /// `None` without a reason: nothing to say (another backend's lease, reported once with IPv4).
    pub fn peer(
        &self,
        fam: &FamilyNet,
        backend_type: &str,
        refuse: impl Fn(IpAddr) -> Option<String>,
    ) -> Result<Peer<D>, Option<(IpNet, String)>> {
        let l = &self.lease;
        if l.attrs.backend_type != backend_type {
            let why = format!("backend {} (this node runs {backend_type})", l.attrs.backend_type);
            return Err((!fam.v6).then_some((l.subnet, why)));
        }
        let (subnet, public_ip, data) = if fam.v6 {
            match (l.subnet6, l.attrs.public_ipv6) {
                (Some(s), Some(ip)) => (s, IpAddr::V6(ip), self.data[1].clone()),
                _ => return Err(Some((l.subnet, "no IPv6 half in its lease (an IPv4-only node)".to_string()))),
            }
        } else if l.has_ipv4() {
            (l.subnet, IpAddr::V4(l.attrs.public_ip), self.data[0].clone())
        } else {
            return Err(Some((l.key(), "no IPv4 half in its lease (an IPv6-only node)".to_string())));
        };
        if let Some(why) = refuse(public_ip) {
            return Err(Some((subnet, why)));
        }
        Ok(Peer { subnet, public_ip, data })
    }
}

/// The address a lease is reached at, for log lines (its IPv6 one when IPv6-only).
fn public_of(l: &Lease) -> IpAddr {
    match l.attrs.public_ipv6 {
        Some(v6) if !l.has_ipv4() => IpAddr::V6(v6),
        _ => IpAddr::V4(l.attrs.public_ip),
    }
}

/// What one event did to the table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change<D> {
    /// Nothing the data path depends on.
    None,
    /// One peer was added, changed or removed; `old` is what it was before.
    Peer { subnet: IpNet, old: Option<Box<Known<D>>> },
    /// Everything may have changed (a full listing).
    All,
}

/// What the agent must do after an event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome<D> {
    pub change: Change<D>,
    /// Our own lease needs claiming again (gone, or taken over).
    pub lost: bool,
}

impl<D> Outcome<D> {
    fn none() -> Outcome<D> {
        Outcome { change: Change::None, lost: false }
    }
    fn lost() -> Outcome<D> {
        Outcome { change: Change::None, lost: true }
    }
}

/// Every lease but ours, by subnet, decoded for one backend.
#[derive(Debug)]
pub struct PeerTable<D> {
    leases: BTreeMap<IpNet, Known<D>>,
    decode: Decode<D>,
    /// Whether a full listing has arrived (readiness waits for it to be programmed).
    listed: bool,
}

impl<D: Clone + PartialEq> PeerTable<D> {
    pub fn new(decode: Decode<D>) -> PeerTable<D> {
        PeerTable { leases: BTreeMap::new(), decode, listed: false }
    }

    pub fn len(&self) -> usize {
        self.leases.len()
    }

    pub fn is_empty(&self) -> bool {
        self.leases.is_empty()
    }

    pub fn listed(&self) -> bool {
        self.listed
    }

    pub fn get(&self, subnet: &IpNet) -> Option<&Known<D>> {
        self.leases.get(subnet)
    }

    /// Forgets a subnet (it became ours).
    pub fn forget(&mut self, subnet: &IpNet) {
        self.leases.remove(subnet);
    }

    /// Applies one event given our own lease (subnet and what we advertise).
    pub fn apply(&mut self, ev: LeaseEvent, own: Option<(IpNet, &LeaseAttrs)>) -> Outcome<D> {
        let decode = self.decode;
        let is_ours = |l: &Lease| own.is_some_and(|(s, a)| s == l.key() && *a == l.attrs);
        match ev {
            LeaseEvent::Snapshot(all) => {
                let lost = own.is_some_and(|(s, _)| !all.iter().any(|l| l.key() == s && is_ours(l)));
                self.leases = all
                    .into_iter()
                    .filter(|l| Some(l.key()) != own.map(|o| o.0))
                    .map(|l| (l.key(), Known::new(l, decode)))
                    .collect();
                debug!("lease snapshot: {} peers", self.leases.len());
                self.listed = true;
                Outcome { change: Change::All, lost }
            }
            LeaseEvent::Added(l) => {
                if own.is_some_and(|(s, _)| s == l.key()) {
                    if is_ours(&l) {
                        return Outcome::none();
                    }
                    warn!("our subnet {} was taken over by {}", l.key(), public_of(&l));
                    debug!("theirs: {:?}; ours: {:?}", l.attrs, own.map(|o| o.1));
                    return Outcome::lost();
                }
                let subnet = l.key();
                if self.leases.get(&subnet).is_some_and(|k| k.lease == l) {
                    return Outcome::none();
                }
                info!("peer lease {subnet} -> {} ({})", public_of(&l), l.attrs.backend_type);
                let old = self.leases.insert(subnet, Known::new(l, decode)).map(Box::new);
                Outcome { change: Change::Peer { subnet, old }, lost: false }
            }
            LeaseEvent::Removed(s) => {
                if own.is_some_and(|(o, _)| o == s) {
                    warn!("our lease on {s} disappeared from the store");
                    return Outcome::lost();
                }
                match self.leases.remove(&s) {
                    Some(old) => {
                        info!("peer lease {s} removed");
                        Outcome { change: Change::Peer { subnet: s, old: Some(Box::new(old)) }, lost: false }
                    }
                    None => Outcome::none(),
                }
            }
        }
    }

    /// The peers of one family that run `backend_type` and that `refuse` does
    /// not turn down, and the ones left out with the reason. Leases of another
    /// backend are reported once (with the IPv4 family).
    pub fn for_family(
        &self,
        fam: &FamilyNet,
        backend_type: &str,
        refuse: impl Fn(IpAddr) -> Option<String>,
    ) -> (Vec<Peer<D>>, Vec<(IpNet, String)>) {
        let mut skipped = Vec::new();
        let mut peers = Vec::with_capacity(self.leases.len());
        for k in self.leases.values() {
            match k.peer(fam, backend_type, &refuse) {
                Ok(p) => peers.push(p),
                Err(Some(why)) => skipped.push(why),
                Err(None) => {}
            }
        }
        (peers, skipped)
    }
}
