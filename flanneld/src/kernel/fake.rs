//! An in-memory kernel for the agent's unit tests: links, addresses, routes,
//! neighbours and FDB entries with the semantics the agent relies on
//! (replace by key, deleting a link takes its entries along, unknown links
//! are "not found"), and a way for a test to break things behind the agent's back.

use std::cell::RefCell;
use std::net::IpAddr;
use std::sync::Arc;

use flannel_shared::IpNet;
use flannel_shared::Mac;
use flannel_shared::netlink::{
    Address, Link, Neighbour, NetlinkError, RT_TABLE_MAIN, Result, Route, VxlanInfo, VxlanSpec,
};

use super::Kernel;
use super::watch::KernelWatch;
use crate::metrics::Metrics;

#[derive(Debug, Default)]
pub struct State {
    pub links: Vec<Link>,
    pub addresses: Vec<Address>,
    pub routes: Vec<Route>,
    pub neighbours: Vec<Neighbour>,
    /// FDB entries (`ip` is the VXLAN remote).
    pub fdb: Vec<Neighbour>,
    next_index: u32,
    next_mac: u8,
    /// Netlink writes so far (replace/del of routes, neighbours, FDB entries; link changes).
    pub writes: usize,
    /// Devices whose IPv6 router advertisements were turned off.
    pub accept_ra_off: Vec<String>,
    /// Whether `ip link add type wireguard` works (this machine's kernel: no).
    pub wireguard: bool,
}

/// The fake; `Clone` shares the state, so a test keeps a handle while the agent owns one.
#[derive(Clone, Debug, Default)]
pub struct FakeKernel {
    state: std::rc::Rc<RefCell<State>>,
}

fn not_found(op: &str) -> NetlinkError {
    NetlinkError::NotFound { op: op.to_string() }
}

impl FakeKernel {
    /// A node with `lo` and `eth0` at `addr` (e.g. `192.0.2.1/24`), MTU 1500, and a default route through it.
    pub fn node(addr: &str) -> FakeKernel {
        let k = FakeKernel::default();
        {
            let mut s = k.state.borrow_mut();
            s.next_index = 3;
            for (index, name) in [(1, "lo"), (2, "eth0")] {
                s.links.push(Link {
                    index,
                    name: name.into(),
                    mac: Some(Mac([2, 0, 0, 0, 0, index as u8])),
                    mtu: if index == 1 { 65536 } else { 1500 },
                    up: true,
                    promisc: false,
                    master: None,
                    kind: None,
                    hairpin: None,
                    vxlan: None,
                });
            }
            let net: IpNet = addr.parse().expect("address");
            s.addresses.push(Address { index: 2, net });
            let gw = net.network().nth(254).expect("gateway");
            s.routes.push(Route::new("0.0.0.0/0".parse().expect("default")).via(gw).dev(2));
            s.routes.push(Route::new(net.network()).dev(2).protocol(2).scope_link());
        }
        k
    }

    /// Reads the state.
    pub fn with<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        f(&self.state.borrow())
    }

    /// Changes the state behind the agent's back.
    pub fn tamper(&self, f: impl FnOnce(&mut State)) {
        f(&mut self.state.borrow_mut())
    }

    pub fn link(&self, name: &str) -> Option<Link> {
        self.with(|s| s.links.iter().find(|l| l.name == name).cloned())
    }

    /// Routes of the main table with protocol `proto`, as `dst via gw dev N` strings, sorted.
    pub fn routes_by(&self, proto: u8) -> Vec<String> {
        let mut v: Vec<String> = self.with(|s| {
            s.routes
                .iter()
                .filter(|r| r.protocol == proto)
                .map(|r| {
                    let via = r.gateway.map(|g| format!(" via {g}")).unwrap_or_default();
                    let dev = r.oif.map(|i| format!(" dev {i}")).unwrap_or_default();
                    format!("{}{via}{dev}{}", r.dst, if r.onlink { " onlink" } else { "" })
                })
                .collect()
        });
        v.sort();
        v
    }

    /// Deletes a link and what hangs off it, as `ip link del` would.
    pub fn remove_link(&self, name: &str) {
        let mut s = self.state.borrow_mut();
        if let Some(i) = s.links.iter().position(|l| l.name == name) {
            let index = s.links.remove(i).index;
            drop_entries(&mut s, index);
        }
    }
}

