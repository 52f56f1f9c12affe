//! Debian's containerd as a test-bed node's container runtime: one containerd
//! per node with its own root, state, socket and config, running in the node's
//! network namespace (the host's mount namespace, so the sandboxes' netns files
//! under /var/run/netns are visible to the test), its CRI plugin pointed at the
//! node's CNI directories. Driven through CRI like a kubelet ([`crate::cri`]).
//! Sandboxes left by a failing test are removed, and containerd stopped, on drop.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::cluster::Node;
use crate::cri::{Cri, PodSandboxConfig};
use crate::{Netns, wait_until};

/// The sandbox image every node's CRI uses (built by [`crate::images::pause`]).
pub const PAUSE_IMAGE: &str = "localhost/e2e/pause:1";
/// Debian's CNI plugins that chained or runtime-side configs need beside ours.
pub const DEBIAN_CNI_DIR: &str = "/usr/lib/cni";

/// overlayfs cannot stack on overlayfs (the fresh-machine root): use the copying snapshotter there.
fn snapshotter(dir: &Path) -> &'static str {
    if crate::fs_is_overlay(dir) { "native" } else { "overlayfs" }
}

pub struct Containerd {
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub cni_bin: PathBuf,
    pub cni_conf: PathBuf,
    netns: PathBuf,
    child: Option<Child>,
}

impl Containerd {
    /// Writes the config and starts containerd for `node`; CNI binaries and
    /// configs are read from `<node dir>/cni/{bin,net.d}` (filled by the caller).
    pub fn start(node: &Node) -> Containerd {
        let mut c = Containerd::new(node);
        c.spawn();
        c
    }

    /// Writes the config without starting containerd (see [`Containerd::spawn`]).
    pub fn new(node: &Node) -> Containerd {
        let ok = Command::new("containerd").arg("--version").output().is_ok_and(|o| o.status.success());
        assert!(ok, "containerd not found: `bash scripts/deps.sh` installs Debian's containerd and runc");
        let dir = node.dir.join("containerd");
        let cni_bin = node.dir.join("cni/bin");
        let cni_conf = node.dir.join("cni/net.d");
        for d in [&dir, &cni_bin, &cni_conf] {
            std::fs::create_dir_all(d).expect("containerd dirs");
        }
        let socket = dir.join("containerd.sock");
        let q = |p: &Path| format!("\"{}\"", p.display());
        let config = format!(
            r#"version = 2
root = {root}
state = {state}
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.internal.v1.opt", "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = {sock}
[ttrpc]
  address = {ttrpc}
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  # No CAP_SYS_RESOURCE on these machines: runc cannot set a negative oom_score_adj.
  restrict_oom_score_adj = true
  disable_apparmor = true
  stream_server_address = "127.0.0.1"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "{snap}"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = {bin}
    conf_dir = {conf}
    max_conf_num = 1
"#,
            root = q(&dir.join("root")),
            state = q(&dir.join("state")),
            sock = q(&socket),
            ttrpc = q(&dir.join("containerd.sock.ttrpc")),
            snap = snapshotter(&dir),
            bin = q(&cni_bin),
            conf = q(&cni_conf),
        );
        std::fs::write(dir.join("config.toml"), config).expect("containerd config");
        Containerd { dir, socket, cni_bin, cni_conf, netns: node.ns.path(), child: None }
    }

