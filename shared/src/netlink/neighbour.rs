//! Neighbours (ARP/NDP) and bridge FDB entries.

use std::net::IpAddr;

use futures_util::TryStreamExt;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};

use super::{Netlink, Result, map_err};
use crate::Mac;

/// A neighbour (ARP/NDP) or bridge FDB entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Neighbour {
    pub index: u32,
    /// The IP (ARP/NDP entries) or, for FDB entries, the VXLAN remote (`dst`).
    pub ip: Option<IpAddr>,
    pub mac: Option<Mac>,
    pub permanent: bool,
}

fn neighbour_from_message(m: &NeighbourMessage) -> Neighbour {
    let mut n = Neighbour {
        index: m.header.ifindex,
        ip: None,
        mac: None,
        permanent: m.header.state == NeighbourState::Permanent,
    };
    for a in &m.attributes {
        match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => n.ip = Some(IpAddr::V4(*v4)),
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => n.ip = Some(IpAddr::V6(*v6)),
            // FDB messages (AF_BRIDGE) carry the VXLAN remote as raw bytes.
            NeighbourAttribute::Destination(NeighbourAddress::Other(b)) => {
                n.ip = match b.len() {
                    4 => Some(IpAddr::from(<[u8; 4]>::try_from(&b[..]).expect("length checked"))),
                    16 => Some(IpAddr::from(<[u8; 16]>::try_from(&b[..]).expect("length checked"))),
                    _ => None,
                }
            }
            NeighbourAttribute::LinkLayerAddress(l) if l.len() == 6 => {
                n.mac = Mac::from_slice(l);
            }
            _ => {}
        }
    }
    n
}

impl Netlink {
    /// ARP/NDP entries (`bridge_fdb = false`) or FDB entries (`true`) of one link.
    pub async fn neighbours(&self, index: u32, bridge_fdb: bool) -> Result<Vec<Neighbour>> {
        let mut req = self.handle.neighbours().get();
        req.message_mut().header.family = if bridge_fdb { AddressFamily::Bridge } else { AddressFamily::Unspec };
        // Strict dumps filter ARP/NDP by the NDA_IFINDEX attribute (a header
        // index is rejected) and FDB entries by the header's index.
        if bridge_fdb {
            req.message_mut().header.ifindex = index;
        } else {
            req.message_mut().attributes.push(NeighbourAttribute::IfIndex(index));
        }
        let msgs: Vec<NeighbourMessage> =
            req.execute().try_collect().await.map_err(map_err(format!("dump neighbours of link #{index}")))?;
        Ok(msgs
            .iter()
            .filter(|m| m.header.ifindex == index)
            .filter(|m| (m.header.family == AddressFamily::Bridge) == bridge_fdb)
            .map(neighbour_from_message)
            .collect())
    }

    /// A permanent ARP/NDP entry `ip -> mac` on `index` (added or replaced).
    pub async fn replace_neighbour(&self, index: u32, ip: IpAddr, mac: Mac) -> Result<()> {
        self.handle
            .neighbours()
            .add(index, ip)
            .link_layer_address(&mac.0)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(map_err(format!("replace neighbour {ip} on link #{index}")))
    }

    pub async fn del_neighbour(&self, index: u32, ip: IpAddr) -> Result<()> {
        let mut m = NeighbourMessage::default();
        m.header.family = if ip.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
        m.header.ifindex = index;
        m.attributes.push(NeighbourAttribute::Destination(match ip {
            IpAddr::V4(a) => NeighbourAddress::Inet(a),
            IpAddr::V6(a) => NeighbourAddress::Inet6(a),
        }));
        self.handle.neighbours().del(m).execute().await.map_err(map_err(format!("delete neighbour {ip}")))
    }

    /// A permanent FDB entry on a VXLAN device: frames for `mac` go to `dst` (NTF_SELF).
    pub async fn replace_fdb(&self, index: u32, mac: Mac, dst: IpAddr) -> Result<()> {
        self.handle
            .neighbours()
            .add_bridge(index, &mac.0)
            .destination(dst)
            .flags(NeighbourFlags::Own)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(map_err(format!("replace fdb {mac} on link #{index}")))
    }

    pub async fn del_fdb(&self, index: u32, mac: Mac, dst: IpAddr) -> Result<()> {
        let mut m = NeighbourMessage::default();
        m.header.family = AddressFamily::Bridge;
        m.header.ifindex = index;
        m.header.flags = NeighbourFlags::Own;
        m.attributes.push(NeighbourAttribute::LinkLayerAddress(mac.0.to_vec()));
        m.attributes.push(NeighbourAttribute::Destination(match dst {
            IpAddr::V4(a) => NeighbourAddress::Inet(a),
            IpAddr::V6(a) => NeighbourAddress::Inet6(a),
        }));
        self.handle.neighbours().del(m).execute().await.map_err(map_err(format!("delete fdb {mac}")))
    }
}
