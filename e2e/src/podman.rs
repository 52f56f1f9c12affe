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
    /// A node's network namespace every podman command runs in (CNI networking).
    netns: Option<PathBuf>,
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
        Podman { dir, driver, netns: None }
    }

    /// Podman as a CNI runtime on a test-bed node: every command runs in the
    /// node's network namespace (so the plugins it calls see the node), its
    /// CNI backend reads networks from `conf_dir` and plugins from `bin_dir`.
    pub fn on_node(tag: &str, netns: &Path, bin_dir: &Path, conf_dir: &Path) -> Podman {
        let mut p = Podman::new(tag);
        // No CAP_SYS_RESOURCE here: runc cannot raise the limits podman asks for by default.
        let conf = format!(
            "[containers]\ndefault_ulimits = [\"nofile=1024:1024\", \"nproc=1024:1024\"]\n\
             [network]\nnetwork_backend = \"cni\"\ncni_plugin_dirs = [\"{}\"]\nnetwork_config_dir = \"{}\"\n",
            bin_dir.display(),
            conf_dir.display()
        );
        std::fs::write(p.dir.join("containers.conf"), conf).expect("containers.conf");
        p.netns = Some(netns.to_path_buf());
        p
    }

    /// `podman` with this store's global flags: no systemd here (cgroupfs, file
    /// events), and runc: crun refuses these machines' hybrid cgroup layout.
    pub fn command(&self) -> Command {
        let mut c = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net={}", ns.display())).arg("podman");
                c.env("CONTAINERS_CONF", self.dir.join("containers.conf"));
                c
            }
            None => Command::new("podman"),
        };
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

    /// Imports a root file system directory as image `name` (`podman import`).
    pub fn import_dir(&self, root: &Path, name: &str) {
        use std::process::Stdio;
        let mut tar =
            Command::new("tar").arg("-C").arg(root).args(["-c", "."]).stdout(Stdio::piped()).spawn().expect("tar");
        let out = self
            .command()
            .args(["import", "-", name])
            .stdin(tar.stdout.take().expect("tar stdout"))
            .output()
            .expect("podman import");
        let _ = tar.wait();
        assert!(out.status.success(), "podman import: {}", String::from_utf8_lossy(&out.stderr));
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
