//! The kernel operations the commands use, behind a narrow trait so that the
//! commands run against an in-memory kernel in unit tests ([`fake`]). In
//! production it is [`Netlink`]: one connection per namespace per command.

use std::io;

use flannel_shared::netlink::{Address, Link, Netlink, Result, Route, VethSpec};
use flannel_shared::{IpNet, Mac};

#[cfg(test)]
pub mod fake;

/// Links, addresses and routes of one network namespace, and its sysctls.
pub trait Kernel {
    async fn link_by_name(&self, name: &str) -> Result<Option<Link>>;
    /// A bridge, down, with a fixed MAC.
    async fn create_bridge(&self, name: &str, mac: Mac, mtu: u32, promisc: bool) -> Result<()>;
    /// A veth pair whose peer is born in `spec.peer_netns`.
    async fn create_veth(&self, spec: &VethSpec<'_>) -> Result<()>;
    /// Deletes a link (both ends, for a veth).
    async fn del_link(&self, index: u32) -> Result<()>;
    async fn set_up(&self, index: u32) -> Result<()>;
    async fn set_mtu(&self, index: u32, mtu: u32) -> Result<()>;
    async fn set_promisc(&self, index: u32, on: bool) -> Result<()>;
    async fn set_hairpin(&self, index: u32, on: bool) -> Result<()>;
    /// Addresses of one link, or of all links.
    async fn addresses(&self, index: Option<u32>) -> Result<Vec<Address>>;
    async fn add_address(&self, index: u32, net: IpNet) -> Result<()>;
    /// Removes an address; one that is not there is no error.
    async fn del_address(&self, index: u32, net: IpNet) -> Result<()>;
    /// One family's routes, optionally of one table only.
    async fn routes(&self, v4: bool, table: Option<u32>) -> Result<Vec<Route>>;
    async fn replace_route(&self, route: &Route) -> Result<()>;
    /// A sysctl under `/proc/sys` (`net/ipv4/ip_forward`). Only the host side
    /// is asked: `/proc/sys/net` is the namespace of this process.
    fn sysctl(&self, key: &str) -> io::Result<String>;
    fn set_sysctl(&self, key: &str, value: &str) -> io::Result<()>;
}

/// Where a sysctl lives, for messages.
pub fn sysctl_path(key: &str) -> String {
    format!("/proc/sys/{key}")
}

impl Kernel for Netlink {
    async fn link_by_name(&self, name: &str) -> Result<Option<Link>> {
        Netlink::link_by_name(self, name).await
    }
    async fn create_bridge(&self, name: &str, mac: Mac, mtu: u32, promisc: bool) -> Result<()> {
        Netlink::create_bridge(self, name, mac, mtu, promisc).await
    }
    async fn create_veth(&self, spec: &VethSpec<'_>) -> Result<()> {
        Netlink::create_veth(self, spec).await
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
    async fn set_promisc(&self, index: u32, on: bool) -> Result<()> {
        Netlink::set_promisc(self, index, on).await
    }
    async fn set_hairpin(&self, index: u32, on: bool) -> Result<()> {
        Netlink::set_hairpin(self, index, on).await
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
    fn sysctl(&self, key: &str) -> io::Result<String> {
        std::fs::read_to_string(sysctl_path(key))
    }
    fn set_sysctl(&self, key: &str, value: &str) -> io::Result<()> {
        std::fs::write(sysctl_path(key), value)
    }
}
