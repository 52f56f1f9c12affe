//! The wireguard backend, as upstream's: pod traffic between nodes encrypted
//! in WireGuard tunnels. One device per family (`flannel-wg`, `flannel-wg-v6`;
//! one for both in the single-device modes), addressed with our subnet's
//! first address, the whole pod network routed onto it; each peer's subnet is
//! that peer's allowed IPs, its endpoint the public IP and port of its lease
//! (`{"PublicKey": ..., "Port": ...}` in BackendData / BackendV6Data).
//!
//! Two implementations, chosen when the device is made: the kernel's
//! WireGuard where `ip link add type wireguard` works, else flanneld's own
//! userspace device (boringtun's Noise over a TUN interface). On SIGTERM the
//! devices are removed, as upstream does.

mod config;
pub mod device;
pub mod key;

use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tracing::{info, warn};

use flannel_shared::IpNet;
use flannel_shared::lease::Lease;
use flannel_shared::netconf::{Backend as BackendConfig, NetConfigError};
use flannel_shared::netlink::{Idempotent, Route};

pub use config::{Config, Mode};
use device::kernel::{self, Genl, GenlSocket};
use device::{Bind, Implementation, PeerConfig, PeerSet, Settings, uapi, userspace};
use key::Key;

use super::{Backend, BackendError, FamilyNet, Uplink};
use crate::kernel::Kernel;
use crate::reconcile::{Desired, Peer, RTPROT_FLANNEL};
use crate::subnet::SubnetManager;

/// Outer IPv6 header (40) + UDP (8) + WireGuard's data header (16) + tag (16): upstream's figure for both families.
pub const OVERHEAD: u32 = 80;

/// The device names, as upstream's.
pub const DEVICE: &str = "flannel-wg";
pub const DEVICE_V6: &str = "flannel-wg-v6";

/// A wireguard lease's backend data, as upstream writes it (v0.21 had no `Port`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireguardData {
    #[serde(rename = "PublicKey")]
    pub public_key: String,
    #[serde(rename = "Port", default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

/// What the backend needs of a peer's lease in one family.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WgPeer {
    pub key: Key,
    /// The port its lease gives; the family's own listen port when absent.
    pub port: Option<u16>,
}

enum Imp<G> {
    Kernel(kernel::Device<G>),
    User(userspace::Device),
}

struct Dev<G> {
    name: &'static str,
    index: u32,
    mtu: u32,
    imp: Imp<G>,
}

impl<G: Genl> Dev<G> {
    fn implementation(&self) -> Implementation {
        match self.imp {
            Imp::Kernel(_) => Implementation::Kernel,
            Imp::User(_) => Implementation::Userspace,
        }
    }

    async fn set_peers(&self, want: &PeerSet, prune: bool) -> Result<device::Changes, BackendError> {
        match &self.imp {
            Imp::Kernel(d) => d.set_peers(want, prune).await.map_err(BackendError::Config),
            Imp::User(d) => Ok(d.set_peers(want, prune)),
        }
    }
}

/// How the userspace device is started (tests replace it: no TUN without root).
pub type StartUserspace = fn(Settings) -> std::io::Result<userspace::Device>;

/// One family's peers as last synced.
#[derive(Clone, Debug)]
struct FamPeer {
    key: Key,
    endpoint: SocketAddr,
    subnet: IpNet,
}

pub struct WireGuard<G: Genl = GenlSocket> {
    cfg: Config,
    /// The private key's file (`WIREGUARD_KEY_FILE`), read or made at the first setup.
    key_path: std::path::PathBuf,
    key: Option<Key>,
    genl: Rc<G>,
    start_userspace: StartUserspace,
    /// Slot 0: `flannel-wg`; slot 1: `flannel-wg-v6` (separate mode only).
    devs: [Option<Dev<G>>; 2],
    want: [Vec<FamPeer>; 2],
    /// Our public address per family (auto mode's choice).
    own_public: [Option<IpAddr>; 2],
}

fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => a.is_private(),
        IpAddr::V6(a) => (a.segments()[0] & 0xfe00) == 0xfc00,
    }
}

impl<G: Genl> WireGuard<G> {
    pub fn with_parts(
        cfg: Config,
        genl: Rc<G>,
        start_userspace: StartUserspace,
        key_path: std::path::PathBuf,
    ) -> WireGuard<G> {
        WireGuard {
            cfg,
            key_path,
            key: None,
            genl,
            start_userspace,
            devs: [None, None],
            want: [Vec::new(), Vec::new()],
            own_public: [None, None],
        }
    }

    fn slot(&self, v6: bool) -> usize {
        usize::from(v6 && self.cfg.mode == Mode::Separate)
    }

