//! A WireGuard device as the backend drives it: created with its private key
//! and port, then told the full set of peers it should have; it adds,
//! changes and removes peers in place. Two implementations, chosen at start:
//! the kernel's (`ip link add type wireguard` works; configured over
//! WireGuard's generic netlink family) and flanneld's own userspace one over
//! a TUN interface (kernels without WireGuard).

pub mod kernel;
mod tun;
pub mod uapi;
pub mod userspace;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::SystemTime;

use flannel_shared::IpNet;

use super::key::Key;

/// Which sockets a device listens on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bind {
    V4,
    V6,
    /// Both families on one port (the single-device modes).
    Dual,
}

#[derive(Clone, Debug)]
pub struct Settings {
    pub name: String,
    pub private: Key,
    pub port: u16,
    pub psk: Option<Key>,
    pub keepalive: Option<u16>,
    pub bind: Bind,
}

/// One peer as the device should have it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerConfig {
    pub endpoint: Option<SocketAddr>,
    pub allowed: Vec<IpNet>,
}

/// Every peer the device should have, by public key.
pub type PeerSet = BTreeMap<Key, PeerConfig>;

/// What a [`PeerSet`] changed on a device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub added: usize,
    pub updated: usize,
    pub removed: usize,
}

impl Changes {
    pub fn is_noop(&self) -> bool {
        *self == Changes::default()
    }
}

/// A peer as the device reports it.
#[derive(Clone, Debug)]
pub struct PeerStatus {
    pub key: Key,
    pub cfg: PeerConfig,
    pub last_handshake: Option<SystemTime>,
    pub tx_bytes: u64,
    pub rx_bytes: u64,
}

/// Which implementation carries the tunnels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Implementation {
    Kernel,
    Userspace,
}

impl std::fmt::Display for Implementation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Implementation::Kernel => "kernel",
            Implementation::Userspace => "userspace (boringtun over TUN)",
        })
    }
}
