//! Network-namespace entry without disturbing the caller's thread.
//!
//! Namespace membership is per thread. Work that must happen inside another
//! namespace (creating a netlink socket there, binding a listener) runs on a
//! short-lived dedicated thread, so async worker threads never change namespace.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::path::Path;

use nix::sched::{CloneFlags, setns};

/// Opens a network namespace handle (e.g. `/var/run/netns/x` or `/proc/<pid>/ns/net`).
pub fn open(path: &Path) -> io::Result<File> {
    File::open(path)
}

/// Runs `f` on a fresh thread that has entered the network namespace `ns`.
pub fn run_in<T, F>(ns: &File, f: F) -> io::Result<T>
where
    T: Send,
    F: FnOnce() -> T + Send,
{
    std::thread::scope(|scope| {
        scope
            .spawn(|| -> io::Result<T> {
                setns(ns.as_fd(), CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
                Ok(f())
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("thread inside the network namespace panicked")))
    })
}

/// Whether `path` refers to a network namespace (an nsfs mount or `/proc/*/ns/net`).
pub fn is_netns(file: &File) -> bool {
    // NSFS_MAGIC from linux/magic.h
    const NSFS_MAGIC: i64 = 0x6e73_6673;
    nix::sys::statfs::fstatfs(file.as_fd()).map(|s| s.filesystem_type().0 == NSFS_MAGIC).unwrap_or(false)
}
