//! The kernel as the agent sees it: the few netlink verbs the reconciler,
//! the backends and the uplink lookup use, and the change notifications.
//! [`Netlink`] is the real one; the agent's unit tests run against an
//! in-memory kernel (`fake`), so its event handling needs no root.

#[cfg(test)]
pub mod fake;
pub mod watch;

use std::sync::Arc;

use flannel_shared::IpNet;
use flannel_shared::Mac;
use flannel_shared::netlink::{Address, Link, Neighbour, Netlink, Result, Route, VxlanSpec};

use crate::metrics::Metrics;
use watch::KernelWatch;

/// The agent runs on a single-threaded runtime, so these futures need not be `Send`.
#[allow(async_fn_in_trait)]
pub trait Kernel {
    async fn links(&self) -> Result<Vec<Link>>;
    async fn link_by_name(&self, name: &str) -> Result<Option<Link>>;
    async fn create_vxlan(&self, spec: &VxlanSpec<'_>) -> Result<()>;
    /// A kernel WireGuard device; EOPNOTSUPP where the kernel has no WireGuard.
    async fn create_wireguard(&self, name: &str, mtu: u32) -> Result<()>;
    async fn del_link(&self, index: u32) -> Result<()>;
    async fn set_up(&self, index: u32) -> Result<()>;
    async fn set_mtu(&self, index: u32, mtu: u32) -> Result<()>;
    /// Addresses of one link, or of all links.
    async fn addresses(&self, index: Option<u32>) -> Result<Vec<Address>>;
    async fn add_address(&self, index: u32, net: IpNet) -> Result<()>;
    async fn del_address(&self, index: u32, net: IpNet) -> Result<()>;
    /// One family's routes, optionally of one table only.
    async fn routes(&self, v4: bool, table: Option<u32>) -> Result<Vec<Route>>;
    async fn replace_route(&self, route: &Route) -> Result<()>;
    async fn del_route(&self, route: &Route) -> Result<()>;
    /// ARP/NDP entries of a link, or its bridge FDB entries when `fdb`.
    async fn neighbours(&self, index: u32, fdb: bool) -> Result<Vec<Neighbour>>;
    async fn replace_neighbour(&self, index: u32, ip: std::net::IpAddr, mac: Mac) -> Result<()>;
    async fn del_neighbour(&self, index: u32, ip: std::net::IpAddr) -> Result<()>;
    async fn replace_fdb(&self, index: u32, mac: Mac, dst: std::net::IpAddr) -> Result<()>;
    async fn del_fdb(&self, index: u32, mac: Mac, dst: std::net::IpAddr) -> Result<()>;
    /// Turns off IPv6 router advertisements on a device (`net.ipv6.conf.<name>.accept_ra = 0`,
    /// as upstream does for its VXLAN devices); returns whether it had to.
    fn disable_accept_ra(&self, name: &str) -> std::io::Result<bool>;
    /// Notifications of changes to what the agent owns.
    fn watch(&self, metrics: Arc<Metrics>) -> KernelWatch;
}

impl Kernel for Netlink {
    async fn links(&self) -> Result<Vec<Link>> {
        Netlink::links(self).await
    }
    async fn link_by_name(&self, name: &str) -> Result<Option<Link>> {
        Netlink::link_by_name(self, name).await
    }
    async fn create_vxlan(&self, spec: &VxlanSpec<'_>) -> Result<()> {
        Netlink::create_vxlan(self, spec).await
    }
    async fn create_wireguard(&self, name: &str, mtu: u32) -> Result<()> {
        Netlink::create_wireguard(self, name, mtu).await
    }
    async fn del_link(&self, index: u32) -> Result<()> {
        Netlink::del_link(self, index).await
    }
    async fn set_up(&self, index: u32) -> Result<()> {
        Netlink::set_up(self, index).await
    }
    async fn set_mtu(&self, index: u32, mtu: u32) -> Result<()> {
        Netlink::set_mtu(self, index, mtu).await
    }
    async fn addresses(&self, index: Option<u32>) -> Result<Vec<Address>> {
        Netlink::addresses(self, index).await
    }
    async fn add_address(&self, index: u32, net: IpNet) -> Result<()> {
        Netlink::add_address(self, index, net).await
    }
    async fn del_address(&self, index: u32, net: IpNet) -> Result<()> {
        Netlink::del_address(self, index, net).await
    }
    async fn routes(&self, v4: bool, table: Option<u32>) -> Result<Vec<Route>> {
        Netlink::routes(self, v4, table).await
    }
    async fn replace_route(&self, route: &Route) -> Result<()> {
        Netlink::replace_route(self, route).await
    }
    async fn del_route(&self, route: &Route) -> Result<()> {
        Netlink::del_route(self, route).await
    }
    async fn neighbours(&self, index: u32, fdb: bool) -> Result<Vec<Neighbour>> {
        Netlink::neighbours(self, index, fdb).await
    }
    async fn replace_neighbour(&self, index: u32, ip: std::net::IpAddr, mac: Mac) -> Result<()> {
        Netlink::replace_neighbour(self, index, ip, mac).await
    }
    async fn del_neighbour(&self, index: u32, ip: std::net::IpAddr) -> Result<()> {
        Netlink::del_neighbour(self, index, ip).await
    }
    async fn replace_fdb(&self, index: u32, mac: Mac, dst: std::net::IpAddr) -> Result<()> {
        Netlink::replace_fdb(self, index, mac, dst).await
    }
    async fn del_fdb(&self, index: u32, mac: Mac, dst: std::net::IpAddr) -> Result<()> {
        Netlink::del_fdb(self, index, mac, dst).await
    }
    fn disable_accept_ra(&self, name: &str) -> std::io::Result<bool> {
        // The caller's network namespace's view: /proc/sys/net follows the reading thread's netns.
        let path = std::path::Path::new("/proc/sys/net/ipv6/conf").join(name).join("accept_ra");
        if std::fs::read_to_string(&path)?.trim() == "0" {
            return Ok(false);
        }
        std::fs::write(&path, "0")?;
        Ok(true)
    }
    fn watch(&self, metrics: Arc<Metrics>) -> KernelWatch {
        KernelWatch::start(metrics)
    }
}
