//! The one netlink layer of the project. Callers speak in domain terms
//! (`create_bridge`, `replace_route`, `add_address`); netlink messages stay here.
//!
//! A [`Netlink`] is bound to the network namespace its socket was created in:
//! [`Netlink::connect`] for the caller's own namespace, [`Netlink::connect_in`]
//! for another one. Both need a tokio runtime with I/O enabled.

mod addr;
mod link;
mod monitor;
mod neighbour;
mod route;

use std::fs::File;
use std::io;
use std::os::fd::{FromRawFd, IntoRawFd};

use rtnetlink::Handle;
use rtnetlink::packet_core::ErrorMessage;

pub use addr::Address;
pub use link::{Link, VethSpec, VxlanInfo, VxlanSpec};
pub use monitor::{KernelEvent, Monitor};
pub use neighbour::Neighbour;
pub use route::{
    RT_SCOPE_LINK, RT_SCOPE_UNIVERSE, RT_TABLE_MAIN, RTN_BLACKHOLE, RTN_UNICAST, RTPROT_BOOT, RTPROT_FLANNEL, Route,
};

use crate::netns;

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// ENODEV/ENOENT/ESRCH: the link, address or route does not exist.
    #[error("{op}: not found")]
    NotFound { op: String },
    /// EEXIST: it is there already.
    #[error("{op}: already exists")]
    Exists { op: String },
    #[error("{op}: {source}")]
    Kernel { op: String, source: io::Error },
    #[error("{op}: {msg}")]
    Other { op: String, msg: String },
}

impl NetlinkError {
    pub fn is_not_found(&self) -> bool {
        matches!(self, NetlinkError::NotFound { .. })
    }
    pub fn is_exists(&self) -> bool {
        matches!(self, NetlinkError::Exists { .. })
    }
    /// The errno behind the error, when the kernel gave one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            NetlinkError::NotFound { .. } => Some(libc::ENODEV),
            NetlinkError::Exists { .. } => Some(libc::EEXIST),
            NetlinkError::Kernel { source, .. } => source.raw_os_error(),
            NetlinkError::Other { .. } => None,
        }
    }
}

pub type Result<T> = std::result::Result<T, NetlinkError>;

/// For idempotent callers: "already gone" and "already there" are success.
pub trait Idempotent {
    /// ENODEV/ENOENT/ESRCH count as done (deleting what is gone).
    fn ignore_not_found(self) -> Result<()>;
    /// EEXIST counts as done (creating what is there).
    fn ignore_exists(self) -> Result<()>;
}

impl Idempotent for Result<()> {
    fn ignore_not_found(self) -> Result<()> {
        match self {
            Err(e) if e.is_not_found() => Ok(()),
            other => other,
        }
    }
    fn ignore_exists(self) -> Result<()> {
        match self {
            Err(e) if e.is_exists() => Ok(()),
            other => other,
        }
    }
}

fn map_err(op: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetlinkError {
    move |e| {
        let op = op.into();
        match e {
            rtnetlink::Error::NetlinkError(ErrorMessage { code: Some(code), .. }) => {
                let errno = -code.get();
                match errno {
                    libc::ENODEV | libc::ENOENT | libc::ESRCH => NetlinkError::NotFound { op },
                    libc::EEXIST => NetlinkError::Exists { op },
                    _ => NetlinkError::Kernel { op, source: io::Error::from_raw_os_error(errno) },
                }
            }
            other => NetlinkError::Other { op, msg: other.to_string() },
        }
    }
}

#[derive(Clone)]
pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    /// A netlink connection in the caller's network namespace. Must be called
    /// inside a tokio runtime (the connection task is spawned on it).
    pub fn connect() -> io::Result<Netlink> {
        // Strict checking makes the kernel apply dump filters (e.g. the link
        // index of an address dump) instead of returning everything.
        let (conn, handle, _) = rtnetlink::new_connection_with_strict_check()?;
        tokio::spawn(conn);
        Ok(Netlink { handle })
    }

    /// A netlink connection inside the network namespace `ns`. The socket is
    /// created on a short-lived thread that entered `ns`; this thread's own
    /// namespace is not touched.
    pub fn connect_in(ns: &File) -> io::Result<Netlink> {
        let socket = netns::run_in(ns, || netlink_sys::Socket::new(netlink_sys::protocols::NETLINK_ROUTE))??;
        socket.set_non_blocking(true)?;
        socket.set_netlink_get_strict_chk(true)?;
        // SAFETY: the fd comes from a socket we own and hand over whole.
        let tokio_socket = unsafe { netlink_sys::TokioSocket::from_raw_fd(socket.into_raw_fd()) };
        let (conn, handle, _) = rtnetlink::from_socket(tokio_socket);
        tokio::spawn(conn);
        Ok(Netlink { handle })
    }
}
