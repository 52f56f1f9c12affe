//! The namespace test-bed: uniquely named network namespaces and scratch
//! directories that are always removed (also when a test panics), plus small
//! helpers to run commands and open sockets inside a namespace.

pub mod cluster;
pub mod containerd;
pub mod cri;
pub mod daemonset;
pub mod images;
pub mod kube_api;
pub mod kube_apiserver;
pub mod kubeproxy;
pub mod manifest;
pub mod ns;
pub mod podman;
pub mod tmp;
pub mod wireguard;

pub use ns::Netns;
pub use tmp::TempDir;

use std::sync::atomic::{AtomicU32, Ordering};

/// A name unique to this process and call: `<prefix><pid>x<n>`, short enough
/// for interface names when `prefix` is at most 3 characters.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{}x{n}", std::process::id() % 100_000)
}

/// Polls `check` every 20 ms until it holds or `timeout` passes; returns whether it held.
pub fn wait_until(timeout: std::time::Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if check() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Whether `dir` lies on overlayfs, which cannot hold another overlay's layers
/// (the fresh-machine root is one): container stores fall back to copying there.
pub fn fs_is_overlay(dir: &std::path::Path) -> bool {
    const OVERLAYFS_SUPER_MAGIC: i64 = 0x794c_7630;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else { return false };
    // SAFETY: statfs(2) on a NUL-terminated path into a zeroed struct we own.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == OVERLAYFS_SUPER_MAGIC }
}
