//! Active probes through the data path: ICMP (ICMPv6 for IPv6 targets) echo
//! to each peer's address on the far side of the tunnel or route, once small
//! and once at the pods' MTU with DF set (IPv6 never fragments on the path;
//! locally it is told not to either), so "blocked" and "too big" are told
//! apart. One raw socket per family (NET_RAW, which the DaemonSet grants)
//! for every peer: all targets are in flight together, the sending paced to
//! [`RATE`] packets a second in bursts of [`BURST`] so that neither the local
//! queues nor the socket's receive buffer overflow at thousands of peers;
//! replies are matched by source address and sequence number. A target that
//! has not answered after [`ATTEMPT`] is asked once more, so a silent peer
//! costs 2 x [`ATTEMPT`] from its first request, and 5,000 of them about
//! 5,000 x 4 / [`RATE`] s of sending plus that.

use std::collections::{HashMap, VecDeque};
use std::mem::MaybeUninit;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

/// What came back from one target.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Answer {
    pub small: bool,
    pub full: bool,
    /// The full-size probe could not even leave this node (EMSGSIZE: the route's MTU is smaller).
    pub full_too_big_here: bool,
}

impl Answer {
    fn done(&self) -> bool {
        self.small && (self.full || self.full_too_big_here)
    }
}

/// One address to probe, and the size of the whole IP packet of its full-size probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target {
    pub ip: IpAddr,
    pub mtu: u32,
}

/// Payload of the small probe (ping's default).
pub const SMALL: usize = 56;
/// How long one attempt waits for its replies.
pub const ATTEMPT: Duration = Duration::from_millis(1000);
/// Attempts per target: the second one covers a lost packet.
const ATTEMPTS: u8 = 2;
/// Packets a second, at most (a full-size probe of 1450 bytes at this rate is ~116 Mbit/s).
pub const RATE: u32 = 10_000;
/// Packets sent back to back before the replies are read again.
const BURST: u32 = 50;
/// The receive buffer asked for: replies to a burst and what other ICMP the node sees meanwhile.
const RCVBUF: usize = 4 << 20;

const ICMP_ECHO: u8 = 8;
const ICMP_ECHOREPLY: u8 = 0;
const ICMPV6_ECHO_REQUEST: u8 = 128;
const ICMPV6_ECHO_REPLY: u8 = 129;
/// `SOL_RAW` / `ICMP_FILTER` (linux/icmp.h): a bit set drops that ICMP type.
const SOL_RAW: libc::c_int = 255;
const ICMP_FILTER: libc::c_int = 1;
/// `ICMP6_FILTER` (linux/icmpv6.h) at `IPPROTO_ICMPV6`: `struct icmp6_filter`, a bit set drops the type.
const ICMP6_FILTER: libc::c_int = 1;

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An echo request of `payload` bytes. ICMPv6's checksum covers a pseudo-header the
/// kernel knows, and the kernel fills it in on raw ICMPv6 sockets: left 0 here.
fn echo(v6: bool, ident: u16, seq: u16, payload: usize) -> Vec<u8> {
    let mut p = vec![0u8; 8 + payload];
    p[0] = if v6 { ICMPV6_ECHO_REQUEST } else { ICMP_ECHO };
    p[4..6].copy_from_slice(&ident.to_be_bytes());
    p[6..8].copy_from_slice(&seq.to_be_bytes());
    for (i, b) in p[8..].iter_mut().enumerate() {
        *b = i as u8;
    }
    if !v6 {
        let c = checksum(&p);
        p[2..4].copy_from_slice(&c.to_be_bytes());
    }
    p
}

/// The ICMP payload that makes a whole IP packet of `mtu` bytes.
fn full_payload(v6: bool, mtu: u32) -> usize {
    let headers = if v6 { 40 + 8 } else { 20 + 8 };
    (mtu as usize).saturating_sub(headers).max(SMALL)
}

fn setsockopt<T>(sock: &Socket, level: libc::c_int, name: libc::c_int, value: &T) -> std::io::Result<()> {
    // SAFETY: setsockopt on a socket we own, with a value of the size we pass.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            name,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

/// A raw ICMP (ICMPv6) socket that sends with DF, never fragments locally,
/// ignores any cached path MTU (so a probe tells what the path takes now) and
/// receives echo replies only.
fn socket(v6: bool) -> std::io::Result<Socket> {
    let sock = if v6 {
        Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6))?
    } else {
        Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4))?
    };
    sock.set_nonblocking(true)?;
    if v6 {
        setsockopt(&sock, libc::IPPROTO_IPV6, libc::IPV6_MTU_DISCOVER, &libc::IPV6_PMTUDISC_PROBE)?;
        setsockopt(&sock, libc::IPPROTO_IPV6, libc::IPV6_DONTFRAG, &1 as &libc::c_int)?;
        let mut filter = [u32::MAX; 8];
        filter[usize::from(ICMPV6_ECHO_REPLY >> 5)] &= !(1 << (ICMPV6_ECHO_REPLY & 31));
        setsockopt(&sock, libc::IPPROTO_ICMPV6, ICMP6_FILTER, &filter)?;
    } else {
        setsockopt(&sock, libc::IPPROTO_IP, libc::IP_MTU_DISCOVER, &libc::IP_PMTUDISC_PROBE)?;
        let filter: u32 = !(1 << ICMP_ECHOREPLY);
        setsockopt(&sock, SOL_RAW, ICMP_FILTER, &filter)?;
    }
    // Beyond rmem_max only with NET_ADMIN (SO_RCVBUFFORCE); the pacing keeps the default enough.
    let want = RCVBUF as libc::c_int;
    if setsockopt(&sock, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, &want).is_err() {
        let _ = sock.set_recv_buffer_size(RCVBUF);
    }
    Ok(sock)
}

