//! A stand-in for the kubelet running `manifests/kube-flannel.yml`'s pod on a
//! test-bed node: the node's host directories (`/opt/cni/bin`,
//! `/etc/cni/net.d`, `/run/flannel`, ...) live under `<node dir>/root`, the
//! ConfigMap's keys become files, and podman runs the init containers and the
//! agent container from the image in the node's network namespace (hostNetwork)
//! with the volume mounts, environment and capabilities the manifest gives them.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::cluster::Node;
use crate::manifest::{Container, DaemonSet, Volume};
use crate::podman::Podman;

/// The node's stand-in for `/`: hostPath volumes resolve below it.
pub fn host_root(node: &Node) -> PathBuf {
    node.dir.join("root")
}

/// `path` on the node (`/opt/cni/bin/flannel` -> `<node dir>/root/opt/cni/bin/flannel`).
pub fn host_path(node: &Node, path: &str) -> PathBuf {
    host_root(node).join(path.trim_start_matches('/'))
}

/// What libcni hands plugin `idx` of a conflist: the entry plus the list's
/// `name` and `cniVersion`.
pub fn conflist_entry(conflist: &Value, idx: usize) -> Value {
    let mut conf = conflist["plugins"][idx].clone();
    conf["name"] = conflist["name"].clone();
    conf["cniVersion"] = conflist["cniVersion"].clone();
    conf
}

pub struct Kubelet<'a> {
    pub podman: &'a Podman,
    pub ds: &'a DaemonSet,
}

impl Kubelet<'_> {
    /// The name the DaemonSet controller would give the pod on `node`.
    pub fn pod_name(node: &Node) -> String {
        format!("kube-flannel-ds-{}", node.ns.name())
    }

    fn container_name(c: &Container, node: &Node) -> String {
        format!("{}-{}", c.name, node.ns.name())
    }

    /// `-v` flags for `c`'s mounts, creating the host side as the kubelet would
    /// (hostPath dirs, `FileOrCreate` files, ConfigMap keys as read-only files).
    fn mounts(&self, c: &Container, node: &Node) -> Vec<String> {
        let mut flags = Vec::new();
        for m in &c.mounts {
            let vol = self.ds.volumes.get(&m.volume).unwrap_or_else(|| panic!("{}: no volume {}", c.name, m.volume));
            let (src, ro) = match vol {
                Volume::HostPath { path, file } => {
                    let p = host_path(node, path);
                    if *file {
                        std::fs::create_dir_all(p.parent().expect("parent")).expect("hostPath parent");
                        std::fs::OpenOptions::new().create(true).append(true).open(&p).expect("FileOrCreate");
                    } else {
                        std::fs::create_dir_all(&p).expect("hostPath dir");
                    }
                    (p, m.read_only)
                }
                Volume::ConfigMap(name) => {
                    let dir = node.dir.join("configmaps").join(name);
                    std::fs::create_dir_all(&dir).expect("configmap dir");
                    for (k, v) in self.ds.config_maps.get(name).unwrap_or_else(|| panic!("no ConfigMap {name}")) {
                        std::fs::write(dir.join(k), v).expect("configmap file");
                    }
                    (dir, true)
                }
            };
            flags.push("-v".into());
            flags.push(format!("{}:{}{}", src.display(), m.path, if ro { ":ro" } else { "" }));
        }
        flags
    }

    /// Environment with `fieldRef`s resolved for the pod on `node`.
    fn env(&self, c: &Container, node: &Node) -> Vec<String> {
        let mut flags = Vec::new();
        for (k, v) in &c.env {
            let v = match v.as_str() {
                "field:metadata.name" => Kubelet::pod_name(node),
                "field:metadata.namespace" => self.ds.namespace.clone(),
                "field:spec.nodeName" => node.ns.name().to_string(),
                other if other.starts_with("field:") => panic!("{}: fieldRef {other} not supported", c.name),
                other => other.to_string(),
            };
            flags.push("-e".into());
            flags.push(format!("{k}={v}"));
        }
        flags
    }

    /// `podman run` flags shared by every container of the pod: hostNetwork = the
    /// node's namespace, and the manifest's command in place of the entrypoint.
    fn run_flags(&self, c: &Container, node: &Node) -> Vec<String> {
        assert!(self.ds.host_network, "the DaemonSet must use hostNetwork");
        assert!(!c.privileged, "{}: the manifest must not need privileged", c.name);
        let mut f = vec!["--name".into(), Kubelet::container_name(c, node)];
        f.push(format!("--network=ns:{}", node.ns.path().display()));
        // No CAP_SYS_RESOURCE on these machines: runc cannot raise the limits
        // podman asks for by default (a kubelet asks for none).
        f.extend(["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"].map(String::from));
        f.extend(self.mounts(c, node));
        f.extend(self.env(c, node));
        if !c.command.is_empty() {
            f.push(format!("--entrypoint={}", serde_json::to_string(&c.command).expect("json")));
        }
        f
    }

    /// Runs the init containers in order, each to completion; panics with its
    /// output if one fails.
    pub fn run_init(&self, node: &Node) {
        for c in &self.ds.init {
            let mut args = vec!["run".to_string(), "--rm".into()];
            args.extend(self.run_flags(c, node));
            args.push(c.image.clone());
            args.extend(c.args.iter().cloned());
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            self.podman.check(&a);
        }
    }

    /// Starts the agent container detached, with exactly the capabilities the
    /// manifest adds (every other one dropped) and `args` as its arguments;
    /// returns the container's name.
    pub fn start_agent(&self, node: &Node, args: &[String]) -> String {
        self.start_agent_with(node, args, &[])
    }

    /// [`Kubelet::start_agent`] with `runtime_caps` from the runtime's default set
    /// kept as well (what a kubelet on containerd keeps: every test here drops
    /// the rest to prove the manifest's are enough, where that is the question).
    pub fn start_agent_with(&self, node: &Node, args: &[String], runtime_caps: &[&str]) -> String {
        let c = &self.ds.agent;
        let mut a = vec!["run".to_string(), "--detach".into(), "--cap-drop=all".into()];
        let caps: Vec<&str> = c.cap_add.iter().map(String::as_str).chain(runtime_caps.iter().copied()).collect();
        if !caps.is_empty() {
            a.push(format!("--cap-add={}", caps.join(",")));
        }
        a.extend(self.run_flags(c, node));
        a.push(c.image.clone());
        a.extend(args.iter().cloned());
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        self.podman.check(&a);
        Kubelet::container_name(c, node)
    }

    /// Runs the agent's image once more beside the agent: the same node
    /// namespace, mounts, environment and capabilities, the agent's command
    /// with `args` (e.g. `doctor ...`, what `kubectl exec` runs); waits for it.
    /// A second container rather than `podman exec`: runc falls back to chroot
    /// where pivot_root cannot work (a test root that is itself a chroot), and
    /// an exec'd process then lands outside the image.
    pub fn run_agent_command(&self, node: &Node, args: &[&str]) -> std::process::Output {
        let c = &self.ds.agent;
        let mut a = vec!["run".to_string(), "--rm".into(), "--cap-drop=all".into()];
        if !c.cap_add.is_empty() {
            a.push(format!("--cap-add={}", c.cap_add.join(",")));
        }
        let mut flags = self.run_flags(c, node);
        if let Some(i) = flags.iter().position(|f| f == "--name") {
            flags[i + 1] = format!("{}-cmd", flags[i + 1]);
        }
        a.extend(flags);
        a.push(c.image.clone());
        a.extend(args.iter().map(|s| s.to_string()));
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        self.podman.run(&a)
    }

    /// The agent container's name on `node`.
    pub fn agent_name(&self, node: &Node) -> String {
        Kubelet::container_name(&self.ds.agent, node)
    }
}

