//! Links: reading them, creating bridges, veth pairs and VXLAN devices, setting their attributes.

use std::fs::File;
use std::net::IpAddr;
use std::os::fd::AsRawFd;

use futures_util::TryStreamExt;
use rtnetlink::packet_route::link::{
    InfoBridgePort, InfoData, InfoKind, InfoPortData, InfoVeth, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo,
    LinkMessage,
};
use rtnetlink::{LinkBridge, LinkBridgePort, LinkMessageBuilder, LinkUnspec, LinkVxlan, LinkWireguard};

use super::{Netlink, Result, map_err};
use crate::Mac;

/// A network interface as the kernel reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: Option<Mac>,
    pub mtu: u32,
    /// Administratively up (IFF_UP).
    pub up: bool,
    pub promisc: bool,
    /// Index of the bridge (or other controller) this link is a port of.
    pub master: Option<u32>,
    /// `bridge`, `veth`, `vxlan`, ... (`None` for physical/loopback devices).
    pub kind: Option<String>,
    /// Hairpin mode, when the link is a bridge port and the kernel reported it.
    pub hairpin: Option<bool>,
    /// VXLAN settings, for vxlan links.
    pub vxlan: Option<VxlanInfo>,
}

/// The settings of a VXLAN device that flanneld cares about.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VxlanInfo {
    pub vni: u32,
    pub port: u16,
    pub local: Option<IpAddr>,
    /// Underlay device index.
    pub uplink: Option<u32>,
    pub learning: bool,
    pub gbp: bool,
}

