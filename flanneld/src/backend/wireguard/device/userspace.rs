//! The userspace WireGuard device: a TUN interface whose packets flanneld
//! encrypts itself with boringtun's Noise implementation (`noise::Tunn`: the
//! handshake, sessions, timers, cookies), over one UDP socket. Three threads,
//! so the agent's event loop never carries a packet:
//! * `tun`: a packet from the kernel → the peer whose allowed IPs hold its
//!   destination → encrypted → UDP to the peer's endpoint;
//! * `udp`: a datagram → its peer (by the receiver index, or the static key in
//!   a handshake initiation) → decrypted → written to the TUN if its source is
//!   in the peer's allowed IPs (WireGuard's cryptokey routing);
//! * `timers`: handshake retries, keepalives, session expiry, the cookie
//!   rate limiter's reset.
//!
//! Peers are added, changed and removed in place under a lock the data path
//! only reads; a peer that stays keeps its session.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519;
use socket2::{Domain, Protocol, Socket, Type};
use tracing::{debug, warn};

use super::{Bind, Changes, PeerConfig, PeerSet, PeerStatus, Settings};
use crate::backend::wireguard::key::Key;

/// Handshake initiations a second before cookies are asked for (WireGuard's own figure).
const HANDSHAKE_RATE_LIMIT: u64 = 100;
/// How often peers' timers run (WireGuard's own timers are no finer than this).
const TICK: Duration = Duration::from_millis(250);
const BUF: usize = 65_535 + 148;

struct PeerState {
    index: u32,
    inner: Mutex<Inner>,
}

struct Inner {
    tunn: Tunn,
    cfg: PeerConfig,
    /// Whether the peer has proved it holds the session's keys: a handshake
    /// response or data from it decrypted. boringtun counts a responder's session
    /// from the initiation it answered, which a PSK mismatch never completes;
    /// WireGuard (and `wg show`) reports a handshake only once confirmed.
    confirmed: bool,
}

#[derive(Default)]
struct Peers {
    by_key: HashMap<Key, Arc<PeerState>>,
    by_index: HashMap<u32, Arc<PeerState>>,
    /// Allowed IPs: (is v6, prefix length, masked address) → peer; `lens` the
    /// distinct (family, length) pairs, longest first, for the lookup.
    by_net: HashMap<(bool, u8, u128), Arc<PeerState>>,
    lens: Vec<(bool, u8)>,
    next_index: u32,
}

fn bits(ip: IpAddr) -> (bool, u128) {
    match ip {
        IpAddr::V4(a) => (false, u32::from(a) as u128),
        IpAddr::V6(a) => (true, u128::from(a)),
    }
}

fn masked(v6: bool, len: u8, addr: u128) -> u128 {
    let width = if v6 { 128 } else { 32 };
    if len == 0 {
        0
    } else {
        addr & (u128::MAX << (width - len as u32)) & if v6 { u128::MAX } else { u32::MAX as u128 }
    }
}

impl Peers {
    fn lookup(&self, ip: IpAddr) -> Option<&Arc<PeerState>> {
        let (v6, addr) = bits(ip);
        self.lens
            .iter()
            .filter(|(f, _)| *f == v6)
            .find_map(|&(_, len)| self.by_net.get(&(v6, len, masked(v6, len, addr))))
    }

    fn reindex_nets(&mut self) {
        self.by_net.clear();
        for p in self.by_key.values() {
            for n in &p.inner.lock().unwrap().cfg.allowed {
                let (v6, addr) = bits(n.addr());
                self.by_net.insert((v6, n.prefix(), masked(v6, n.prefix(), addr)), p.clone());
            }
        }
        let mut lens: Vec<(bool, u8)> = self.by_net.keys().map(|(v6, len, _)| (*v6, *len)).collect();
        lens.sort_by_key(|l| std::cmp::Reverse(l.1));
        lens.dedup();
        self.lens = lens;
    }
}

struct Shared {
    name: String,
    private: x25519::StaticSecret,
    public: x25519::PublicKey,
    settings: Settings,
    rate: Arc<RateLimiter>,
    peers: RwLock<Peers>,
    /// socket2's, not std's: a receive woken by shutdown (the device dropped)
    /// returns no address, on which std's `recv_from` panics.
    udp: Socket,
    tun: File,
    stopped: AtomicBool,
}

pub struct Device {
    shared: Arc<Shared>,
    /// Its threads (TUN, UDP, timers), joined on drop: the socket closes with the
    /// last of them, so the port is free for a rebuilt device.
    threads: Vec<std::thread::JoinHandle<()>>,
}