/// Sequence numbers: the attempt and which probe, so a late reply to the first
/// attempt still counts.
fn seq(attempt: u8, full: bool) -> u16 {
    u16::from(attempt) << 1 | u16::from(full)
}

/// Probes every target: a small echo and one of its `mtu` bytes (the whole IP
/// packet) with DF. Targets are indexed by position; the answer vector matches.
/// Fails only when a socket a target needs cannot be opened (no NET_RAW).
pub fn probe(targets: &[Target]) -> std::io::Result<Vec<Answer>> {
    let mut socks: [Option<Socket>; 2] = [None, None];
    for v6 in [false, true] {
        if targets.iter().any(|t| t.ip.is_ipv6() == v6) {
            socks[usize::from(v6)] = Some(socket(v6)?);
        }
    }
    let ident = (std::process::id() & 0xffff) as u16;
    let by_ip: HashMap<IpAddr, usize> = targets.iter().enumerate().map(|(i, t)| (t.ip, i)).collect();
    let mut answers = vec![Answer::default(); targets.len()];
    let mut tries = vec![0u8; targets.len()];
    let mut due = vec![Instant::now(); targets.len()];
    // Targets still to be settled (answered, or out of attempts).
    let mut open = targets.len();
    let mut fresh = 0..targets.len();
    let mut again: VecDeque<usize> = VecDeque::new();
    // Sent and waiting, oldest first (every attempt waits as long, so also soonest due first).
    let mut waiting: VecDeque<usize> = VecDeque::new();
    let mut tokens = f64::from(BURST);
    let mut last = Instant::now();
    let mut buf = [MaybeUninit::<u8>::uninit(); 65536];
    // A bound for a send buffer that never drains: twice the paced schedule, plus the waits.
    let packets = (targets.len() * 2 * usize::from(ATTEMPTS)) as f64;
    let give_up = Instant::now() + Duration::from_secs_f64(2.0 * packets / f64::from(RATE)) + ATTEMPT * 3;
    while open > 0 && Instant::now() < give_up {
        let now = Instant::now();
        tokens = (tokens + now.duration_since(last).as_secs_f64() * f64::from(RATE)).min(f64::from(BURST));
        last = now;
        while let Some(&i) = waiting.front().filter(|&&i| due[i] <= now) {
            waiting.pop_front();
            if answers[i].done() {
                continue;
            }
            if tries[i] < ATTEMPTS {
                again.push_back(i);
            } else {
                open -= 1;
            }
        }
        // Asked again before asked first: a target's second chance keeps its time.
        let mut blocked = false;
        while tokens >= 2.0 {
            let Some(i) = again.pop_front().or_else(|| fresh.next()) else { break };
            let t = targets[i];
            let v6 = t.ip.is_ipv6();
            let Some(sock) = &socks[usize::from(v6)] else { continue };
            let to: SocketAddr = (t.ip, 0).into();
            let a = answers[i];
            let mut sent = 0;
            if !a.small {
                match sock.send_to(&echo(v6, ident, seq(tries[i], false), SMALL), &to.into()) {
                    Ok(_) => sent += 1,
                    Err(e) => blocked = transient(&e),
                }
            }
            if !(blocked || a.full || a.full_too_big_here) {
                match sock.send_to(&echo(v6, ident, seq(tries[i], true), full_payload(v6, t.mtu)), &to.into()) {
                    Ok(_) => sent += 1,
                    Err(e) if e.raw_os_error() == Some(libc::EMSGSIZE) => answers[i].full_too_big_here = true,
                    Err(e) => blocked = transient(&e),
                }
            }
            tokens -= f64::from(sent.max(1));
            if blocked {
                // The send buffer is full: this target goes first once it drains (the
                // attempt is not counted; a small probe already sent is harmless twice).
                again.push_front(i);
                break;
            }
            // Other errors (no route, say) leave the attempt unanswered, as a silent peer.
            tries[i] += 1;
            due[i] = Instant::now() + ATTEMPT;
            waiting.push_back(i);
        }
        for (v6, sock) in socks.iter().enumerate().filter_map(|(f, s)| Some((f == 1, s.as_ref()?))) {
            while let Ok((n, from)) = sock.recv_from(&mut buf) {
                // SAFETY: recv_from initialised the first n bytes.
                let pkt: &[u8] = unsafe { std::slice::from_raw_parts(buf.as_ptr().cast(), n) };
                // Raw IPv4 sockets hand over the IP header, raw ICMPv6 ones do not.
                let icmp = if v6 { Some(pkt) } else { pkt.get(usize::from(pkt.first().map_or(0, |b| b & 0x0f)) * 4..) };
                let Some(icmp) = icmp.filter(|p| p.len() >= 8) else { continue };
                let reply = if v6 { ICMPV6_ECHO_REPLY } else { ICMP_ECHOREPLY };
                if icmp[0] != reply || u16::from_be_bytes([icmp[4], icmp[5]]) != ident {
                    continue;
                }
                let Some(&i) = from.as_socket().and_then(|f| by_ip.get(&f.ip())) else { continue };
                let was = answers[i].done();
                if u16::from_be_bytes([icmp[6], icmp[7]]) & 1 == 1 {
                    answers[i].full = true;
                } else {
                    answers[i].small = true;
                }
                if !was && answers[i].done() {
                    open -= 1;
                }
            }
        }
        if open == 0 {
            break;
        }
        // Sleep until a token is there (when there is sending to do), a wait ends or a reply comes.
        let now = Instant::now();
        let sending = !again.is_empty() || !fresh.is_empty();
        let mut wake = waiting.front().map_or(Duration::from_millis(50), |&i| due[i].saturating_duration_since(now));
        if sending {
            let need = (2.0 - tokens).max(0.0) / f64::from(RATE);
            wake = wake.min(if blocked { Duration::from_millis(1) } else { Duration::from_secs_f64(need) });
        }
        wait_readable(&socks, wake.min(Duration::from_millis(50)));
    }
    Ok(answers)
}

