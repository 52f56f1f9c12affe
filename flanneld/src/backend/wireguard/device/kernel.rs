//! The kernel's WireGuard device, configured over WireGuard's generic netlink
//! family (`WG_CMD_SET_DEVICE` / `WG_CMD_GET_DEVICE`, what `wg` and upstream's
//! wgctrl send). Peers are diffed against a dump of the device and changed in
//! place: a new or changed peer is sent with its allowed IPs replaced, a peer
//! gone with `REMOVE_ME`; peers that stay are not touched (their sessions
//! live on).
//!
//! This kernel has no WireGuard: here the messages and the diff are checked
//! against an in-memory device ([`tests`]), not against the kernel.

use std::net::IpAddr;

use futures_util::StreamExt;
use netlink_packet_core::{NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload};
use netlink_packet_generic::GenlMessage;
use netlink_packet_wireguard::{
    WireguardAddressFamily, WireguardAllowedIp, WireguardAllowedIpAttr, WireguardAttribute, WireguardCmd,
    WireguardMessage, WireguardPeer, WireguardPeerAttribute, WireguardPeerFlags,
};

use flannel_shared::IpNet;

use super::{Changes, PeerConfig, PeerSet, Settings};
use crate::backend::wireguard::key::Key;

/// Peers per `WG_CMD_SET_DEVICE`: each carries a key, an endpoint and a few
/// allowed IPs (~150 bytes); this keeps a message well inside the socket buffer.
const PEERS_PER_MESSAGE: usize = 200;

/// The generic netlink exchange: the real socket, or a test's device.
#[allow(async_fn_in_trait)]
pub trait Genl {
    /// Sends one `WG_CMD_SET_DEVICE`, waits for its ack.
    async fn set(&self, msg: WireguardMessage) -> Result<(), String>;
    /// `WG_CMD_GET_DEVICE` for `name`: the device's messages (a dump; large devices span several).
    async fn get(&self, name: &str) -> Result<Vec<WireguardMessage>, String>;
}

/// The kernel's generic netlink socket, opened on first use.
#[derive(Default)]
pub struct GenlSocket {
    handle: tokio::sync::OnceCell<genetlink::GenetlinkHandle>,
}

impl GenlSocket {
    async fn handle(&self) -> Result<genetlink::GenetlinkHandle, String> {
        self.handle
            .get_or_try_init(|| async {
                let (conn, handle, _) = genetlink::new_connection().map_err(|e| format!("generic netlink: {e}"))?;
                tokio::spawn(conn);
                Ok::<_, String>(handle)
            })
            .await
            .cloned()
    }

    async fn exchange(&self, msg: WireguardMessage, flags: u16) -> Result<Vec<WireguardMessage>, String> {
        let mut handle = self.handle().await?;
        let mut req = NetlinkMessage::from(GenlMessage::from_payload(msg));
        req.header.flags = flags;
        let mut answers = handle.request(req).await.map_err(|e| format!("wireguard netlink: {e}"))?;
        let mut out = Vec::new();
        while let Some(a) = answers.next().await {
            let a = a.map_err(|e| format!("wireguard netlink: {e}"))?;
            match a.payload {
                NetlinkPayload::InnerMessage(m) => out.push(m.payload),
                NetlinkPayload::Error(e) if e.code.is_some() => {
                    return Err(format!("wireguard netlink: {}", std::io::Error::from(e)));
                }
                _ => {}
            }
        }
        Ok(out)
    }
}

impl Genl for GenlSocket {
    async fn set(&self, msg: WireguardMessage) -> Result<(), String> {
        self.exchange(msg, NLM_F_REQUEST | NLM_F_ACK).await.map(|_| ())
    }
    async fn get(&self, name: &str) -> Result<Vec<WireguardMessage>, String> {
        let msg = WireguardMessage {
            cmd: WireguardCmd::GetDevice,
            attributes: vec![WireguardAttribute::IfName(name.to_string())],
        };
        self.exchange(msg, NLM_F_REQUEST | NLM_F_DUMP).await
    }
}

/// The device-wide settings: private key and port (sent at creation and whenever they drift).
pub fn device_message(s: &Settings) -> WireguardMessage {
    WireguardMessage {
        cmd: WireguardCmd::SetDevice,
        attributes: vec![
            WireguardAttribute::IfName(s.name.clone()),
            WireguardAttribute::PrivateKey(s.private.0),
            WireguardAttribute::ListenPort(s.port),
        ],
    }
}

