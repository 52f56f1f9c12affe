//! The data path as a function of the leases: compute the routes, ARP and FDB
//! entries every peer needs, read what the kernel has with one dump per kind,
//! apply only the difference. Routes this agent owns carry [`RTPROT_FLANNEL`],
//! so nothing else in the table is ever touched.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

use flannel_shared::IpNet;
use flannel_shared::Mac;
use flannel_shared::netlink::{Idempotent, NetlinkError, RT_TABLE_MAIN, Route};

use crate::kernel::Kernel;

pub use flannel_shared::netlink::RTPROT_FLANNEL;

/// What a backend needs to know of a peer's lease in one family: where it is,
/// and `data`, what the backend decoded from the family's backend data
/// ([`crate::backend::Backend::PeerData`]: vxlan's VtepMAC), `None` when
/// the lease's data does not decode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer<D = ()> {
    pub subnet: IpNet,
    pub public_ip: IpAddr,
    pub data: Option<D>,
}

/// The kernel state the peers call for, as the backend computes it
/// ([`crate::backend::Backend::desired`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    /// The device the ARP/NDP and FDB entries live on (vxlan's VTEP), if any.
    pub device: Option<u32>,
    pub routes: Vec<Route>,
    /// ARP/NDP on `device`: peer gateway -> its MAC.
    pub neighbours: HashMap<IpAddr, Mac>,
    /// FDB on `device`: MAC -> peer public IP.
    pub fdb: HashMap<Mac, IpAddr>,
    /// Peers that could not be programmed, with the reason.
    pub skipped: Vec<(IpNet, String)>,
}

impl Desired {
    pub fn on(device: Option<u32>) -> Desired {
        Desired { device, ..Desired::default() }
    }
}

/// What one pass changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub routes_added: usize,
    pub routes_removed: usize,
    pub neighbours_set: usize,
    pub neighbours_removed: usize,
    pub fdb_set: usize,
    pub fdb_removed: usize,
}

impl Applied {
    pub fn is_noop(&self) -> bool {
        *self == Applied::default()
    }
}

pub(crate) fn same_route(a: &Route, b: &Route) -> bool {
    a.dst == b.dst
        && a.gateway == b.gateway
        && a.oif == b.oif
        && a.onlink == b.onlink
        && a.kind == b.kind
        && effective_metric(a) == effective_metric(b)
}

/// The metric the kernel gives a route: IPv6 routes added without one get 1024
/// (IP6_RT_PRIO_USER) and are dumped with it; IPv4 ones keep 0.
fn effective_metric(r: &Route) -> u32 {
    if r.metric == 0 && !r.dst.is_ipv4() { 1024 } else { r.metric }
}

/// Netlink requests kept in flight at once: the kernel answers them in order,
/// and not waiting for each ack makes a 5,000-peer pass several times faster.
const WINDOW: usize = 64;

/// Runs the requests with up to [`WINDOW`] in flight; how many ran, or the first error.
async fn pipelined<F>(requests: impl Iterator<Item = F>) -> Result<usize, NetlinkError>
where
    F: std::future::Future<Output = Result<(), NetlinkError>>,
{
    use futures_util::StreamExt;
    let mut results = futures_util::stream::iter(requests).buffer_unordered(WINDOW);
    let mut n = 0;
    while let Some(r) = results.next().await {
        r?;
        n += 1;
    }
    Ok(n)
}

/// Brings the kernel in line with `want`. `vtep` is the VXLAN device whose
/// ARP and FDB entries this agent owns (none for host-gw).
///
/// Order matters for traffic: ARP and FDB entries go in before the routes
/// that use them, and stale routes go before the entries they used, so a
/// packet never follows a route to a half-programmed peer.
pub async fn apply<K: Kernel>(nl: &K, want: &Desired, vtep: Option<u32>) -> Result<Applied, NetlinkError> {
    apply_family(nl, want, vtep, true, true).await
}