fn drop_entries(s: &mut State, index: u32) {
    s.addresses.retain(|a| a.index != index);
    s.routes.retain(|r| r.oif != Some(index));
    s.neighbours.retain(|n| n.index != index);
    s.fdb.retain(|n| n.index != index);
}

impl State {
    fn link_mut(&mut self, index: u32, op: &str) -> Result<&mut Link> {
        self.links.iter_mut().find(|l| l.index == index).ok_or_else(|| not_found(op))
    }

    fn has_link(&self, index: u32, op: &str) -> Result<()> {
        self.links.iter().any(|l| l.index == index).then_some(()).ok_or_else(|| not_found(op))
    }
}

/// What identifies a route for replace and delete: destination, table, metric.
fn same_key(a: &Route, b: &Route) -> bool {
    a.dst == b.dst && a.table == b.table && a.metric == b.metric
}

impl Kernel for FakeKernel {
    async fn links(&self) -> Result<Vec<Link>> {
        Ok(self.with(|s| s.links.clone()))
    }

    async fn link_by_name(&self, name: &str) -> Result<Option<Link>> {
        Ok(self.link(name))
    }

    async fn create_vxlan(&self, spec: &VxlanSpec<'_>) -> Result<()> {
        let mut s = self.state.borrow_mut();
        if s.links.iter().any(|l| l.name == spec.name) {
            return Err(NetlinkError::Exists { op: format!("create {}", spec.name) });
        }
        s.writes += 1;
        s.next_index += 1;
        s.next_mac += 1;
        let (index, mac) = (s.next_index, spec.mac.unwrap_or(Mac([0x0e, 0, 0, 0, 0, s.next_mac])));
        s.links.push(Link {
            index,
            name: spec.name.to_string(),
            mac: Some(mac),
            mtu: spec.mtu.unwrap_or(1500),
            up: false,
            promisc: false,
            master: None,
            kind: Some("vxlan".into()),
            hairpin: None,
            vxlan: Some(VxlanInfo {
                vni: spec.vni,
                port: spec.port,
                local: spec.local,
                uplink: spec.uplink,
                learning: spec.learning,
                gbp: spec.gbp,
            }),
        });
        Ok(())
    }

    async fn create_wireguard(&self, name: &str, mtu: u32) -> Result<()> {
        let mut s = self.state.borrow_mut();
        let op = format!("create wireguard {name}");
        if !s.wireguard {
            return Err(NetlinkError::Kernel { op, source: std::io::Error::from_raw_os_error(libc::EOPNOTSUPP) });
        }
        if s.links.iter().any(|l| l.name == name) {
            return Err(NetlinkError::Exists { op });
        }
        s.writes += 1;
        s.next_index += 1;
        let index = s.next_index;
        s.links.push(Link {
            index,
            name: name.to_string(),
            mac: None,
            mtu,
            up: false,
            promisc: false,
            master: None,
            kind: Some("wireguard".into()),
            hairpin: None,
            vxlan: None,
        });
        Ok(())
    }

    async fn del_link(&self, index: u32) -> Result<()> {
        let mut s = self.state.borrow_mut();
        s.has_link(index, "del link")?;
        s.writes += 1;
        s.links.retain(|l| l.index != index);
        drop_entries(&mut s, index);
        Ok(())
    }

    async fn set_up(&self, index: u32) -> Result<()> {
        let mut s = self.state.borrow_mut();
        s.link_mut(index, "set up")?.up = true;
        Ok(())
    }

    async fn set_mtu(&self, index: u32, mtu: u32) -> Result<()> {
        let mut s = self.state.borrow_mut();
        s.link_mut(index, "set mtu")?.mtu = mtu;
        Ok(())
    }

    async fn addresses(&self, index: Option<u32>) -> Result<Vec<Address>> {
        Ok(self.with(|s| s.addresses.iter().filter(|a| index.is_none_or(|i| a.index == i)).cloned().collect()))
    }

