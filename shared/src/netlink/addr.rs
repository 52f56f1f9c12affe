//! Interface addresses.

use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags, AddressMessage};

use super::{Netlink, Result, map_err};
use crate::ip::IpNet;

/// An address assigned to an interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Address {
    pub index: u32,
    /// The address with its prefix length, e.g. `10.244.1.1/24`.
    pub net: IpNet,
}

impl Netlink {
    /// Addresses of one link (or of all links), both families.
    pub async fn addresses(&self, index: Option<u32>) -> Result<Vec<Address>> {
        let mut req = self.handle.address().get();
        if let Some(i) = index {
            req.message_mut().header.index = i;
            req = req.set_link_index_filter(i);
        }
        let msgs: Vec<AddressMessage> = req.execute().try_collect().await.map_err(map_err("dump addresses"))?;
        Ok(msgs
            .iter()
            .filter_map(|m| {
                let ip = m
                    .attributes
                    .iter()
                    .find_map(|a| match a {
                        AddressAttribute::Local(ip) => Some(*ip),
                        _ => None,
                    })
                    .or_else(|| {
                        m.attributes.iter().find_map(|a| match a {
                            AddressAttribute::Address(ip) => Some(*ip),
                            _ => None,
                        })
                    })?;
                Some(Address { index: m.header.index, net: IpNet::new(ip, m.header.prefix_len).ok()? })
            })
            .collect())
    }

    /// Adds an address. IPv6 addresses skip duplicate address detection: the
    /// pod network owns its prefixes, and DAD would delay the pod's first packets.
    pub async fn add_address(&self, index: u32, net: IpNet) -> Result<()> {
        let mut req = self.handle.address().add(index, net.addr(), net.prefix());
        if !net.is_ipv4() {
            req.message_mut().attributes.push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        req.execute().await.map_err(map_err(format!("add address {net} to link #{index}")))
    }

    pub async fn del_address(&self, index: u32, net: IpNet) -> Result<()> {
        let mut req = self.handle.address().get();
        req.message_mut().header.index = index;
        let msgs: Vec<AddressMessage> = req
            .set_link_index_filter(index)
            .set_address_filter(net.addr())
            .set_prefix_length_filter(net.prefix())
            .execute()
            .try_collect()
            .await
            .map_err(map_err(format!("find address {net}")))?;
        for m in msgs {
            self.handle.address().del(m).execute().await.map_err(map_err(format!("delete address {net}")))?;
        }
        Ok(())
    }
}