fn bind(b: Bind, port: u16) -> std::io::Result<Socket> {
    let (domain, addr): (Domain, SocketAddr) = match b {
        Bind::V4 => (Domain::IPV4, (std::net::Ipv4Addr::UNSPECIFIED, port).into()),
        Bind::V6 | Bind::Dual => (Domain::IPV6, (std::net::Ipv6Addr::UNSPECIFIED, port).into()),
    };
    let s = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
    if b != Bind::V4 {
        s.set_only_v6(b == Bind::V6)?;
    }
    // Room for bursts: a full TCP window in flight between two nodes.
    let _ = s.set_recv_buffer_size(4 << 20);
    let _ = s.set_send_buffer_size(4 << 20);
    s.bind(&addr.into())?;
    Ok(s)
}

/// A v4 endpoint as a dual-stack socket sends to it.
fn for_socket(b: Bind, a: SocketAddr) -> SocketAddr {
    match (b, a) {
        (Bind::Dual, SocketAddr::V4(v4)) => SocketAddr::new(IpAddr::V6(v4.ip().to_ipv6_mapped()), v4.port()),
        _ => a,
    }
}

impl Device {
    /// Creates the TUN interface `settings.name` and starts its threads.
    pub fn start(settings: Settings) -> std::io::Result<Device> {
        let tun = super::tun::open(&settings.name)?;
        let udp = bind(settings.bind, settings.port)?;
        let private = x25519::StaticSecret::from(settings.private.0);
        let public = x25519::PublicKey::from(&private);
        let first = u32::from_le_bytes(Key::generate()?.0[..4].try_into().unwrap()) & 0x00ff_ffff;
        let shared = Arc::new(Shared {
            name: settings.name.clone(),
            rate: Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT)),
            private,
            public,
            settings,
            peers: RwLock::new(Peers { next_index: first, ..Peers::default() }),
            udp,
            tun,
            stopped: AtomicBool::new(false),
        });
        let mut threads = Vec::new();
        for (what, f) in [("tun", tun_loop as fn(&Shared)), ("udp", udp_loop), ("timers", timer_loop)] {
            let s = shared.clone();
            threads.push(std::thread::Builder::new().name(format!("{}-{what}", s.name)).spawn(move || f(&s))?);
        }
        Ok(Device { shared, threads })
    }

    pub fn listen_port(&self) -> u16 {
        listen_port(&self.shared)
    }

    /// Adds, changes and (with `prune`) removes peers so the device has `want`.
    pub fn set_peers(&self, want: &PeerSet, prune: bool) -> Changes {
        let s = &self.shared;
        let mut peers = s.peers.write().unwrap();
        let mut done = Changes::default();
        let mut init = [0u8; 256];
        for (key, cfg) in want {
            if let Some(p) = peers.by_key.get(key) {
                let mut inner = p.inner.lock().unwrap();
                if inner.cfg != *cfg {
                    inner.cfg = cfg.clone();
                    done.updated += 1;
                }
                continue;
            }
            let index = peers.next_index;
            peers.next_index = (index + 1) & 0x00ff_ffff;
            let tunn = Tunn::new(
                s.private.clone(),
                x25519::PublicKey::from(key.0),
                s.settings.psk.map(|k| k.0),
                s.settings.keepalive,
                index,
                Some(s.rate.clone()),
            );
            let mut inner = Inner { tunn, cfg: cfg.clone(), confirmed: false };
            // Handshake at once rather than on the first packet: a peer that kept a session
            // with our previous run (we restarted) would otherwise send into it, unanswered,
            // until its own rekey timeout (~15 s); our initiation replaces that session now.
            if let Some(ep) = cfg.endpoint
                && let TunnResult::WriteToNetwork(b) = inner.tunn.format_handshake_initiation(&mut init, false)
            {
                send(s, ep, b);
            }
            let p = Arc::new(PeerState { index, inner: Mutex::new(inner) });
            peers.by_index.insert(index, p.clone());
            peers.by_key.insert(*key, p);
            done.added += 1;
        }
        if prune {
            let gone: Vec<Key> = peers.by_key.keys().filter(|k| !want.contains_key(k)).copied().collect();
            for k in gone {
                if let Some(p) = peers.by_key.remove(&k) {
                    peers.by_index.remove(&p.index);
                    done.removed += 1;
                }
            }
        }
        if !done.is_noop() {
            peers.reindex_nets();
        }
        done
    }

    /// The peers as the device has them, with their handshake and byte counts.
    pub fn peers(&self) -> Vec<PeerStatus> {
        peers_of(&self.shared)
    }

    pub fn settings(&self) -> &Settings {
        &self.shared.settings
    }

    /// The UAPI `get=1` answer, for as long as the device runs.
    pub fn uapi_status(&self) -> impl Fn() -> Option<String> + Send + 'static {
        let weak = Arc::downgrade(&self.shared);
        move || {
            let shared = weak.upgrade()?;
            if shared.stopped.load(Ordering::Relaxed) {
                return None;
            }
            Some(super::uapi::format_get(&shared.settings, listen_port(&shared), &peers_of(&shared)))
        }
    }

    pub fn public_key(&self) -> Key {
        Key(self.shared.public.to_bytes())
    }
}

