//! Debian's podman as the container engine of a test, with a store of its own
//! (root, runroot, tmpdir under a [`TempDir`]) so tests neither see nor touch
//! the machine's containers and images. Every container it started is removed
//! and the store deleted on drop, also after a panic.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::TempDir;

/// The image archive `scripts/image.sh` writes (`$FLANNEL_IMAGE_ARCHIVE` overrides).
pub fn image_archive() -> PathBuf {
    std::env::var_os("FLANNEL_IMAGE_ARCHIVE")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/image/flannel-rs.tar"))
}

pub struct Podman {
    dir: TempDir,
    driver: &'static str,
}

/// overlayfs cannot be the upper layer of another overlay (the fresh-machine
/// root is one): there, fall back to vfs, which copies instead.
fn storage_driver(dir: &Path) -> &'static str {
    if crate::fs_is_overlay(dir) { "vfs" } else { "overlay" }
}

impl Podman {
    /// A private store; panics with what to install when podman is missing.
    pub fn new(tag: &str) -> Podman {
        let ok = Command::new("podman").arg("--version").output().is_ok_and(|o| o.status.success());
        assert!(ok, "podman not found: `bash scripts/deps.sh` installs it (Debian's podman)");
        let dir = TempDir::new(tag);
        let driver = storage_driver(dir.path());
        Podman { dir, driver }
    }

    /// `podman` with this store's global flags: no systemd here (cgroupfs, file
    /// events), and runc: crun refuses these machines' hybrid cgroup layout.
    pub fn command(&self) -> Command {
        let mut c = Command::new("podman");
        c.arg("--root")
            .arg(self.dir.join("root"))
            .arg("--runroot")
            .arg(self.dir.join("run"))
            .arg("--tmpdir")
            .arg(self.dir.join("tmp"))
            .args(["--storage-driver", self.driver, "--cgroup-manager", "cgroupfs", "--events-backend", "file"])
            .args(["--runtime", "runc"]);
        c
    }

    /// Runs podman with `args`; the output whatever the status.
    pub fn run(&self, args: &[&str]) -> Output {
        self.command().args(args).output().unwrap_or_else(|e| panic!("podman {args:?}: {e}"))
    }

    /// Runs podman with `args`, panicking with its output on failure; returns stdout.
    pub fn check(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "podman {} failed ({}):\n{}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Loads an image archive (`podman load`); panics saying how to build it when missing.
    pub fn load(&self, archive: &Path) -> String {
        assert!(
            archive.is_file(),
            "{} not found: build the image with `bash scripts/image.sh` (or set FLANNEL_IMAGE_ARCHIVE)",
            archive.display()
        );
        self.check(&["load", "--quiet", "-i", archive.to_str().expect("utf-8 path")])
    }

    /// A container's state (`running`, `exited`, ...), if it exists.
    pub fn state(&self, name: &str) -> Option<String> {
        let out = self.run(&["inspect", "--format", "{{.State.Status}}", name]);
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// A container's output so far.
    pub fn logs(&self, name: &str) -> String {
        let out = self.run(&["logs", name]);
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self.run(&["rm", "--force", "--all", "--time", "0"]);
        let _ = self.run(&["rmi", "--force", "--all"]);
        // Unmounts what the store still has mounted, so the directory can go.
        let _ = self.run(&["system", "reset", "--force"]);
    }
}
