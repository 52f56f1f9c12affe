//! An in-memory kernel for the commands' unit tests: a host namespace and a
//! pod namespace, with links, addresses, routes and sysctls, and the
//! semantics the commands rely on: names are unique per namespace (EEXIST), a
//! veth's peer is born in the other namespace and deleting either end removes
//! both, deleting a link takes its addresses and routes along, unknown links
//! are "not found", and a route's gateway must be on a connected subnet of
//! its device, which must be up (ENETUNREACH, ENETDOWN otherwise, as the kernel
//! says).

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::rc::Rc;

use flannel_shared::netlink::{Address, Link, NetlinkError, Result, Route, VethSpec};
use flannel_shared::{IpNet, Mac};

use super::Kernel;

/// One namespace's objects.
#[derive(Debug, Default)]
pub struct Ns {
    pub links: Vec<Link>,
    pub addresses: Vec<Address>,
    pub routes: Vec<Route>,
    pub sysctls: HashMap<String, String>,
}

#[derive(Debug, Default)]
struct World {
    ns: [Ns; 2],
    /// Veth pairs as ((namespace, index), (namespace, index)).
    pairs: Vec<((usize, u32), (usize, u32))>,
    /// Link indexes are unique across the world, which keeps the pairs simple.
    next_index: u32,
}

/// One namespace of the world; [`pair`] makes the host and the pod.
#[derive(Clone, Debug)]
pub struct FakeKernel {
    world: Rc<RefCell<World>>,
    ns: usize,
}

const HOST: usize = 0;
const POD: usize = 1;

/// The node's namespace (with `ip_forward` off) and a fresh pod namespace
/// (`lo`, down); veths the host creates have their peer in the pod.
pub fn pair() -> (FakeKernel, FakeKernel) {
    let world = Rc::new(RefCell::new(World { next_index: 1, ..World::default() }));
    {
        let mut w = world.borrow_mut();
        for ns in [HOST, POD] {
            let index = w.new_index();
            w.ns[ns].links.push(link(index, "lo", None, 65536, None));
        }
        w.ns[HOST].sysctls.insert("net/ipv4/ip_forward".into(), "0".into());
    }
    (FakeKernel { world: world.clone(), ns: HOST }, FakeKernel { world, ns: POD })
}

fn link(index: u32, name: &str, kind: Option<&str>, mtu: u32, mac: Option<Mac>) -> Link {
    Link {
        index,
        name: name.to_string(),
        mac,
        mtu,
        up: false,
        promisc: false,
        master: None,
        kind: kind.map(String::from),
        hairpin: None,
        vxlan: None,
    }
}

fn not_found(op: &str) -> NetlinkError {
    NetlinkError::NotFound { op: op.to_string() }
}

fn exists(op: &str) -> NetlinkError {
    NetlinkError::Exists { op: op.to_string() }
}

impl World {
    fn new_index(&mut self) -> u32 {
        self.next_index += 1;
        self.next_index
    }

    fn remove_link(&mut self, ns: usize, index: u32) {
        let n = &mut self.ns[ns];
        n.links.retain(|l| l.index != index);
        n.addresses.retain(|a| a.index != index);
        n.routes.retain(|r| r.oif != Some(index));
        for l in n.links.iter_mut().filter(|l| l.master == Some(index)) {
            l.master = None;
        }
    }
}

impl Ns {
    fn link_mut(&mut self, index: u32, op: &str) -> Result<&mut Link> {
        self.links.iter_mut().find(|l| l.index == index).ok_or_else(|| not_found(op))
    }

    pub fn link(&self, name: &str) -> Option<&Link> {
        self.links.iter().find(|l| l.name == name)
    }

    /// Addresses of the link `name`, as strings.
    pub fn addresses_of(&self, name: &str) -> Vec<String> {
        let Some(l) = self.link(name) else { return Vec::new() };
        self.addresses.iter().filter(|a| a.index == l.index).map(|a| a.net.to_string()).collect()
    }

    /// Routes as `dst [via gw] dev NAME`, sorted.
    pub fn route_lines(&self) -> Vec<String> {
        let name = |i: Option<u32>| {
            i.and_then(|i| self.links.iter().find(|l| l.index == i)).map(|l| l.name.clone()).unwrap_or_default()
        };
        let mut v: Vec<String> = self
            .routes
            .iter()
            .map(|r| {
                let via = r.gateway.map(|g| format!(" via {g}")).unwrap_or_default();
                format!("{}{via} dev {}", r.dst, name(r.oif))
            })
            .collect();
        v.sort();
        v
    }
}

impl FakeKernel {
    /// Reads this namespace.
    pub fn with<T>(&self, f: impl FnOnce(&Ns) -> T) -> T {
        f(&self.world.borrow().ns[self.ns])
    }

    /// Changes this namespace behind the commands' back.
    pub fn tamper(&self, f: impl FnOnce(&mut Ns)) {
        f(&mut self.world.borrow_mut().ns[self.ns])
    }

    fn ns_mut<T>(&self, f: impl FnOnce(&mut Ns) -> Result<T>) -> Result<T> {
        f(&mut self.world.borrow_mut().ns[self.ns])
    }

    fn set_link(&self, index: u32, op: &str, f: impl FnOnce(&mut Link)) -> Result<()> {
        self.ns_mut(|n| {
            f(n.link_mut(index, op)?);
            Ok(())
        })
    }
}

impl Kernel for FakeKernel {
    async fn link_by_name(&self, name: &str) -> Result<Option<Link>> {
        Ok(self.with(|n| n.link(name).cloned()))
    }