/// Stops and joins the threads: the UDP one woken by a shutdown of its socket,
/// the timers by an unpark, the TUN one within a poll period (at once when its
/// interface is gone). The socket closes with the last, freeing the port.
impl Drop for Device {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        self.shared.stopped.store(true, Ordering::Relaxed);
        // SAFETY: shutdown(2) on a socket this device owns and has not closed.
        unsafe { libc::shutdown(self.shared.udp.as_raw_fd(), libc::SHUT_RDWR) };
        for t in &self.threads {
            t.thread().unpark();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn listen_port(s: &Shared) -> u16 {
    s.udp.local_addr().ok().and_then(|a| a.as_socket()).map_or(0, |a| a.port())
}

fn peers_of(s: &Shared) -> Vec<PeerStatus> {
    let peers = s.peers.read().unwrap();
    let mut out: Vec<PeerStatus> = peers
        .by_key
        .iter()
        .map(|(k, p)| {
            let inner = p.inner.lock().unwrap();
            let (since, tx, rx, ..) = inner.tunn.stats();
            PeerStatus {
                key: *k,
                cfg: inner.cfg.clone(),
                last_handshake: since
                    .filter(|_| inner.confirmed)
                    .and_then(|d| std::time::SystemTime::now().checked_sub(d)),
                tx_bytes: tx as u64,
                rx_bytes: rx as u64,
            }
        })
        .collect();
    out.sort_by_key(|p| p.key);
    out
}

fn send(s: &Shared, to: SocketAddr, pkt: &[u8]) {
    if let Err(e) = s.udp.send_to(pkt, &for_socket(s.settings.bind, to).into()) {
        debug!("{}: sending to {to}: {e}", s.name);
    }
}

fn tun_loop(s: &Shared) {
    let mut pkt = vec![0u8; BUF];
    let mut out = vec![0u8; BUF];
    let mut tun = &s.tun;
    while !s.stopped.load(Ordering::Relaxed) {
        let n = match tun.read(&mut pkt) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                // Idle: wait for a packet, looking at `stopped` every poll period.
                super::tun::wait_readable(&s.tun, TICK);
                continue;
            }
            Err(e) => {
                // The interface was deleted (SIGTERM's teardown, a switch): this device is done.
                debug!("{}: reading the TUN: {e}; stopping", s.name);
                return;
            }
        };
        let Some(dst) = Tunn::dst_address(&pkt[..n]) else { continue };
        let peers = s.peers.read().unwrap();
        let Some(p) = peers.lookup(dst) else { continue };
        let mut inner = p.inner.lock().unwrap();
        let Some(endpoint) = inner.cfg.endpoint else { continue };
        match inner.tunn.encapsulate(&pkt[..n], &mut out) {
            TunnResult::WriteToNetwork(b) => send(s, endpoint, b),
            TunnResult::Err(e) => debug!("{}: encapsulating for {dst}: {e:?}", s.name),
            _ => {}
        }
    }
}

