//! Active probes through the data path: ICMP echo to each peer's address on
//! the far side of the tunnel or route, once small and once at the pods' MTU
//! with DF set, so "blocked" and "too big" are told apart. One raw socket
//! (NET_RAW, which the DaemonSet grants) for every peer at once: requests go
//! out back to back and replies are matched by sequence number, so thousands
//! of peers take the same couple of seconds as one.

use std::collections::HashMap;
use std::mem::MaybeUninit;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
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

const SMALL: usize = 56;
/// How long to wait for replies; requests without one are sent again once, halfway.
const WAIT: Duration = Duration::from_millis(2000);

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn echo(ident: u16, seq: u16, payload: usize) -> Vec<u8> {
    let mut p = vec![0u8; 8 + payload];
    p[0] = 8; // echo request
    p[4..6].copy_from_slice(&ident.to_be_bytes());
    p[6..8].copy_from_slice(&seq.to_be_bytes());
    for (i, b) in p[8..].iter_mut().enumerate() {
        *b = i as u8;
    }
    let c = checksum(&p);
    p[2..4].copy_from_slice(&c.to_be_bytes());
    p
}

/// Probes every target: a small echo and one of `mtu` bytes (the whole IP
/// packet) with DF. Targets are indexed by position; the answer vector matches.
pub fn probe(targets: &[Ipv4Addr], mtu: u32) -> std::io::Result<Vec<Answer>> {
    let sock = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4))?;
    sock.set_nonblocking(true)?;
    // DF on every packet, never fragment locally (IP_PMTUDISC_PROBE: ignore cached PMTU, send as is).
    let val: libc::c_int = libc::IP_PMTUDISC_PROBE;
    // SAFETY: setsockopt on a socket we own with a c_int option value.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            (&val as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let ident = (std::process::id() & 0xffff) as u16;
    let full = (mtu as usize).saturating_sub(28).max(SMALL);
    let mut answers = vec![Answer::default(); targets.len()];
    // seq = 2 * index (+1 for the full-size one); 65536 / 2 targets per round is plenty.
    let by_seq: HashMap<u16, (usize, bool)> = (0..targets.len().min(32768))
        .flat_map(|i| [((2 * i) as u16, (i, false)), ((2 * i + 1) as u16, (i, true))])
        .collect();
    let send = |answers: &mut Vec<Answer>, only_missing: bool| {
        for (i, ip) in targets.iter().enumerate().take(32768) {
            let a = answers[i];
            let to: SocketAddr = SocketAddrV4::new(*ip, 0).into();
            if !(only_missing && a.small) {
                let _ = sock.send_to(&echo(ident, (2 * i) as u16, SMALL), &to.into());
            }
            if !(only_missing && (a.full || a.full_too_big_here)) {
                match sock.send_to(&echo(ident, (2 * i + 1) as u16, full), &to.into()) {
                    Err(e) if e.raw_os_error() == Some(libc::EMSGSIZE) => answers[i].full_too_big_here = true,
                    _ => {}
                }
            }
        }
    };
    send(&mut answers, false);
    let start = Instant::now();
    let mut resent = false;
    let mut buf = [MaybeUninit::<u8>::uninit(); 65536];
    while start.elapsed() < WAIT {
        if !resent && start.elapsed() >= WAIT / 2 {
            send(&mut answers, true);
            resent = true;
        }
        if answers.iter().all(|a| a.small && (a.full || a.full_too_big_here)) {
            break;
        }
        match sock.recv_from(&mut buf) {
            Ok((n, from)) => {
                // SAFETY: recv_from initialised the first n bytes.
                let pkt: Vec<u8> = buf[..n].iter().map(|b| unsafe { b.assume_init() }).collect();
                let ihl = usize::from(pkt.first().map_or(0, |b| b & 0x0f)) * 4;
                let Some(icmp) = pkt.get(ihl..) else { continue };
                if icmp.len() < 8 || icmp[0] != 0 || u16::from_be_bytes([icmp[4], icmp[5]]) != ident {
                    continue;
                }
                let seq = u16::from_be_bytes([icmp[6], icmp[7]]);
                if let Some((i, is_full)) = by_seq.get(&seq).copied()
                    && from.as_socket_ipv4().is_some_and(|f| *f.ip() == targets[i])
                {
                    if is_full { answers[i].full = true } else { answers[i].small = true }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(2)),
            Err(_) => std::thread::sleep(Duration::from_millis(2)),
        }
    }
    Ok(answers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_requests_carry_a_valid_checksum() {
        let p = echo(0x1234, 7, SMALL);
        assert_eq!(p.len(), 64);
        assert_eq!((p[0], &p[4..8]), (8, &[0x12, 0x34, 0, 7][..]));
        // A packet with its checksum in place sums to zero.
        assert_eq!(checksum(&p), 0);
    }
}