    async fn create_bridge(&self, name: &str, mac: Mac, mtu: u32, promisc: bool) -> Result<()> {
        let mut w = self.world.borrow_mut();
        if w.ns[self.ns].link(name).is_some() {
            return Err(exists(&format!("create bridge {name}")));
        }
        let index = w.new_index();
        let mut l = link(index, name, Some("bridge"), mtu, Some(mac));
        l.promisc = promisc;
        w.ns[self.ns].links.push(l);
        Ok(())
    }

    async fn create_veth(&self, spec: &VethSpec<'_>) -> Result<()> {
        let op = format!("create veth {}/{}", spec.name, spec.peer_name);
        let mut w = self.world.borrow_mut();
        let peer_ns = 1 - self.ns;
        if w.ns[self.ns].link(spec.name).is_some() || w.ns[peer_ns].link(spec.peer_name).is_some() {
            return Err(exists(&op));
        }
        if let Some(m) = spec.master
            && !w.ns[self.ns].links.iter().any(|l| l.index == m)
        {
            return Err(not_found(&op));
        }
        let (a, b) = (w.new_index(), w.new_index());
        let mut here = link(a, spec.name, Some("veth"), spec.mtu, Some(Mac([0x0e, 0, 0, 0, 0, a as u8])));
        here.master = spec.master;
        here.up = spec.up;
        if spec.master.is_some() {
            here.hairpin = Some(false);
        }
        w.ns[self.ns].links.push(here);
        w.ns[peer_ns].links.push(link(
            b,
            spec.peer_name,
            Some("veth"),
            spec.mtu,
            Some(Mac([0x0e, 0, 0, 0, 0, b as u8])),
        ));
        w.pairs.push(((self.ns, a), (peer_ns, b)));
        Ok(())
    }

    async fn del_link(&self, index: u32) -> Result<()> {
        let mut w = self.world.borrow_mut();
        if !w.ns[self.ns].links.iter().any(|l| l.index == index) {
            return Err(not_found("del link"));
        }
        w.remove_link(self.ns, index);
        let me = (self.ns, index);
        if let Some(p) = w.pairs.iter().position(|(x, y)| *x == me || *y == me) {
            let (x, y) = w.pairs.remove(p);
            let (ns, i) = if x == me { y } else { x };
            w.remove_link(ns, i);
        }
        Ok(())
    }

    async fn set_up(&self, index: u32) -> Result<()> {
        self.set_link(index, "set up", |l| l.up = true)
    }

    async fn set_mtu(&self, index: u32, mtu: u32) -> Result<()> {
        self.set_link(index, "set mtu", |l| l.mtu = mtu)
    }

    async fn set_promisc(&self, index: u32, on: bool) -> Result<()> {
        self.set_link(index, "set promisc", |l| l.promisc = on)
    }

    async fn set_hairpin(&self, index: u32, on: bool) -> Result<()> {
        self.ns_mut(|n| {
            let l = n.link_mut(index, "set hairpin")?;
            if l.master.is_none() {
                return Err(NetlinkError::Other { op: "set hairpin".into(), msg: "not a bridge port".into() });
            }
            l.hairpin = Some(on);
            Ok(())
        })
    }

    async fn addresses(&self, index: Option<u32>) -> Result<Vec<Address>> {
        Ok(self.with(|n| n.addresses.iter().filter(|a| index.is_none_or(|i| a.index == i)).cloned().collect()))
    }

    async fn add_address(&self, index: u32, net: IpNet) -> Result<()> {
        self.ns_mut(|n| {
            n.link_mut(index, "add address")?;
            if n.addresses.iter().any(|a| a.index == index && a.net == net) {
                return Err(exists("add address"));
            }
            n.addresses.push(Address { index, net });
            Ok(())
        })
    }

    async fn del_address(&self, index: u32, net: IpNet) -> Result<()> {
        self.ns_mut(|n| {
            n.addresses.retain(|a| !(a.index == index && a.net == net));
            Ok(())
        })
    }

    async fn routes(&self, v4: bool, table: Option<u32>) -> Result<Vec<Route>> {
        Ok(self.with(|n| {
            n.routes.iter().filter(|r| r.dst.is_ipv4() == v4 && table.is_none_or(|t| r.table == t)).cloned().collect()
        }))
    }

    async fn replace_route(&self, route: &Route) -> Result<()> {
        let op = format!("replace route {} via {:?}", route.dst, route.gateway);
        self.ns_mut(|n| {
            let errno = |e| NetlinkError::Kernel { op: op.clone(), source: io::Error::from_raw_os_error(e) };
            let Some(oif) = route.oif else { return Err(not_found(&op)) };
            match n.links.iter().find(|l| l.index == oif) {
                None => return Err(not_found(&op)),
                Some(l) if !l.up => return Err(errno(libc::ENETDOWN)),
                Some(_) => {}
            }
            if let Some(gw) = route.gateway
                && !route.onlink
                && !n.addresses.iter().any(|a| a.index == oif && a.net.network().contains(gw))
            {
                return Err(errno(libc::ENETUNREACH));
            }
            n.routes.retain(|r| !(r.dst == route.dst && r.table == route.table && r.metric == route.metric));
            n.routes.push(route.clone());
            Ok(())
        })
    }

    fn sysctl(&self, key: &str) -> io::Result<String> {
        self.with(|n| n.sysctls.get(key).cloned()).ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
    }

    fn set_sysctl(&self, key: &str, value: &str) -> io::Result<()> {
        self.tamper(|n| {
            n.sysctls.insert(key.to_string(), value.to_string());
        });
        Ok(())
    }
}
