//! Routes.

use std::net::IpAddr;

use futures_util::TryStreamExt;
use rtnetlink::RouteMessageBuilder;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteMessage, RouteProtocol, RouteScope, RouteType,
};

use super::{Netlink, NetlinkError, Result, map_err};
use crate::ip::IpNet;

/// A route in the kernel's FIB, reduced to what this project manages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub dst: IpNet,
    pub gateway: Option<IpAddr>,
    pub oif: Option<u32>,
    pub onlink: bool,
    /// `rtm_protocol`: who owns the route (RTPROT_BOOT=3 for `ip route add`,
    /// RTPROT_KERNEL=2 for connected routes).
    pub protocol: u8,
    pub table: u32,
    pub scope: u8,
    /// `rtm_type`: 1 = unicast, 6 = blackhole.
    pub kind: u8,
    /// `RTA_PRIORITY` (the `metric` of `ip route`).
    pub metric: u32,
}

pub const RT_TABLE_MAIN: u32 = 254;
pub const RTPROT_BOOT: u8 = 3;
/// `rtm_protocol` of the routes flanneld installs (`ip route show proto 76`).
pub const RTPROT_FLANNEL: u8 = 76;
pub const RTN_UNICAST: u8 = 1;
pub const RTN_BLACKHOLE: u8 = 6;
pub const RT_SCOPE_UNIVERSE: u8 = 0;
pub const RT_SCOPE_LINK: u8 = 253;

impl Route {
    /// A plain unicast route in the main table.
    pub fn new(dst: IpNet) -> Route {
        Route {
            dst: dst.network(),
            gateway: None,
            oif: None,
            onlink: false,
            protocol: RTPROT_BOOT,
            table: RT_TABLE_MAIN,
            scope: RT_SCOPE_UNIVERSE,
            kind: RTN_UNICAST,
            metric: 0,
        }
    }

    /// A route that silently drops what it matches (`ip route add blackhole ...`).
    pub fn blackhole(mut self) -> Route {
        self.kind = RTN_BLACKHOLE;
        self
    }

    pub fn metric(mut self, metric: u32) -> Route {
        self.metric = metric;
        self
    }

    pub fn via(mut self, gw: IpAddr) -> Route {
        self.gateway = Some(gw);
        self
    }

    pub fn dev(mut self, oif: u32) -> Route {
        self.oif = Some(oif);
        self
    }

    pub fn onlink(mut self) -> Route {
        self.onlink = true;
        self
    }

    pub fn protocol(mut self, p: u8) -> Route {
        self.protocol = p;
        self
    }

    /// A directly connected route (`scope link`, no gateway).
    pub fn scope_link(mut self) -> Route {
        self.scope = RT_SCOPE_LINK;
        self
    }

    fn to_message(&self) -> std::result::Result<RouteMessage, String> {
        let mut b = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(self.dst.network_addr(), self.dst.prefix())
            .map_err(|e| e.to_string())?;
        if let Some(gw) = self.gateway {
            b = b.gateway(gw).map_err(|e| e.to_string())?;
        }
        if let Some(oif) = self.oif {
            b = b.output_interface(oif);
        }
        if self.onlink {
            b = b.onlink();
        }
        if self.metric != 0 {
            b = b.priority(self.metric);
        }
        b = b
            .protocol(RouteProtocol::from(self.protocol))
            .scope(RouteScope::from(self.scope))
            .kind(RouteType::from(self.kind))
            .table_id(self.table);
        Ok(b.build())
    }

    fn from_message(msg: &RouteMessage) -> Option<Route> {
        let h = &msg.header;
        let mut dst = None;
        let mut gateway = None;
        let mut oif = None;
        let mut table = h.table as u32;
        let mut metric = 0;
        for attr in &msg.attributes {
            match attr {
                RouteAttribute::Destination(a) => dst = route_addr(a),
                RouteAttribute::Gateway(a) => gateway = route_addr(a),
                RouteAttribute::Oif(i) => oif = Some(*i),
                RouteAttribute::Table(t) => table = *t,
                RouteAttribute::Priority(p) => metric = *p,
                _ => {}
            }
        }
        let v4 = match h.address_family {
            AddressFamily::Inet => true,
            AddressFamily::Inet6 => false,
            _ => return None,
        };
        let dst_addr =
            dst.unwrap_or(if v4 { IpNet::default_route(true).addr() } else { IpNet::default_route(false).addr() });
        Some(Route {
            dst: IpNet::new(dst_addr, h.destination_prefix_length).ok()?,
            gateway,
            oif,
            onlink: h.flags.contains(RouteFlags::Onlink),
            protocol: h.protocol.into(),
            table,
            scope: h.scope.into(),
            kind: h.kind.into(),
            metric,
        })
    }
}

fn route_addr(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

impl Netlink {
    /// Routes of one family in one table (`None`: every table).
    pub async fn routes(&self, v4: bool, table: Option<u32>) -> Result<Vec<Route>> {
        let mut msg = RouteMessage::default();
        msg.header.address_family = if v4 { AddressFamily::Inet } else { AddressFamily::Inet6 };
        let msgs: Vec<RouteMessage> =
            self.handle.route().get(msg).execute().try_collect().await.map_err(map_err("dump routes"))?;
        Ok(msgs.iter().filter_map(Route::from_message).filter(|r| table.is_none_or(|t| r.table == t)).collect())
    }

    pub async fn add_route(&self, route: &Route) -> Result<()> {
        let op = || format!("add route {} via {:?}", route.dst, route.gateway);
        let msg = route.to_message().map_err(|msg| NetlinkError::Other { op: op(), msg })?;
        self.handle.route().add(msg).execute().await.map_err(map_err(op()))
    }

    /// Adds or replaces the route to `route.dst` (same table, metric, tos).
    pub async fn replace_route(&self, route: &Route) -> Result<()> {
        let op = || format!("replace route {} via {:?}", route.dst, route.gateway);
        let msg = route.to_message().map_err(|msg| NetlinkError::Other { op: op(), msg })?;
        self.handle.route().add(msg).replace().execute().await.map_err(map_err(op()))
    }

    pub async fn del_route(&self, route: &Route) -> Result<()> {
        let op = || format!("delete route {} via {:?}", route.dst, route.gateway);
        let msg = route.to_message().map_err(|msg| NetlinkError::Other { op: op(), msg })?;
        self.handle.route().del(msg).execute().await.map_err(map_err(op()))
    }
}