fn allowed_ip(n: &IpNet) -> WireguardAllowedIp {
    let family = if n.is_ipv4() { WireguardAddressFamily::Ipv4 } else { WireguardAddressFamily::Ipv6 };
    WireguardAllowedIp(vec![
        WireguardAllowedIpAttr::Family(family),
        WireguardAllowedIpAttr::IpAddr(n.addr()),
        WireguardAllowedIpAttr::Cidr(n.prefix()),
    ])
}

/// A peer added or changed: its allowed IPs replaced, PSK and keepalive as configured.
fn peer_set(s: &Settings, key: &Key, cfg: &PeerConfig) -> WireguardPeer {
    let mut attrs = vec![WireguardPeerAttribute::PublicKey(key.0)];
    if let Some(psk) = s.psk {
        attrs.push(WireguardPeerAttribute::PresharedKey(psk.0));
    }
    if let Some(e) = cfg.endpoint {
        attrs.push(WireguardPeerAttribute::Endpoint(e));
    }
    attrs.push(WireguardPeerAttribute::PersistentKeepalive(s.keepalive.unwrap_or(0)));
    attrs.push(WireguardPeerAttribute::Flags(WireguardPeerFlags::ReplaceAllowedIps));
    attrs.push(WireguardPeerAttribute::AllowedIps(cfg.allowed.iter().map(allowed_ip).collect()));
    WireguardPeer(attrs)
}

fn peer_remove(key: &Key) -> WireguardPeer {
    WireguardPeer(vec![
        WireguardPeerAttribute::PublicKey(key.0),
        WireguardPeerAttribute::Flags(WireguardPeerFlags::RemoveMe),
    ])
}

/// What a device dump says: its listen port, private key, and peers.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Dump {
    pub private: Option<Key>,
    pub port: Option<u16>,
    pub peers: PeerSet,
}

pub fn parse_dump(msgs: &[WireguardMessage]) -> Dump {
    let mut d = Dump::default();
    for m in msgs {
        for a in &m.attributes {
            match a {
                WireguardAttribute::PrivateKey(k) => d.private = Some(Key(*k)),
                WireguardAttribute::ListenPort(p) => d.port = Some(*p),
                WireguardAttribute::Peers(peers) => {
                    for p in peers {
                        let mut key = None;
                        let mut cfg = PeerConfig { endpoint: None, allowed: Vec::new() };
                        for pa in &p.0 {
                            match pa {
                                WireguardPeerAttribute::PublicKey(k) => key = Some(Key(*k)),
                                WireguardPeerAttribute::Endpoint(e) => cfg.endpoint = Some(*e),
                                WireguardPeerAttribute::AllowedIps(ips) => {
                                    cfg.allowed.extend(ips.iter().filter_map(parse_allowed_ip));
                                }
                                _ => {}
                            }
                        }
                        // A peer spanning two dump messages continues in the second.
                        if let Some(k) = key {
                            d.peers.entry(k).or_insert(PeerConfig { endpoint: None, allowed: Vec::new() }).merge(cfg);
                        }
                    }
                }
                _ => {}
            }
        }
    }
    for p in d.peers.values_mut() {
        p.allowed.sort();
    }
    d
}

impl PeerConfig {
    fn merge(&mut self, other: PeerConfig) {
        self.endpoint = other.endpoint.or(self.endpoint);
        self.allowed.extend(other.allowed);
    }
}

fn parse_allowed_ip(ip: &WireguardAllowedIp) -> Option<IpNet> {
    let (mut addr, mut cidr): (Option<IpAddr>, Option<u8>) = (None, None);
    for a in &ip.0 {
        match a {
            WireguardAllowedIpAttr::IpAddr(x) => addr = Some(*x),
            WireguardAllowedIpAttr::Cidr(c) => cidr = Some(*c),
            _ => {}
        }
    }
    IpNet::new(addr?, cidr?).ok()
}

/// The `WG_CMD_SET_DEVICE` messages that take a device from `have` to `want`
/// (with `prune`, peers `want` lacks are removed), and what they change.
pub fn plan(s: &Settings, have: &PeerSet, want: &PeerSet, prune: bool) -> (Vec<WireguardMessage>, Changes) {
    let mut peers = Vec::new();
    let mut done = Changes::default();
    for (k, cfg) in want {
        let mut sorted = cfg.clone();
        sorted.allowed.sort();
        match have.get(k) {
            Some(h) if *h == sorted => {}
            Some(_) => {
                done.updated += 1;
                peers.push(peer_set(s, k, cfg));
            }
            None => {
                done.added += 1;
                peers.push(peer_set(s, k, cfg));
            }
        }
    }
    if prune {
        for k in have.keys().filter(|k| !want.contains_key(k)) {
            done.removed += 1;
            peers.push(peer_remove(k));
        }
    }
    let msgs = peers
        .chunks(PEERS_PER_MESSAGE)
        .map(|c| WireguardMessage {
            cmd: WireguardCmd::SetDevice,
            attributes: vec![WireguardAttribute::IfName(s.name.clone()), WireguardAttribute::Peers(c.to_vec())],
        })
        .collect();
    (msgs, done)
}