/// [`apply`] for one address family: only routes of that family are read,
/// added or removed (a dual-stack agent runs one pass per family, each with
/// its own VTEP). Without `prune`, entries `want` lacks are left alone: before
/// the first full lease listing, `want` is only part of the peers (none at all
/// right after a restart), and what the previous run programmed must keep
/// carrying traffic until the listing says it is stale.
pub async fn apply_family<K: Kernel>(
    nl: &K,
    want: &Desired,
    vtep: Option<u32>,
    v4: bool,
    prune: bool,
) -> Result<Applied, NetlinkError> {
    let mut done = Applied::default();

    // One dump per kind, taken up front.
    let routes = nl.routes(v4, Some(RT_TABLE_MAIN)).await?;
    let (neigh, fdb) = match vtep {
        Some(v) => (nl.neighbours(v, false).await?, nl.neighbours(v, true).await?),
        None => (Vec::new(), Vec::new()),
    };

    if let Some(vtep) = vtep {
        let have: HashMap<IpAddr, Mac> =
            neigh.iter().filter(|n| n.permanent).filter_map(|n| Some((n.ip?, n.mac?))).collect();
        let todo = want.neighbours.iter().filter(|(ip, mac)| have.get(*ip) != Some(*mac));
        done.neighbours_set = pipelined(todo.map(|(ip, mac)| nl.replace_neighbour(vtep, *ip, *mac))).await?;
        // Entries without a remote (the device's own) are not ours.
        let have: HashSet<(Mac, IpAddr)> = fdb.iter().filter_map(|n| Some((n.mac?, n.ip?))).collect();
        let todo = want.fdb.iter().filter(|(mac, dst)| !have.contains(&(**mac, **dst)));
        done.fdb_set = pipelined(todo.map(|(mac, dst)| nl.replace_fdb(vtep, *mac, *dst))).await?;
    }

    let owned: Vec<&Route> = routes.iter().filter(|r| r.protocol == RTPROT_FLANNEL).collect();
    let mut by_dst: HashMap<IpNet, Vec<&Route>> = HashMap::new();
    for h in &owned {
        by_dst.entry(h.dst).or_default().push(h);
    }
    let todo: Vec<&Route> = want
        .routes
        .iter()
        .filter(|r| r.dst.is_ipv4() == v4)
        .filter(|r| !by_dst.get(&r.dst).is_some_and(|hs| hs.iter().any(|h| same_route(h, r))))
        .collect();
    if !v4 {
        // IPv6 refuses to replace a route by one through another device whose gateway
        // lies inside the old route ("Nexthop has invalid gateway or device mismatch"),
        // which is what a switch to vxlan asks (the gateway is `<subnet>::`): the old
        // route goes first.
        for r in &todo {
            for h in by_dst.get(&r.dst).into_iter().flatten().filter(|h| h.oif != r.oif) {
                nl.del_route(h).await.ignore_not_found()?;
            }
        }
    }
    done.routes_added = pipelined(todo.into_iter().map(|r| nl.replace_route(r))).await?;
    if !prune {
        return Ok(done);
    }
    // A replace above already swapped any owned route with the same destination;
    // what remains stale is an owned route whose lease is gone.
    let wanted_dsts: HashSet<IpNet> = want.routes.iter().map(|r| r.dst).collect();
    for h in owned {
        if !wanted_dsts.contains(&h.dst) {
            match nl.del_route(h).await {
                Ok(()) => done.routes_removed += 1,
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e),
            }
        }
    }

    let Some(vtep) = vtep else { return Ok(done) };
    for n in neigh.iter().filter(|n| n.permanent) {
        if let Some(ip) = n.ip
            && !want.neighbours.contains_key(&ip)
        {
            match nl.del_neighbour(vtep, ip).await {
                Ok(()) => done.neighbours_removed += 1,
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e),
            }
        }
    }
    for n in &fdb {
        if let (Some(mac), Some(dst)) = (n.mac, n.ip)
            && want.fdb.get(&mac) != Some(&dst)
        {
            match nl.del_fdb(vtep, mac, dst).await {
                Ok(()) => done.fdb_removed += 1,
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(done)
}

/// One kernel write of the incremental path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    SetNeighbour(IpAddr, Mac),
    SetFdb(Mac, IpAddr),
    ReplaceRoute(Route),
    DelRoute(Route),
    DelNeighbour(IpAddr),
    DelFdb(Mac, IpAddr),
}

/// The notification a write of ours comes back as (see `kernel::watch`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Echo {
    Route(IpNet),
    Neighbour { index: u32, fdb: bool },
}

impl Op {
    /// What the kernel will notify for this write; `vtep` is the device ARP/FDB entries live on.
    pub fn echo(&self, vtep: Option<u32>) -> Option<Echo> {
        match self {
            Op::ReplaceRoute(r) | Op::DelRoute(r) => Some(Echo::Route(r.dst)),
            Op::SetNeighbour(..) | Op::DelNeighbour(_) => vtep.map(|index| Echo::Neighbour { index, fdb: false }),
            Op::SetFdb(..) | Op::DelFdb(..) => vtep.map(|index| Echo::Neighbour { index, fdb: true }),
        }
    }
}