/// Errors after which the same packet can go a moment later (the send buffer is full).
fn transient(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::WouldBlock || e.raw_os_error() == Some(libc::ENOBUFS)
}

/// poll(2) for a reply on any socket, at most `timeout`.
fn wait_readable(socks: &[Option<Socket>; 2], timeout: Duration) {
    let mut fds: Vec<libc::pollfd> =
        socks.iter().flatten().map(|s| libc::pollfd { fd: s.as_raw_fd(), events: libc::POLLIN, revents: 0 }).collect();
    let ms = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int;
    // SAFETY: poll on descriptors we own, with the array's real length.
    unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_requests_carry_a_valid_checksum() {
        let p = echo(false, 0x1234, 7, SMALL);
        assert_eq!(p.len(), 64);
        assert_eq!((p[0], &p[4..8]), (8, &[0x12, 0x34, 0, 7][..]));
        // A packet with its checksum in place sums to zero.
        assert_eq!(checksum(&p), 0);
        // ICMPv6: type 128, checksum left to the kernel.
        let p = echo(true, 0x1234, 7, SMALL);
        assert_eq!((p[0], &p[2..8]), (128, &[0, 0, 0x12, 0x34, 0, 7][..]));
    }

    #[test]
    fn full_size_probes_fill_the_mtu() {
        // The whole IP packet: 20 + 8 + payload for IPv4, 40 + 8 + payload for IPv6.
        assert_eq!(full_payload(false, 1450), 1422);
        assert_eq!(full_payload(true, 1430), 1382);
        assert_eq!(full_payload(false, 60), SMALL);
        assert_eq!((seq(0, false), seq(0, true), seq(1, false), seq(1, true)), (0, 1, 2, 3));
    }

    /// Loopback answers at once and an address nobody holds never does; both are
    /// settled, and the silent one after its two attempts.
    #[test]
    fn loopback_answers_and_silence_is_settled() {
        // Needs root (raw sockets); a private network namespace for this thread keeps the host out.
        // SAFETY: geteuid and unshare(CLONE_NEWNET) affect only this test's thread.
        unsafe {
            assert_eq!(libc::geteuid(), 0, "this test needs root (raw sockets in a private network namespace)");
            assert_eq!(libc::unshare(libc::CLONE_NEWNET), 0, "unshare: {}", std::io::Error::last_os_error());
        }
        let lo = std::process::Command::new("ip").args(["link", "set", "lo", "up"]).status().expect("ip");
        assert!(lo.success());
        let targets = [
            Target { ip: "127.0.0.1".parse().unwrap(), mtu: 1500 },
            Target { ip: "::1".parse().unwrap(), mtu: 1500 },
            // Loopback's MTU is 65536: a full probe of 70000 bytes cannot leave.
            Target { ip: "127.0.0.2".parse().unwrap(), mtu: 70_000 },
            // No route: every request fails to leave, as if nobody answered.
            Target { ip: "192.0.2.9".parse().unwrap(), mtu: 1500 },
        ];
        let a = probe(&targets).expect("raw sockets");
        assert_eq!(a[0], Answer { small: true, full: true, full_too_big_here: false });
        assert_eq!(a[1], Answer { small: true, full: true, full_too_big_here: false });
        assert_eq!(a[2], Answer { small: true, full: false, full_too_big_here: true });
        assert_eq!(a[3], Answer::default());
    }
}