impl Link {
    fn from_message(msg: &LinkMessage) -> Link {
        let mut link = Link {
            index: msg.header.index,
            name: String::new(),
            mac: None,
            mtu: 0,
            up: msg.header.flags.contains(LinkFlags::Up),
            promisc: msg.header.flags.contains(LinkFlags::Promisc),
            master: None,
            kind: None,
            hairpin: None,
            vxlan: None,
        };
        for attr in &msg.attributes {
            match attr {
                LinkAttribute::IfName(n) => link.name = n.clone(),
                LinkAttribute::Address(a) if a.len() == 6 => link.mac = Mac::from_slice(a),
                LinkAttribute::Mtu(m) => link.mtu = *m,
                LinkAttribute::Controller(c) => link.master = Some(*c),
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        match info {
                            LinkInfo::Kind(k) => link.kind = Some(k.to_string()),
                            LinkInfo::Data(InfoData::Vxlan(opts)) => {
                                let mut v = VxlanInfo::default();
                                for o in opts {
                                    match o {
                                        InfoVxlan::Id(id) => v.vni = *id,
                                        InfoVxlan::Port(p) => v.port = *p,
                                        InfoVxlan::Local(a) => v.local = Some(IpAddr::V4(*a)),
                                        InfoVxlan::Local6(a) => v.local = Some(IpAddr::V6(*a)),
                                        InfoVxlan::Link(l) => v.uplink = Some(*l),
                                        InfoVxlan::Learning(l) => v.learning = *l,
                                        InfoVxlan::Gbp => v.gbp = true,
                                        _ => {}
                                    }
                                }
                                link.vxlan = Some(v);
                            }
                            LinkInfo::PortData(InfoPortData::BridgePort(opts)) => {
                                for o in opts {
                                    if let InfoBridgePort::HairpinMode(h) = o {
                                        link.hairpin = Some(*h);
                                    }
                                }
                            }
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        link
    }
}

/// What to create with [`Netlink::create_vxlan`].
#[derive(Clone, Debug)]
pub struct VxlanSpec<'a> {
    pub name: &'a str,
    pub vni: u32,
    pub port: u16,
    pub local: Option<IpAddr>,
    pub uplink: Option<u32>,
    pub mtu: Option<u32>,
    pub gbp: bool,
    /// Kernel MAC learning (net-conf `Backend.Learning`; off by default: flanneld programs FDB and ARP itself).
    pub learning: bool,
    /// A MAC to keep (e.g. restored from our own lease) instead of a random one.
    pub mac: Option<Mac>,
}

/// What to create with [`Netlink::create_veth`].
pub struct VethSpec<'a> {
    /// Name of the end that stays in this namespace.
    pub name: &'a str,
    /// Name of the other end.
    pub peer_name: &'a str,
    /// Namespace the other end is created in directly (no move afterwards).
    pub peer_netns: &'a File,
    pub mtu: u32,
    /// Bridge to enslave this end to at creation.
    pub master: Option<u32>,
    /// Bring this end up at creation.
    pub up: bool,
}

impl Netlink {
    pub async fn link_by_name(&self, name: &str) -> Result<Option<Link>> {
        let res = self.handle.link().get().match_name(name.to_string()).execute().try_next().await;
        match res.map_err(map_err(format!("get link {name}"))) {
            Ok(m) => Ok(m.as_ref().map(Link::from_message)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub async fn link_by_index(&self, index: u32) -> Result<Option<Link>> {
        let res = self.handle.link().get().match_index(index).execute().try_next().await;
        match res.map_err(map_err(format!("get link #{index}"))) {
            Ok(m) => Ok(m.as_ref().map(Link::from_message)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub async fn links(&self) -> Result<Vec<Link>> {
        let msgs: Vec<LinkMessage> =
            self.handle.link().get().execute().try_collect().await.map_err(map_err("dump links"))?;
        Ok(msgs.iter().map(Link::from_message).collect())
    }

    /// Creates a bridge, up, with a fixed MAC (so it does not follow its ports).
    /// Creates a bridge, down: the caller brings it up once what must precede
    /// that is in place (addresses, sysctls such as `accept_dad`).
    pub async fn create_bridge(&self, name: &str, mac: Mac, mtu: u32, promisc: bool) -> Result<()> {
        let msg =
            LinkMessageBuilder::<LinkBridge>::new(name).address(mac.0.to_vec()).mtu(mtu).promiscuous(promisc).build();
        self.handle.link().add(msg).execute().await.map_err(map_err(format!("create bridge {name}")))
    }

    /// Creates a veth pair whose peer is born in another namespace.
    pub async fn create_veth(&self, spec: &VethSpec<'_>) -> Result<()> {
        let peer = LinkMessageBuilder::<LinkUnspec>::new()
            .name(spec.peer_name.to_string())
            .mtu(spec.mtu)
            .setns_by_fd(spec.peer_netns.as_raw_fd())
            .build();
        let mut b = LinkMessageBuilder::<LinkUnspec>::new_with_info_kind(InfoKind::Veth)
            .name(spec.name.to_string())
            .mtu(spec.mtu)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)));
        if let Some(m) = spec.master {
            b = b.controller(m);
        }
        if spec.up {
            b = b.up();
        }
        self.handle
            .link()
            .add(b.build())
            .execute()
            .await
            .map_err(map_err(format!("create veth {}/{}", spec.name, spec.peer_name)))
    }

    pub async fn set_up(&self, index: u32) -> Result<()> {
        let msg = LinkUnspec::new_with_index(index).up().build();
        self.handle.link().set(msg).execute().await.map_err(map_err(format!("set link #{index} up")))
    }

    pub async fn set_mtu(&self, index: u32, mtu: u32) -> Result<()> {
        let msg = LinkUnspec::new_with_index(index).mtu(mtu).build();
        self.handle.link().set(msg).execute().await.map_err(map_err(format!("set mtu of link #{index}")))
    }

    pub async fn set_promisc(&self, index: u32, on: bool) -> Result<()> {
        let msg = LinkUnspec::new_with_index(index).promiscuous(on).build();
        self.handle.link().set(msg).execute().await.map_err(map_err(format!("set promisc of link #{index}")))
    }

    pub async fn set_master(&self, index: u32, master: u32) -> Result<()> {
        let msg = LinkUnspec::new_with_index(index).controller(master).build();
        self.handle.link().set(msg).execute().await.map_err(map_err(format!("enslave link #{index}")))
    }

    pub async fn set_mac(&self, index: u32, mac: Mac) -> Result<()> {
        let msg = LinkUnspec::new_with_index(index).address(mac.0.to_vec()).build();
        self.handle.link().set(msg).execute().await.map_err(map_err(format!("set mac of link #{index}")))
    }

    /// Sets hairpin mode on a bridge port (lets a pod reach itself via a Service).
    pub async fn set_hairpin(&self, index: u32, on: bool) -> Result<()> {
        let msg = LinkBridgePort::new(index).hairpin(on).build();
        self.handle.link().set_port(msg).execute().await.map_err(map_err(format!("set hairpin on link #{index}")))
    }

    pub async fn del_link(&self, index: u32) -> Result<()> {
        self.handle.link().del(index).execute().await.map_err(map_err(format!("delete link #{index}")))
    }

    /// Creates a VXLAN device (learning as `spec.learning`; flanneld programs FDB and ARP itself either way).
    pub async fn create_vxlan(&self, spec: &VxlanSpec<'_>) -> Result<()> {
        // txqueuelen 0 (noqueue), as upstream's device: no qdisc in front of a virtual device.
        let mut b = LinkVxlan::new(spec.name, spec.vni).port(spec.port).learning(spec.learning).txqueuelen(0);
        if let Some(i) = spec.uplink {
            b = b.dev(i);
        }
        match spec.local {
            Some(IpAddr::V4(a)) => b = b.local(a),
            Some(IpAddr::V6(a)) => b = b.local6(a),
            None => {}
        }
        if spec.gbp {
            b = b.gbp();
        }
        if let Some(m) = spec.mtu {
            b = b.mtu(m);
        }
        if let Some(mac) = spec.mac {
            b = b.address(mac.0.to_vec());
        }
        self.handle.link().add(b.build()).execute().await.map_err(map_err(format!("create vxlan {}", spec.name)))
    }

    /// Creates a kernel WireGuard device (down, unconfigured). A kernel without
    /// WireGuard answers EOPNOTSUPP ("Unknown device type").
    pub async fn create_wireguard(&self, name: &str, mtu: u32) -> Result<()> {
        let link = LinkWireguard::new(name).mtu(mtu).build();
        self.handle.link().add(link).execute().await.map_err(map_err(format!("create wireguard {name}")))
    }
}