/// The writes that take one peer from `old` to `new` (either absent: added or
/// removed), and how the counts of routes, neighbours and FDB entries change.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerPlan {
    pub ops: Vec<Op>,
    pub routes: i64,
    pub neighbours: i64,
    pub fdb: i64,
}

/// Plans one peer's change from the backend's desired state for that peer
/// before (`was`) and now (`want`), the same the full pass uses, so the two
/// cannot disagree on what is correct: only entries that differ are
/// written (every write is a real change the kernel notifies once), in the
/// full pass's order: ARP/FDB before the routes that use them, stale routes
/// before the entries they used. Nothing is read from the kernel.
pub fn plan_peer(was: &Desired, want: &Desired, v4: bool) -> PeerPlan {
    let mut ops = Vec::new();
    for (ip, mac) in &want.neighbours {
        if was.neighbours.get(ip) != Some(mac) {
            ops.push(Op::SetNeighbour(*ip, *mac));
        }
    }
    for (mac, dst) in &want.fdb {
        if was.fdb.get(mac) != Some(dst) {
            ops.push(Op::SetFdb(*mac, *dst));
        }
    }
    for r in &want.routes {
        let prev = was.routes.iter().find(|h| h.dst == r.dst);
        if prev.is_some_and(|h| same_route(h, r)) {
            continue;
        }
        // IPv6 will not replace a route by one through another device (see apply_family).
        if !v4 && let Some(h) = prev.filter(|h| h.oif != r.oif) {
            ops.push(Op::DelRoute(h.clone()));
        }
        ops.push(Op::ReplaceRoute(r.clone()));
    }
    for h in &was.routes {
        if !want.routes.iter().any(|r| r.dst == h.dst) {
            ops.push(Op::DelRoute(h.clone()));
        }
    }
    for ip in was.neighbours.keys() {
        if !want.neighbours.contains_key(ip) {
            ops.push(Op::DelNeighbour(*ip));
        }
    }
    for (mac, dst) in &was.fdb {
        if want.fdb.get(mac) != Some(dst) {
            ops.push(Op::DelFdb(*mac, *dst));
        }
    }
    let delta = |a: usize, b: usize| a as i64 - b as i64;
    PeerPlan {
        ops,
        routes: delta(want.routes.len(), was.routes.len()),
        neighbours: delta(want.neighbours.len(), was.neighbours.len()),
        fdb: delta(want.fdb.len(), was.fdb.len()),
    }
}

/// Runs planned writes in order. A delete of something already gone is not an error.
pub async fn run_ops<K: Kernel>(nl: &K, ops: &[Op], vtep: Option<u32>) -> Result<Applied, NetlinkError> {
    let mut done = Applied::default();
    let no_vtep = || NetlinkError::Other { op: "ARP/FDB entry".into(), msg: "no VXLAN device to put it on".into() };
    for op in ops {
        match op {
            Op::SetNeighbour(ip, mac) => {
                nl.replace_neighbour(vtep.ok_or_else(no_vtep)?, *ip, *mac).await?;
                done.neighbours_set += 1;
            }
            Op::SetFdb(mac, dst) => {
                nl.replace_fdb(vtep.ok_or_else(no_vtep)?, *mac, *dst).await?;
                done.fdb_set += 1;
            }
            Op::ReplaceRoute(r) => {
                nl.replace_route(r).await?;
                done.routes_added += 1;
            }
            Op::DelRoute(r) => {
                if nl.del_route(r).await.map(|()| true).or_else(gone)? {
                    done.routes_removed += 1;
                }
            }
            Op::DelNeighbour(ip) => {
                if nl.del_neighbour(vtep.ok_or_else(no_vtep)?, *ip).await.map(|()| true).or_else(gone)? {
                    done.neighbours_removed += 1;
                }
            }
            Op::DelFdb(mac, dst) => {
                if nl.del_fdb(vtep.ok_or_else(no_vtep)?, *mac, *dst).await.map(|()| true).or_else(gone)? {
                    done.fdb_removed += 1;
                }
            }
        }
    }
    Ok(done)
}

/// A delete that found nothing: fine, the entry is gone either way.
fn gone(e: NetlinkError) -> Result<bool, NetlinkError> {
    if e.is_not_found() { Ok(false) } else { Err(e) }
}