    async fn add_address(&self, index: u32, net: IpNet) -> Result<()> {
        let mut s = self.state.borrow_mut();
        s.has_link(index, "add address")?;
        if s.addresses.iter().any(|a| a.index == index && a.net == net) {
            return Err(NetlinkError::Exists { op: format!("add address {net}") });
        }
        s.addresses.push(Address { index, net });
        Ok(())
    }

    async fn del_address(&self, index: u32, net: IpNet) -> Result<()> {
        let mut s = self.state.borrow_mut();
        let before = s.addresses.len();
        s.addresses.retain(|a| !(a.index == index && a.net == net));
        if s.addresses.len() == before { Err(not_found("del address")) } else { Ok(()) }
    }

    async fn routes(&self, v4: bool, table: Option<u32>) -> Result<Vec<Route>> {
        Ok(self.with(|s| {
            s.routes.iter().filter(|r| r.dst.is_ipv4() == v4 && table.is_none_or(|t| r.table == t)).cloned().collect()
        }))
    }

    async fn replace_route(&self, route: &Route) -> Result<()> {
        let mut s = self.state.borrow_mut();
        if let Some(oif) = route.oif {
            s.has_link(oif, "replace route")?;
        }
        s.writes += 1;
        let mut r = route.clone();
        if r.table == 0 {
            r.table = RT_TABLE_MAIN;
        }
        s.routes.retain(|h| !same_key(h, &r));
        s.routes.push(r);
        Ok(())
    }

    async fn del_route(&self, route: &Route) -> Result<()> {
        let mut s = self.state.borrow_mut();
        let before = s.routes.len();
        s.routes.retain(|h| !same_key(h, route));
        s.writes += 1;
        if s.routes.len() == before { Err(not_found("del route")) } else { Ok(()) }
    }

    async fn neighbours(&self, index: u32, fdb: bool) -> Result<Vec<Neighbour>> {
        Ok(self.with(|s| {
            let from = if fdb { &s.fdb } else { &s.neighbours };
            from.iter().filter(|n| n.index == index).cloned().collect()
        }))
    }

    async fn replace_neighbour(&self, index: u32, ip: IpAddr, mac: Mac) -> Result<()> {
        let mut s = self.state.borrow_mut();
        s.has_link(index, "replace neighbour")?;
        s.writes += 1;
        s.neighbours.retain(|n| !(n.index == index && n.ip == Some(ip)));
        s.neighbours.push(Neighbour { index, ip: Some(ip), mac: Some(mac), permanent: true });
        Ok(())
    }

    async fn del_neighbour(&self, index: u32, ip: IpAddr) -> Result<()> {
        let mut s = self.state.borrow_mut();
        let before = s.neighbours.len();
        s.neighbours.retain(|n| !(n.index == index && n.ip == Some(ip)));
        s.writes += 1;
        if s.neighbours.len() == before { Err(not_found("del neighbour")) } else { Ok(()) }
    }

    async fn replace_fdb(&self, index: u32, mac: Mac, dst: IpAddr) -> Result<()> {
        let mut s = self.state.borrow_mut();
        s.has_link(index, "replace fdb")?;
        s.writes += 1;
        s.fdb.retain(|n| !(n.index == index && n.mac == Some(mac)));
        s.fdb.push(Neighbour { index, ip: Some(dst), mac: Some(mac), permanent: true });
        Ok(())
    }

    async fn del_fdb(&self, index: u32, mac: Mac, dst: IpAddr) -> Result<()> {
        let mut s = self.state.borrow_mut();
        let before = s.fdb.len();
        s.fdb.retain(|n| !(n.index == index && n.mac == Some(mac) && n.ip == Some(dst)));
        s.writes += 1;
        if s.fdb.len() == before { Err(not_found("del fdb")) } else { Ok(()) }
    }

    fn disable_accept_ra(&self, name: &str) -> std::io::Result<bool> {
        let mut s = self.state.borrow_mut();
        if s.accept_ra_off.iter().any(|n| n == name) {
            return Ok(false);
        }
        s.accept_ra_off.push(name.to_string());
        Ok(true)
    }

    fn watch(&self, _metrics: Arc<Metrics>) -> KernelWatch {
        KernelWatch::inert()
    }
}