/// A kernel WireGuard device driven through `G`.
pub struct Device<G> {
    genl: std::rc::Rc<G>,
    settings: Settings,
}

impl<G: Genl> Device<G> {
    /// Configures a freshly created kernel device: private key and port.
    pub async fn configure(genl: std::rc::Rc<G>, settings: Settings) -> Result<Device<G>, String> {
        genl.set(device_message(&settings)).await.map_err(|e| format!("configuring {}: {e}", settings.name))?;
        Ok(Device { genl, settings })
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub async fn set_peers(&self, want: &PeerSet, prune: bool) -> Result<Changes, String> {
        let name = &self.settings.name;
        let have = parse_dump(&self.genl.get(name).await.map_err(|e| format!("reading {name}: {e}"))?);
        if have.private != Some(self.settings.private) || have.port != Some(self.settings.port) {
            self.genl.set(device_message(&self.settings)).await.map_err(|e| format!("configuring {name}: {e}"))?;
        }
        let (msgs, done) = plan(&self.settings, &have.peers, want, prune);
        for m in msgs {
            self.genl.set(m).await.map_err(|e| format!("setting peers of {name}: {e}"))?;
        }
        Ok(done)
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use crate::backend::wireguard::device::Bind;
    use netlink_packet_core::{Emitable, ParseableParametrized};
    use netlink_packet_generic::GenlHeader;
    use std::cell::RefCell;

    /// An in-memory kernel WireGuard device: applies `WG_CMD_SET_DEVICE` as the
    /// kernel does (REPLACE_ALLOWEDIPS, REMOVE_ME), answers the dump, and keeps
    /// every message it got, after a round trip through their wire format.
    #[derive(Default)]
    pub struct FakeGenl {
        pub dev: RefCell<Dump>,
        pub sent: RefCell<Vec<WireguardMessage>>,
    }

    fn wire(msg: &WireguardMessage) -> WireguardMessage {
        let mut buf = vec![0u8; msg.buffer_len()];
        msg.emit(&mut buf);
        let header = GenlHeader { cmd: msg.cmd.into(), version: 1 };
        WireguardMessage::parse_with_param(&buf[..], header).expect("our message parses back")
    }

    impl Genl for FakeGenl {
        async fn set(&self, msg: WireguardMessage) -> Result<(), String> {
            let msg = wire(&msg);
            let mut dev = self.dev.borrow_mut();
            for a in &msg.attributes {
                match a {
                    WireguardAttribute::PrivateKey(k) => dev.private = Some(Key(*k)),
                    WireguardAttribute::ListenPort(p) => dev.port = Some(*p),
                    WireguardAttribute::Peers(peers) => {
                        for p in peers {
                            let key = p.0.iter().find_map(|a| match a {
                                WireguardPeerAttribute::PublicKey(k) => Some(Key(*k)),
                                _ => None,
                            });
                            let Some(key) = key else { return Err("peer without a public key".into()) };
                            let flags = p.0.iter().find_map(|a| match a {
                                WireguardPeerAttribute::Flags(f) => Some(*f),
                                _ => None,
                            });
                            if flags.is_some_and(|f| f.contains(WireguardPeerFlags::RemoveMe)) {
                                dev.peers.remove(&key);
                                continue;
                            }
                            let one = parse_dump(&[WireguardMessage {
                                cmd: WireguardCmd::GetDevice,
                                attributes: vec![WireguardAttribute::Peers(vec![p.clone()])],
                            }]);
                            let cfg = one.peers[&key].clone();
                            let entry = dev.peers.entry(key).or_insert(PeerConfig { endpoint: None, allowed: vec![] });
                            if flags.is_some_and(|f| f.contains(WireguardPeerFlags::ReplaceAllowedIps)) {
                                entry.allowed.clear();
                            }
                            entry.merge(cfg);
                            entry.allowed.sort();
                        }
                    }
                    _ => {}
                }
            }
            self.sent.borrow_mut().push(msg);
            Ok(())
        }

        async fn get(&self, name: &str) -> Result<Vec<WireguardMessage>, String> {
            let dev = self.dev.borrow();
            let mut attributes = vec![WireguardAttribute::IfName(name.to_string())];
            attributes.extend(dev.private.map(|k| WireguardAttribute::PrivateKey(k.0)));
            attributes.extend(dev.port.map(WireguardAttribute::ListenPort));
            let peers = dev.peers.iter().map(|(k, c)| peer_set(&settings(None), k, c)).collect();
            attributes.push(WireguardAttribute::Peers(peers));
            Ok(vec![wire(&WireguardMessage { cmd: WireguardCmd::GetDevice, attributes })])
        }
    }

    pub fn settings(psk: Option<Key>) -> Settings {
        Settings {
            name: "flannel-wg".into(),
            private: Key([7; 32]),
            port: 51820,
            psk,
            keepalive: Some(25),
            bind: Bind::V4,
        }
    }

    fn peer(ep: &str, nets: &[&str]) -> PeerConfig {
        PeerConfig { endpoint: Some(ep.parse().unwrap()), allowed: nets.iter().map(|n| n.parse().unwrap()).collect() }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn peers_are_added_changed_and_removed_in_place() {
        let genl = std::rc::Rc::new(FakeGenl::default());
        let dev = Device::configure(genl.clone(), settings(Some(Key([3; 32])))).await.unwrap();
        assert_eq!(genl.dev.borrow().port, Some(51820));
        assert_eq!(genl.dev.borrow().private, Some(Key([7; 32])));

        let mut want = PeerSet::new();
        want.insert(Key([1; 32]), peer("192.0.2.1:51820", &["10.244.1.0/24"]));
        want.insert(Key([2; 32]), peer("192.0.2.2:51820", &["10.244.2.0/24"]));
        let done = dev.set_peers(&want, true).await.unwrap();
        assert_eq!(done, Changes { added: 2, updated: 0, removed: 0 });
        assert_eq!(genl.dev.borrow().peers, want);
        // The message as the kernel gets it: replace the allowed IPs, PSK, keepalive.
        let last = genl.sent.borrow().last().unwrap().clone();
        let WireguardAttribute::Peers(peers) = &last.attributes[1] else { panic!("{last:?}") };
        assert!(peers[0].0.contains(&WireguardPeerAttribute::PresharedKey([3; 32])));
        assert!(peers[0].0.contains(&WireguardPeerAttribute::PersistentKeepalive(25)));
        assert!(peers[0].0.contains(&WireguardPeerAttribute::Flags(WireguardPeerFlags::ReplaceAllowedIps)));

        // Nothing changed: nothing sent.
        let before = genl.sent.borrow().len();
        assert!(dev.set_peers(&want, true).await.unwrap().is_noop());
        assert_eq!(genl.sent.borrow().len(), before);

        // One peer moves, one goes: one message, the other peer not in it.
        want.insert(Key([1; 32]), peer("192.0.2.9:51820", &["10.244.1.0/24"]));
        want.remove(&Key([2; 32]));
        let done = dev.set_peers(&want, true).await.unwrap();
        assert_eq!(done, Changes { added: 0, updated: 1, removed: 1 });
        assert_eq!(genl.dev.borrow().peers, want);
        assert_eq!(genl.sent.borrow().len(), before + 1);

        // Without prune (before the first full listing) a peer not wanted stays.
        genl.dev.borrow_mut().peers.insert(Key([5; 32]), peer("192.0.2.5:51820", &["10.244.5.0/24"]));
        assert!(dev.set_peers(&want, false).await.unwrap().is_noop());
        assert!(genl.dev.borrow().peers.contains_key(&Key([5; 32])));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn thousands_of_peers_go_in_chunks_and_a_drifted_port_is_put_back() {
        let genl = std::rc::Rc::new(FakeGenl::default());
        let dev = Device::configure(genl.clone(), settings(None)).await.unwrap();
        let want: PeerSet = (0..1000u32)
            .map(|i| {
                let mut k = [0u8; 32];
                k[..4].copy_from_slice(&i.to_be_bytes());
                (
                    Key(k),
                    peer(
                        &format!("192.0.{}.{}:51820", i / 250, i % 250 + 1),
                        &[&format!("10.{}.{}.0/24", i / 256, i % 256)],
                    ),
                )
            })
            .collect();
        genl.sent.borrow_mut().clear();
        genl.dev.borrow_mut().port = Some(1);
        assert_eq!(dev.set_peers(&want, true).await.unwrap().added, 1000);
        let sent = genl.sent.borrow();
        assert_eq!(sent.len(), 1 + 1000 / PEERS_PER_MESSAGE, "the device message, then the peers in chunks");
        assert_eq!(genl.dev.borrow().port, Some(51820));
        assert_eq!(genl.dev.borrow().peers.len(), 1000);
    }
}