    /// The UDP port a family's peers are told (BackendData's `Port`): the port of the device carrying it.
    fn family_port(&self, v6: bool) -> u16 {
        port_for(&self.cfg, v6)
    }

    fn key(&mut self) -> Result<Key, BackendError> {
        if let Some(k) = self.key {
            return Ok(k);
        }
        let path = &self.key_path;
        let (k, created) = key::load_or_create(path).map_err(|e| BackendError::Config(format!("wireguard: {e}")))?;
        if created {
            info!("wireguard: new private key written to {}", path.display());
        }
        self.key = Some(k);
        Ok(k)
    }

    /// Creates the slot's device (replacing one of that name), configured with key and port.
    async fn create<K: Kernel>(&mut self, k: &K, slot: usize, uplink: &Uplink) -> Result<(), BackendError> {
        let name = if slot == 1 { DEVICE_V6 } else { DEVICE };
        let private = self.key()?;
        let mtu = device_mtu(&self.cfg, uplink);
        // The old device first: a userspace one gives its UDP port back when dropped.
        self.devs[slot] = None;
        if let Some(l) = k.link_by_name(name).await? {
            warn!("{name} already exists; recreating it");
            k.del_link(l.index).await.ignore_not_found()?;
        }
        let bind = match (self.cfg.mode, slot) {
            (Mode::Separate, 0) => Bind::V4,
            (Mode::Separate, _) => Bind::V6,
            _ => Bind::Dual,
        };
        let settings = Settings {
            name: name.to_string(),
            private,
            port: port_for(&self.cfg, slot == 1),
            psk: self.cfg.psk,
            keepalive: self.cfg.keepalive,
            bind,
        };
        let port = settings.port;
        let imp = match k.create_wireguard(name, mtu).await {
            Ok(()) => match kernel::Device::configure(self.genl.clone(), settings).await {
                Ok(d) => Imp::Kernel(d),
                Err(e) => {
                    if let Some(l) = k.link_by_name(name).await? {
                        k.del_link(l.index).await.ignore_not_found()?;
                    }
                    return Err(BackendError::Config(e));
                }
            },
            Err(e) if e.errno() == Some(libc::EOPNOTSUPP) => {
                let d = (self.start_userspace)(settings).map_err(|e| {
                    BackendError::Config(format!("{name}: userspace WireGuard on UDP port {port}: {e}"))
                })?;
                uapi::serve_or_warn(uapi::socket_path(&uapi::socket_dir(), name), d.uapi_status());
                Imp::User(d)
            }
            Err(e) => return Err(e.into()),
        };
        let link = k
            .link_by_name(name)
            .await?
            .ok_or_else(|| BackendError::Config(format!("{name} vanished right after it was created")))?;
        if link.mtu != mtu {
            k.set_mtu(link.index, mtu).await?;
        }
        let dev = Dev { name, index: link.index, mtu, imp };
        info!(
            "{name}: {} WireGuard, UDP port {port}, MTU {mtu}, public key {}",
            dev.implementation(),
            private.public()
        );
        self.devs[slot] = Some(dev);
        Ok(())
    }

    /// The peers the slot's device should have: one family's (separate mode),
    /// or both merged by key with the endpoint `Mode` picks.
    fn peer_set(&self, slot: usize) -> PeerSet {
        let fams: &[usize] = match (self.cfg.mode, slot) {
            (Mode::Separate, 0) => &[0],
            (Mode::Separate, _) => &[1],
            _ => &[0, 1],
        };
        let mut eps: std::collections::BTreeMap<Key, [Option<SocketAddr>; 2]> = Default::default();
        let mut set = PeerSet::new();
        for &f in fams {
            for p in &self.want[f] {
                let e = set.entry(p.key).or_insert_with(|| PeerConfig { endpoint: None, allowed: Vec::new() });
                e.allowed.push(p.subnet);
                eps.entry(p.key).or_default()[f] = Some(p.endpoint);
            }
        }
        for (key, cfg) in set.iter_mut() {
            let [v4, v6] = eps[key];
            cfg.endpoint = match self.cfg.mode {
                Mode::Separate | Mode::Ipv4 => v4.or(v6),
                Mode::Ipv6 => v6.or(v4),
                Mode::Auto => match (v4, v6) {
                    (Some(a), Some(b)) => {
                        // Upstream's choice: a public IPv4 address first, then a public IPv6 one
                        // when ours is public too, else IPv4.
                        if !is_private(a.ip()) && self.own_public[0].is_some() {
                            Some(a)
                        } else if !is_private(b.ip()) && self.own_public[1].is_some_and(|o| !is_private(o)) {
                            Some(b)
                        } else {
                            Some(a)
                        }
                    }
                    (a, b) => a.or(b),
                },
            };
            cfg.allowed.sort();
        }
        set
    }
}

