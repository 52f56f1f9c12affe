//! A test node: its own network namespace and scratch directory holding
//! subnet.env, the IPAM store and the plugin's state, and a way to exec the
//! real `flannel` binary inside it as a container runtime would.
#![allow(dead_code)]

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

pub use e2e::{Netns, TempDir};
use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_flannel");

pub struct Node {
    pub ns: Netns,
    pub dir: TempDir,
}

#[derive(Debug)]
pub struct CniOut {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

impl CniOut {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {:?} / stderr {}", self.stdout, self.stderr))
    }

    /// The CNI error code; panics if the call succeeded.
    pub fn code(&self) -> u64 {
        assert!(!self.ok, "expected a failure, got success: {}", self.stdout);
        let j = self.json();
        assert!(j["msg"].is_string(), "error without msg: {j}");
        j["code"].as_u64().unwrap_or_else(|| panic!("error without code: {j}"))
    }

    pub fn expect_ok(self) -> Self {
        assert!(self.ok, "plugin failed: stdout {} stderr {}", self.stdout, self.stderr);
        self
    }
}

impl Node {
    pub fn new(subnet: &str) -> Node {
        Self::with_env(&format!(
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET={subnet}\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n"
        ))
    }

    pub fn with_env(subnet_env: &str) -> Node {
        let node = Node { ns: Netns::new("cn"), dir: TempDir::new("cni") };
        if !subnet_env.is_empty() {
            std::fs::write(node.subnet_file(), subnet_env).unwrap();
        }
        node
    }

    pub fn subnet_file(&self) -> PathBuf {
        self.dir.join("subnet.env")
    }

    pub fn ipam_dir(&self) -> PathBuf {
        self.dir.join("ipam/cbr0")
    }

    /// The upstream conflist's flannel entry, pointed at this node's files.
    pub fn conf(&self, version: &str) -> Value {
        e2e::cluster::flannel_conf(version, &self.subnet_file(), &self.dir.join("state"), &self.dir.join("ipam"))
    }

    pub fn cni(&self, command: &str, container_id: &str, netns: Option<&str>, ifname: &str, conf: &Value) -> CniOut {
        self.cni_raw(
            command,
            &[("CNI_CONTAINERID", container_id), ("CNI_NETNS", netns.unwrap_or("")), ("CNI_IFNAME", ifname)],
            conf.to_string().as_bytes(),
        )
    }

    pub fn cni_raw(&self, command: &str, env: &[(&str, &str)], stdin: &[u8]) -> CniOut {
        let mut cmd: Command = self.ns.command(BIN);
        cmd.env_remove("CNI_ARGS").env("CNI_COMMAND", command).env("CNI_PATH", "/usr/lib/cni");
        // A node whose boot the test controls (see `set_boot`); else the kernel's.
        if self.boot_file().exists() {
            cmd.env("FLANNEL_CNI_BOOT_ID_FILE", self.boot_file());
        } else {
            cmd.env_remove("FLANNEL_CNI_BOOT_ID_FILE");
        }
        for (k, v) in env {
            if !v.is_empty() {
                cmd.env(k, v);
            }
        }
        let mut child =
            cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn plugin");
        child.stdin.take().unwrap().write_all(stdin).unwrap();
        let out = child.wait_with_output().unwrap();
        CniOut {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    fn boot_file(&self) -> PathBuf {
        self.dir.join("boot_id")
    }

    /// From now on the plugin sees this boot id (the README's test hook).
    pub fn set_boot(&self, id: &str) {
        std::fs::write(self.boot_file(), format!("{id}\n")).unwrap();
    }

    pub fn add(&self, cid: &str, pod: &Netns) -> Value {
        self.cni("ADD", cid, Some(pod.path().to_str().unwrap()), "eth0", &self.conf("0.3.1")).expect_ok().json()
    }

    pub fn del(&self, cid: &str, pod: Option<&Netns>) -> CniOut {
        let p = pod.map(|p| p.path().to_string_lossy().into_owned());
        self.cni("DEL", cid, p.as_deref(), "eth0", &self.conf("0.3.1"))
    }

    /// Addresses recorded in the IPAM store (file names that parse as IPs).
    pub fn reserved(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.ipam_dir())
            .map(|d| {
                d.flatten()
                    .filter_map(|e| {
                        let n = e.file_name().to_string_lossy().into_owned();
                        n.parse::<std::net::IpAddr>().is_ok().then_some(n)
                    })
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// Saved per-container state files.
    pub fn state_files(&self) -> Vec<String> {
        std::fs::read_dir(self.dir.join("state"))
            .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default()
    }

    /// Host-side veths in the node namespace.
    pub fn veths(&self) -> Vec<String> {
        self.ns.links().into_iter().filter(|l| l.starts_with("veth")).collect()
    }

    /// Asserts the node holds no trace of any attachment.
    /// DEL frees addresses and state before returning; the veth pair is
    /// deleted by a detached reaper within moments, so that part is awaited.
    pub fn assert_clean(&self) {
        e2e::wait_until(std::time::Duration::from_secs(10), || self.veths().is_empty());
        assert_eq!(self.veths(), Vec::<String>::new(), "veths left behind");
        assert_eq!(self.reserved(), Vec::<String>::new(), "addresses left reserved");
        assert_eq!(self.state_files(), Vec::<String>::new(), "state files left behind");
    }
}

/// The pod interface's JSON from `ip -j addr` in `pod`.
pub fn pod_iface(pod: &Netns, ifname: &str) -> Value {
    pod.ip_json(&["addr", "show", "dev", ifname])[0].clone()
}

/// Waits for `ifname` to disappear from `pod` (DEL's reaper), then asserts it is gone.
pub fn assert_no_iface(pod: &Netns, ifname: &str) {
    e2e::wait_until(std::time::Duration::from_secs(10), || !pod.links().iter().any(|l| l == ifname));
    assert!(!pod.links().iter().any(|l| l == ifname), "{ifname} still in {}", pod.name());
}