fn udp_loop(s: &Shared) {
    let mut pkt = vec![0u8; BUF];
    let mut out = vec![0u8; BUF];
    let mut tun = &s.tun;
    while !s.stopped.load(Ordering::Relaxed) {
        // SAFETY: recv_from writes only initialised bytes into the buffer, which is
        // initialised already; the cast only widens what it may be given.
        let buf = unsafe { &mut *(&mut pkt[..] as *mut [u8] as *mut [std::mem::MaybeUninit<u8>]) };
        let (n, from) = match s.udp.recv_from(buf) {
            Ok((n, a)) => match a.as_socket() {
                Some(from) => (n, from),
                // Shut down (no sender): the device is being dropped.
                None if s.stopped.load(Ordering::Relaxed) => return,
                None => continue,
            },
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) if s.stopped.load(Ordering::Relaxed) => return,
            Err(e) => {
                warn!("{}: reading the UDP socket: {e}; stopping", s.name);
                return;
            }
        };
        let from = SocketAddr::new(from.ip().to_canonical(), from.port());
        let datagram = &pkt[..n];
        let peers = s.peers.read().unwrap();
        let peer = match Tunn::parse_incoming_packet(datagram) {
            Ok(Packet::HandshakeInit(h)) => {
                // Only the initiation names its sender, and finding out costs a DH:
                // the rate limiter (mac1, cookies under load) goes first.
                match s.rate.verify_packet(Some(from.ip()), datagram, &mut out) {
                    Ok(_) => {}
                    Err(TunnResult::WriteToNetwork(cookie)) => {
                        send(s, from, cookie);
                        continue;
                    }
                    Err(_) => continue,
                }
                parse_handshake_anon(&s.private, &s.public, &h)
                    .ok()
                    .and_then(|hh| peers.by_key.get(&Key(hh.peer_static_public)))
            }
            Ok(Packet::HandshakeResponse(p)) => peers.by_index.get(&(p.receiver_idx >> 8)),
            Ok(Packet::PacketCookieReply(p)) => peers.by_index.get(&(p.receiver_idx >> 8)),
            Ok(Packet::PacketData(p)) => peers.by_index.get(&(p.receiver_idx >> 8)),
            Err(_) => None,
        };
        let Some(p) = peer else { continue };
        // Only a response or data proves the peer holds the keys (see `Inner::confirmed`).
        let proves = matches!(datagram.first(), Some(2 | 4));
        let mut inner = p.inner.lock().unwrap();
        let mut flush = false;
        match inner.tunn.decapsulate(Some(from.ip()), datagram, &mut out) {
            TunnResult::WriteToNetwork(b) => {
                send(s, from, b);
                flush = true;
            }
            TunnResult::WriteToTunnelV4(b, src) => {
                if peers.lookup(IpAddr::V4(src)).is_some_and(|q| Arc::ptr_eq(q, p)) {
                    let _ = tun.write(b);
                }
            }
            TunnResult::WriteToTunnelV6(b, src) => {
                if peers.lookup(IpAddr::V6(src)).is_some_and(|q| Arc::ptr_eq(q, p)) {
                    let _ = tun.write(b);
                }
            }
            TunnResult::Err(e) => {
                debug!("{}: from {from}: {e:?}", s.name);
                continue;
            }
            TunnResult::Done => {}
        }
        inner.confirmed |= proves;
        if flush {
            // Packets queued while the handshake was under way.
            while let TunnResult::WriteToNetwork(b) = inner.tunn.decapsulate(None, &[], &mut out) {
                send(s, from, b);
            }
        }
        // An authenticated packet: the peer is where it came from (WireGuard's roaming).
        inner.cfg.endpoint = Some(from);
    }
}

fn timer_loop(s: &Shared) {
    let mut out = vec![0u8; BUF];
    let mut ticks = 0u64;
    while !s.stopped.load(Ordering::Relaxed) {
        std::thread::park_timeout(TICK);
        ticks += 1;
        if ticks.is_multiple_of(4) {
            s.rate.reset_count();
        }
        let peers = s.peers.read().unwrap();
        for p in peers.by_key.values() {
            let mut inner = p.inner.lock().unwrap();
            let Some(endpoint) = inner.cfg.endpoint else { continue };
            // Given up on (no traffic for minutes, or never reached): nothing is due until
            // a packet for it or from it wakes it, so the idle cost follows the active peers.
            if inner.tunn.is_expired() {
                continue;
            }
            match inner.tunn.update_timers(&mut out) {
                TunnResult::WriteToNetwork(b) => send(s, endpoint, b),
                // A peer without traffic for a while: its session and handshake gave up,
                // the idle state (and every tick's answer for it until it talks again).
                TunnResult::Err(WireGuardError::ConnectionExpired) => {}
                TunnResult::Err(e) => debug!("{}: timers: {e:?}", s.name),
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowed_ips_find_the_longest_prefix() {
        let mut peers = Peers::default();
        let mk = |i: u32, nets: &[&str]| {
            let key = x25519::StaticSecret::from([i as u8; 32]);
            let tunn = Tunn::new(key, x25519::PublicKey::from([9u8; 32]), None, None, i, None);
            let cfg = PeerConfig { endpoint: None, allowed: nets.iter().map(|n| n.parse().unwrap()).collect() };
            Arc::new(PeerState { index: i, inner: Mutex::new(Inner { tunn, cfg, confirmed: false }) })
        };
        peers.by_key.insert(Key([1; 32]), mk(1, &["10.244.1.0/24", "fd00:1::/64"]));
        peers.by_key.insert(Key([2; 32]), mk(2, &["10.244.0.0/16"]));
        peers.reindex_nets();
        let idx = |ip: &str| peers.lookup(ip.parse().unwrap()).map(|p| p.index);
        assert_eq!(idx("10.244.1.7"), Some(1));
        assert_eq!(idx("10.244.2.7"), Some(2));
        assert_eq!(idx("10.245.0.1"), None);
        assert_eq!(idx("fd00:1::5"), Some(1));
        assert_eq!(idx("fd00:2::5"), None);
    }
}
