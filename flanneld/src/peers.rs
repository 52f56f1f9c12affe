//! The peers' leases as the agent knows them, kept from the subnet manager's
//! events, and what one backend family makes of them.

use std::collections::BTreeMap;
use std::net::IpAddr;

use tracing::{debug, info, warn};

use flannel_shared::IpNet;
use flannel_shared::lease::{Lease, LeaseAttrs};
use flannel_shared::netlink::parse_mac;

use crate::backend::FamilyNet;
use crate::reconcile::Peer;
use crate::subnet::LeaseEvent;

/// Every lease but ours, by subnet.
#[derive(Debug, Default)]
pub struct PeerTable {
    leases: BTreeMap<IpNet, Lease>,
    /// Whether a full listing has arrived (readiness waits for it to be programmed).
    listed: bool,
}

impl PeerTable {
    pub fn len(&self) -> usize {
        self.leases.len()
    }

    pub fn is_empty(&self) -> bool {
        self.leases.is_empty()
    }

    pub fn listed(&self) -> bool {
        self.listed
    }

    pub fn get(&self, subnet: &IpNet) -> Option<&Lease> {
        self.leases.get(subnet)
    }

    /// Forgets a subnet (it became ours).
    pub fn forget(&mut self, subnet: &IpNet) {
        self.leases.remove(subnet);
    }

    /// Applies one event given our own lease (subnet and what we advertise);
    /// returns whether our lease needs claiming again (gone, or taken over).
    pub fn apply(&mut self, ev: LeaseEvent, own: Option<(IpNet, &LeaseAttrs)>) -> bool {
        let is_ours = |l: &Lease| own.is_some_and(|(s, a)| s == l.subnet && *a == l.attrs);
        match ev {
            LeaseEvent::Snapshot(all) => {
                let lost = own.is_some_and(|(s, _)| !all.iter().any(|l| l.subnet == s && is_ours(l)));
                self.leases =
                    all.into_iter().filter(|l| Some(l.subnet) != own.map(|o| o.0)).map(|l| (l.subnet, l)).collect();
                debug!("lease snapshot: {} peers", self.leases.len());
                self.listed = true;
                lost
            }
            LeaseEvent::Added(l) => {
                if own.is_some_and(|(s, _)| s == l.subnet) {
                    if is_ours(&l) {
                        return false;
                    }
                    warn!("our subnet {} was taken over by {}", l.subnet, l.attrs.public_ip);
                    debug!("theirs: {:?}; ours: {:?}", l.attrs, own.map(|o| o.1));
                    return true;
                }
                info!("peer lease {} -> {} ({})", l.subnet, l.attrs.public_ip, l.attrs.backend_type);
                self.leases.insert(l.subnet, l);
                false
            }
            LeaseEvent::Removed(s) => {
                if own.is_some_and(|(o, _)| o == s) {
                    warn!("our lease on {s} disappeared from the store");
                    return true;
                }
                if self.leases.remove(&s).is_some() {
                    info!("peer lease {s} removed");
                }
                false
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
    ) -> (Vec<Peer>, Vec<(IpNet, String)>) {
        let mut skipped = Vec::new();
        let mut peers = Vec::with_capacity(self.leases.len());
        for l in self.leases.values() {
            if l.attrs.backend_type != backend_type {
                if !fam.v6 {
                    skipped
                        .push((l.subnet, format!("backend {} (this node runs {backend_type})", l.attrs.backend_type)));
                }
                continue;
            }
            let (subnet, public_ip, data) = if fam.v6 {
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
            if let Some(why) = refuse(public_ip) {
                skipped.push((subnet, why));
                continue;
            }
            let vtep_mac = data.and_then(|d| parse_mac(&d.vtep_mac));
            peers.push(Peer { subnet, public_ip, vtep_mac });
        }
        (peers, skipped)
    }
}