impl<G: Genl + Default> Backend for WireGuard<G> {
    const TYPE: &'static str = "wireguard";
    const SYNCS_PEERS: bool = true;
    type Config = Config;
    type PeerData = WgPeer;

    fn peer_data(lease: &Lease, v6: bool) -> Option<WgPeer> {
        peer_data(lease, v6)
    }

    fn config(section: &BackendConfig, warn: &mut dyn FnMut(String)) -> Result<Config, NetConfigError> {
        Config::parse(section, warn)
    }

    fn new(cfg: Config) -> WireGuard<G> {
        WireGuard::with_parts(cfg, Rc::new(G::default()), userspace::Device::start, key::key_file())
    }

    async fn teardown<K: Kernel>(k: &K, section: &BackendConfig) -> Result<(), BackendError> {
        teardown(k, section).await
    }

    async fn setup<K: Kernel, M: SubnetManager>(
        &mut self,
        k: &K,
        mgr: &mut M,
        fam: &FamilyNet,
        uplink: &Uplink,
    ) -> Result<Value, BackendError> {
        setup(self, k, mgr, fam, uplink).await
    }

    async fn ensure<K: Kernel>(
        &mut self,
        k: &K,
        fam: &FamilyNet,
        uplink: &Uplink,
        subnet: Option<IpNet>,
        _advertised: Option<&Value>,
    ) -> Result<bool, BackendError> {
        ensure(self, k, fam, uplink, subnet).await
    }

    fn mtu(&self, _fam: &FamilyNet, uplink: &Uplink) -> u32 {
        device_mtu(&self.cfg, uplink)
    }

    fn desired(&self, fam: &FamilyNet, _uplink: &Uplink, peers: &[Peer<WgPeer>]) -> Option<Desired> {
        desired(self, fam, peers)
    }

    async fn sync_peers<K: Kernel>(
        &mut self,
        _k: &K,
        fam: &FamilyNet,
        peers: &[Peer<WgPeer>],
        prune: bool,
    ) -> Result<(), BackendError> {
        sync_peers(self, fam, peers, prune).await
    }

    async fn stop<K: Kernel>(&mut self, k: &K) {
        stop(self, k).await
    }

    fn devices(&self) -> (Vec<String>, Vec<u32>) {
        let devs = self.devs.iter().flatten();
        (devs.clone().map(|d| d.name.to_string()).collect(), devs.map(|d| d.index).collect())
    }
}

/// A peer's PublicKey (and Port) for one family; `None` without a key that parses.
pub fn peer_data(lease: &Lease, v6: bool) -> Option<WgPeer> {
    let d = lease.backend_data::<WireguardData>(v6)?;
    Some(WgPeer { key: Key::parse(&d.public_key).ok()?, port: d.port.filter(|p| *p != 0) })
}

async fn setup<G: Genl, K: Kernel, M: SubnetManager>(
    wg: &mut WireGuard<G>,
    k: &K,
    _mgr: &mut M,
    fam: &FamilyNet,
    uplink: &Uplink,
) -> Result<Value, BackendError> {
    let key = wg.key()?;
    wg.own_public[fam.v6 as usize] = Some(fam.public_ip);
    let slot = wg.slot(fam.v6);
    if wg.devs[slot].is_none() {
        wg.create(k, slot, uplink).await?;
    }
    let data = WireguardData { public_key: key.public().to_string(), port: Some(wg.family_port(fam.v6)) };
    serde_json::to_value(data).map_err(|e| BackendError::Config(e.to_string()))
}

async fn ensure<G: Genl, K: Kernel>(
    wg: &mut WireGuard<G>,
    k: &K,
    fam: &FamilyNet,
    uplink: &Uplink,
    subnet: Option<IpNet>,
) -> Result<bool, BackendError> {
    let slot = wg.slot(fam.v6);
    let Some(dev) = &wg.devs[slot] else { return Ok(false) };
    let name = dev.name;
    let mut created = false;
    let link = match k.link_by_name(name).await? {
        Some(l) if l.index == dev.index => l,
        _ => {
            warn!("{name} was missing and has been rebuilt; replaying every peer into it");
            wg.create(k, slot, uplink).await?;
            created = true;
            k.link_by_name(name).await?.ok_or_else(|| BackendError::Config(format!("{name} vanished")))?
        }
    };
    let dev = wg.devs[slot].as_ref().expect("just made");
    if link.mtu != dev.mtu {
        k.set_mtu(link.index, dev.mtu).await?;
    }
    if let Some(s) = subnet {
        let ours = IpNet::new(s.network_addr(), if fam.v6 { 128 } else { 32 }).expect("host prefix");
        let addrs = k.addresses(Some(link.index)).await?;
        for a in addrs.iter().filter(|a| a.net.is_ipv4() != fam.v6 && a.net != ours) {
            // Link-local IPv6 addresses are the kernel's; leave them.
            if matches!(a.net.addr(), IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80) {
                continue;
            }
            k.del_address(link.index, a.net).await.ignore_not_found()?;
        }
        if !addrs.iter().any(|a| a.net == ours) {
            k.add_address(link.index, ours).await.ignore_exists()?;
        }
    }
    if !link.up {
        k.set_up(link.index).await?;
    }
    Ok(created)
}