    /// Starts containerd and waits until its CRI answers.
    pub fn spawn(&mut self) {
        let log = File::options().create(true).append(true).open(self.dir.join("containerd.log")).expect("log");
        // nsenter, not `ip netns exec`: only the network namespace is the node's.
        let child = Command::new("nsenter")
            .arg(format!("--net={}", self.netns.display()))
            .arg("containerd")
            .arg("--config")
            .arg(self.dir.join("config.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start containerd");
        self.child = Some(child);
        let cri = self.cri();
        let up = wait_until(Duration::from_secs(30), || cri.version().is_ok());
        assert!(up, "containerd did not answer CRI Version:\n{}", self.log());
    }

    /// Stops containerd (SIGTERM, or SIGKILL with `kill`); sandboxes keep running in their shims.
    pub fn stop(&mut self, kill: bool) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own child, not reaped yet.
            unsafe { libc::kill(c.id() as i32, if kill { libc::SIGKILL } else { libc::SIGTERM }) };
            let _ = c.wait();
        }
    }

    /// Stops and starts containerd again on the same root and state.
    pub fn restart(&mut self, kill: bool) {
        self.stop(kill);
        self.spawn();
    }

    pub fn cri(&self) -> Cri {
        Cri::new(&self.socket)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    /// `ctr` against this containerd in the CRI namespace.
    pub fn ctr(&self, args: &[&str]) -> Output {
        Command::new("ctr")
            .arg("--address")
            .arg(&self.socket)
            .args(["--namespace", "k8s.io"])
            .args(args)
            .output()
            .expect("ctr")
    }

    /// Imports an image archive (docker-archive or OCI tar).
    pub fn import(&self, archive: &Path) {
        let out = self.ctr(&["images", "import", archive.to_str().expect("utf-8 path")]);
        assert!(out.status.success(), "ctr images import: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Installs a CNI plugin binary into this node's bin_dir.
    pub fn install_plugin(&self, from: &Path) {
        let to = self.cni_bin.join(from.file_name().expect("plugin name"));
        std::fs::copy(from, &to).unwrap_or_else(|e| panic!("copy {} -> {}: {e}", from.display(), to.display()));
    }

    /// Writes the conflist containerd loads (the first file in conf_dir).
    pub fn write_conflist(&self, file: &str, conflist: &Value) {
        let mut f = File::create(self.cni_conf.join(file)).expect("conflist");
        f.write_all(serde_json::to_string_pretty(conflist).expect("json").as_bytes()).expect("conflist");
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if self.child.is_some() {
            let cri = self.cri();
            for s in cri.list_pod_sandbox().unwrap_or_default() {
                let _ = cri.stop_pod_sandbox(&s.id);
                let _ = cri.remove_pod_sandbox(&s.id);
            }
        }
        self.stop(false);
        // Whatever it still had mounted under its root (a test that failed midway).
        let root = self.dir.display().to_string();
        if let Ok(m) = std::fs::read_to_string("/proc/self/mountinfo") {
            let mut mounts: Vec<&str> =
                m.lines().filter_map(|l| l.split(' ').nth(4)).filter(|p| p.starts_with(&root)).collect();
            mounts.sort_by_key(|p| std::cmp::Reverse(p.len()));
            for p in mounts {
                let _ = Command::new("umount").args(["-l", p]).output();
            }
        }
    }
}

/// A sandbox as the test sees it: its id, IP and network namespace.
pub struct Sandbox {
    pub id: String,
    pub ip: std::net::Ipv4Addr,
    /// The sandbox's netns, created and removed by containerd (not by the test).
    pub ns: Netns,
    pub node: usize,
}

/// `RunPodSandbox` then `PodSandboxStatus`: the sandbox, ready, with the IP the
/// runtime reports and the netns from its verbose info.
pub fn run_sandbox(cri: &Cri, node: usize, config: PodSandboxConfig) -> Result<Sandbox, crate::cri::CriError> {
    let id = cri.run_pod_sandbox(config)?;
    let st = cri.pod_sandbox_status(&id, true)?;
    let status = st.status.as_ref().expect("status");
    assert_eq!(status.state, crate::cri::SANDBOX_READY, "sandbox {id} not ready: {st:?}");
    let ip = status.network.as_ref().map(|n| n.ip.clone()).unwrap_or_default();
    let ip = ip.parse().unwrap_or_else(|e| panic!("sandbox {id}: PodSandboxStatus IP {ip:?}: {e}"));
    let ns = Netns::existing(&netns_name(&st.info));
    Ok(Sandbox { id, ip, ns, node })
}

/// The sandbox's netns name (`cni-<uuid>` under /var/run/netns) from containerd's verbose info.
pub fn netns_name(info: &std::collections::HashMap<String, String>) -> String {
    let v: Value = info.get("info").and_then(|i| serde_json::from_str(i).ok()).unwrap_or(Value::Null);
    let path = v["runtimeSpec"]["linux"]["namespaces"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|n| n["type"] == "network")
        .and_then(|n| n["path"].as_str())
        .unwrap_or_else(|| panic!("no network namespace path in the sandbox info: {v}"))
        .to_string();
    Path::new(&path).file_name().and_then(|f| f.to_str()).expect("netns name").to_string()
}