/// The conflist the install-cni init container wrote on `node`, read back, and
/// the flannel entry libcni would pass, with the files the node shares with its
/// agent container redirected to the node's stand-in root.
pub fn installed_flannel_conf(node: &Node, conflist_path: &str) -> (Value, Value) {
    let p = host_path(node, conflist_path);
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let conflist: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let idx = conflist["plugins"]
        .as_array()
        .and_then(|a| a.iter().position(|e| e["type"] == "flannel"))
        .unwrap_or_else(|| panic!("no flannel plugin in {text}"));
    let mut conf = conflist_entry(&conflist, idx);
    let under = |p: &str| Value::from(host_path(node, p).to_string_lossy().into_owned());
    conf["subnetFile"] = under("/run/flannel/subnet.env");
    conf["dataDir"] = under("/var/lib/cni/flannel");
    conf["ipam"] = serde_json::json!({"dataDir": under("/var/lib/cni/networks")});
    (conflist, conf)
}

/// `dst` of an init container that copies a file (`cp ... src dst` or
/// upstream's `/opt/bin/install-conf src dst`): its last argument.
pub fn copy_destination(c: &Container) -> &str {
    let copies = c.command == ["cp"] || c.command.first().is_some_and(|p| p.ends_with("/install-conf"));
    assert!(copies, "{}: expected a cp or install-conf init container, not {:?}", c.name, c.command);
    c.args.last().map(String::as_str).unwrap_or_else(|| panic!("{}: copy without arguments", c.name))
}

/// Whether `p` is an executable regular file.
pub fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}