fn desired<G: Genl>(wg: &WireGuard<G>, fam: &FamilyNet, peers: &[Peer<WgPeer>]) -> Option<Desired> {
    let dev = wg.devs[wg.slot(fam.v6)].as_ref()?;
    let mut d = Desired::on(None);
    d.routes.push(network_route(fam.config.network, dev.index));
    for p in peers.iter().filter(|p| p.data.is_none()) {
        d.skipped.push((p.subnet, "lease has no WireGuard PublicKey".to_string()));
    }
    Some(d)
}

/// The whole pod network onto the device (upstream's one route); WireGuard picks the peer by its allowed IPs.
pub fn network_route(network: IpNet, dev: u32) -> Route {
    Route::new(network).dev(dev).scope_link().protocol(RTPROT_FLANNEL)
}

/// The devices' MTU: the underlay's (`MTU`, else the uplink's) less WireGuard's overhead.
pub fn device_mtu(cfg: &Config, uplink: &Uplink) -> u32 {
    cfg.mtu.unwrap_or(uplink.mtu).saturating_sub(OVERHEAD)
}

/// The device carrying a family, by name.
pub fn device_for(mode: Mode, v6: bool) -> &'static str {
    if v6 && mode == Mode::Separate { DEVICE_V6 } else { DEVICE }
}

/// The UDP port the device carrying a family listens on.
pub fn port_for(cfg: &Config, v6: bool) -> u16 {
    if v6 && cfg.mode == Mode::Separate { cfg.listen_port_v6 } else { cfg.listen_port }
}

async fn sync_peers<G: Genl>(
    wg: &mut WireGuard<G>,
    fam: &FamilyNet,
    peers: &[Peer<WgPeer>],
    prune: bool,
) -> Result<(), BackendError> {
    let own_port = wg.family_port(fam.v6);
    wg.want[fam.v6 as usize] = peers
        .iter()
        .filter_map(|p| {
            let d = p.data.as_ref()?;
            Some(FamPeer {
                key: d.key,
                endpoint: SocketAddr::new(p.public_ip, d.port.unwrap_or(own_port)),
                subnet: p.subnet,
            })
        })
        .collect();
    let slot = wg.slot(fam.v6);
    // One device for both families: the IPv6 pass (the second) writes it, with both
    // families' peers known, so no peer starts on an endpoint of the wrong family.
    if wg.cfg.mode != Mode::Separate && !fam.v6 && wg.own_public[1].is_some() {
        return Ok(());
    }
    let set = wg.peer_set(slot);
    let Some(dev) = &wg.devs[slot] else { return Ok(()) };
    let done = dev.set_peers(&set, prune).await?;
    if !done.is_noop() {
        info!("{}: peers +{} ~{} -{} ({} in all)", dev.name, done.added, done.updated, done.removed, set.len());
    }
    Ok(())
}

async fn stop<G: Genl, K: Kernel>(wg: &mut WireGuard<G>, k: &K) {
    for dev in wg.devs.iter_mut().filter_map(Option::take) {
        match k.del_link(dev.index).await.ignore_not_found() {
            Ok(()) => info!("removed the WireGuard device {} (as upstream does on exit)", dev.name),
            Err(e) => warn!("removing {}: {e}", dev.name),
        }
        if let Imp::User(_) = dev.imp {
            let _ = std::fs::remove_file(uapi::socket_path(&uapi::socket_dir(), dev.name));
        }
    }
}

/// Removes the devices of an earlier wireguard run (a kernel device outlives a killed flanneld).
pub async fn teardown<K: Kernel>(k: &K, section: &BackendConfig) -> Result<(), BackendError> {
    for name in [DEVICE, DEVICE_V6] {
        if let Some(l) = k.link_by_name(name).await?
            && matches!(l.kind.as_deref(), Some("wireguard") | Some("tun"))
        {
            k.del_link(l.index).await.ignore_not_found()?;
            info!(
                "backend is {}: removed the WireGuard device {name} left from an earlier wireguard run",
                section.kind
            );
        }
    }
    Ok(())
}
