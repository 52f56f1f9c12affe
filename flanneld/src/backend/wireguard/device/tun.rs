//! A TUN device: `/dev/net/tun` attached to a named interface (the kernel
//! creates it, or attaches to an existing TUN of that name). Why not a crate:
//! this is one ioctl; the TUN crates bring async runtimes and platform layers
//! we do not need.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUN: &str = "/dev/net/tun";

fn make_tun_node() -> std::io::Result<()> {
    std::fs::create_dir_all("/dev/net")?;
    let path = std::ffi::CString::new(TUN).expect("no NUL");
    // SAFETY: a NUL-terminated path; mknod(2) has no other preconditions.
    let rc = unsafe { libc::mknod(path.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(10, 200)) };
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::AlreadyExists {
            return Err(std::io::Error::new(e.kind(), format!("{TUN} is missing and cannot be made: {e}")));
        }
    }
    tracing::info!("made {TUN} (char 10:200): this container has none");
    Ok(())
}

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Opens (creating if needed) the TUN interface `name`, without packet info
/// headers: reads and writes are bare IP packets.
pub fn open(name: &str) -> std::io::Result<File> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("bad interface name {name:?}")));
    }
    let f = match OpenOptions::new().read(true).write(true).open(TUN) {
        // A container without the host's /dev (the manifest's, as upstream's, is not
        // privileged) has no /dev/net/tun; the device cgroup allows it (10:200, as
        // runc's defaults do) and CAP_MKNOD makes it.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            make_tun_node()?;
            OpenOptions::new().read(true).write(true).open(TUN)?
        }
        other => other?,
    };
    let mut req =
        IfReq { name: [0; libc::IFNAMSIZ], flags: (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short, _pad: [0; 22] };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `IfReq` lays out.
    if unsafe { libc::ioctl(f.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // Non-blocking, so the reader can look up from an idle device (see `wait_readable`).
    // SAFETY: fcntl(2) on a descriptor we own.
    if unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(f)
}

/// Waits until `f` has a packet to read, or `timeout` passed (or it is gone).
pub fn wait_readable(f: &File, timeout: std::time::Duration) {
    let mut p = libc::pollfd { fd: f.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut p, 1, timeout.as_millis() as libc::c_int) };
}
