//! `manifests/kube-flannel.yml`'s DaemonSet run the way a kubelet would run it,
//! from the image `scripts/image.sh` builds, with Debian's podman as the engine:
//! on every test-bed node the two init containers install the plugin and the
//! conflist into the node's directories, then the agent container runs in the
//! node's network namespace with only the capabilities the manifest grants.
//! Pods made by the installed plugin from the installed conflist must ping
//! across nodes. etcd mode stands in for `--kube-subnet-mgr` (no API server
//! here); every other argument is the manifest's.

use std::path::Path;
use std::time::Duration;

use e2e::cluster::{Cluster, run_in};
use e2e::daemonset::{self, Kubelet, copy_destination, host_path};
use e2e::manifest::{Container, DaemonSet};
use e2e::podman::{self, Podman};
use e2e::wait_until;
use serde_json::Value;

const READY: Duration = Duration::from_secs(60);
/// The directories runtimes read CNI plugins and configs from (containerd's defaults).
const CNI_BIN_DIR: &str = "/opt/cni/bin/";
const CNI_CONF_DIR: &str = "/etc/cni/net.d/";

fn init_copying_into<'a>(ds: &'a DaemonSet, dir: &str) -> &'a Container {
    ds.init
        .iter()
        .find(|c| copy_destination(c).starts_with(dir))
        .unwrap_or_else(|| panic!("no init container copies into {dir}: {:?}", ds.init))
}

/// The manifest's agent arguments, `--kube-subnet-mgr` swapped for etcd.
fn agent_args(ds: &DaemonSet, endpoint: &str) -> Vec<String> {
    let mut a: Vec<String> = ds.agent.args.iter().filter(|a| *a != "--kube-subnet-mgr").cloned().collect();
    assert_eq!(a.len() + 1, ds.agent.args.len(), "manifest args without --kube-subnet-mgr: {:?}", ds.agent.args);
    a.push(format!("--etcd-endpoints={endpoint}"));
    a
}

/// What the kubelet's probes would see: the manifest's readiness probe answers 200
/// (and its liveness probe does too once ready).
fn probes_pass(ds: &DaemonSet, node: &e2e::cluster::Node, timeout: Duration) -> bool {
    let get = |probe: &Option<(String, u16)>| {
        let (path, port) = probe.as_ref().expect("the agent container has an httpGet probe");
        node.http_get_port(*port, path).is_some_and(|(code, _)| code == 200)
    };
    wait_until(timeout, || get(&ds.agent.readiness)) && get(&ds.agent.liveness)
}

fn ping_mesh(c: &Cluster, podman: &Podman, agents: &[String]) {
    let hosts: Vec<_> = c.pods.iter().map(|p| (&p.ns, p.ip, p.node)).collect();
    if let Err(e) = e2e::cluster::ping_mesh(&hosts) {
        for n in agents {
            eprintln!("---- {n} ----\n{}", podman.logs(n));
        }
        panic!("{e}");
    }
}

fn daemonset_on(backend: &str, nftables: bool) {
    let ds = DaemonSet::load();
    let mut net_conf: Value =
        serde_json::from_str(ds.config_file("net-conf.json").expect("net-conf.json in the ConfigMap"))
            .expect("net-conf.json is JSON");
    net_conf["Backend"]["Type"] = backend.into();
    net_conf["EnableNFTables"] = nftables.into();
    let cni_conf: Value =
        serde_json::from_str(ds.config_file("cni-conf.json").expect("cni-conf.json in the ConfigMap"))
            .expect("cni-conf.json is JSON");
    let plugin_dst = copy_destination(init_copying_into(&ds, CNI_BIN_DIR)).to_string();
    let conflist_dst = copy_destination(init_copying_into(&ds, CNI_CONF_DIR)).to_string();

    let mut c = Cluster::new("ds");
    c.put_config(&net_conf.to_string());
    // Declared after the cluster: its containers go before the node namespaces do.
    let podman = Podman::new("ds-podman");
    let loaded = podman.load(&podman::image_archive());
    assert!(loaded.contains(&ds.agent.image), "the archive must carry {}: {loaded}", ds.agent.image);
    let kubelet = Kubelet { podman: &podman, ds: &ds };
    let args = agent_args(&ds, &c.endpoint());

    let mut agents = Vec::new();
    for i in 0..3 {
        c.add_node();
        let node = &c.nodes[i];
        kubelet.run_init(node);
        let plugin = host_path(node, &plugin_dst);
        assert!(daemonset::is_executable(&plugin), "init container did not install {}", plugin.display());
        let version = std::process::Command::new(&plugin).env("CNI_COMMAND", "VERSION").output().expect("plugin");
        let version: Value = serde_json::from_slice(&version.stdout).expect("VERSION prints JSON");
        assert!(version["supportedVersions"].to_string().contains("0.3.1"), "{version}");
        let written: Value = serde_json::from_str(&std::fs::read_to_string(host_path(node, &conflist_dst)).unwrap())
            .expect("the installed conflist is JSON");
        assert_eq!(written, cni_conf, "the installed conflist must be the ConfigMap's cni-conf.json");
        // The cluster's helpers read subnet.env where the agent container writes it.
        std::os::unix::fs::symlink(host_path(node, "/run/flannel/subnet.env"), node.subnet_file()).unwrap();
        // A container's /proc/sys is read-only: forwarding is the node's to turn on
        // (kubeadm's preflight checks it). Without it the agent starts, as upstream
        // does, and says loudly what is wrong and how to fix it.
        if i == 0 {
            run_in(&node.ns, "sysctl", &["-qw", "net.ipv4.ip_forward=0"]);
            let name = kubelet.start_agent(node, &args);
            let warned = wait_until(Duration::from_secs(30), || {
                let log = podman.logs(&name);
                log.contains("net.ipv4.ip_forward is off") && log.contains("sysctl -w")
            });
            assert!(warned, "{:?}: {}", podman.state(&name), podman.logs(&name));
            assert_eq!(podman.state(&name).as_deref(), Some("running"), "{}", podman.logs(&name));
            podman.check(&["rm", "-f", &name]);
        }
        run_in(&node.ns, "sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
        agents.push(kubelet.start_agent(node, &args));
    }
    for (i, name) in agents.iter().enumerate() {
        let ready = probes_pass(&ds, &c.nodes[i], READY);
        assert!(ready, "{name} not ready by the manifest's probes ({:?}):\n{}", podman.state(name), podman.logs(name));
        let caps = podman.check(&["inspect", "--format", "{{.EffectiveCaps}} {{.HostConfig.Privileged}}", name]);
        assert_eq!(caps, "[CAP_NET_ADMIN CAP_NET_RAW] false", "{name} must run with the manifest's capabilities only");
    }
    for (i, n) in c.nodes.iter().enumerate() {
        let ok = wait_until(Duration::from_secs(10), || n.flannel_routes().len() == 2);
        assert!(ok, "node{} routes: {:?}\n{}", i + 1, n.flannel_routes(), podman.logs(&agents[i]));
    }

    // Pods through the plugin and conflist the init containers installed.
    for i in 0..3 {
        let plugin = host_path(&c.nodes[i], &plugin_dst);
        let (_, conf) = daemonset::installed_flannel_conf(&c.nodes[i], &conflist_dst);
        for _ in 0..2 {
            c.add_pod_with(i, &plugin, &conf);
        }
    }
    for p in &c.pods {
        let node = &c.nodes[p.node];
        assert!(node.in_subnet(p.ip), "pod {} outside node{}'s {:?}", p.ip, p.node + 1, node.subnet());
    }
    ping_mesh(&c, &podman, &agents);

    // `flanneld doctor` from the image, with only the manifest's capabilities
    // (NET_RAW for its probes), beside the agent in its pod's namespace and
    // mounts, as `kubectl exec` runs it: the agent's own flags, everything OK.
    let mut doctor = vec!["doctor", "--json"];
    doctor.extend(args.iter().map(String::as_str));
    let out = kubelet.run_agent_command(&c.nodes[0], &doctor);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("doctor in the container printed no JSON ({e}): {}", String::from_utf8_lossy(&out.stderr))
    });
    assert_eq!(out.status.code(), Some(0), "doctor in the container: {report:#}");
    assert_eq!((report["peers"].as_u64(), report["peers_ok"].as_u64()), (Some(2), Some(2)), "{report:#}");

    // `podman stop` (SIGTERM) leaves the data path alone; a restart keeps the subnet.
    let node = &c.nodes[0];
    let (routes, subnet) = (node.flannel_routes(), node.subnet().expect("subnet"));
    podman.check(&["stop", "--time", "20", &agents[0]]);
    assert_eq!(podman.state(&agents[0]).as_deref(), Some("exited"));
    assert_eq!(node.flannel_routes(), routes, "stopping the agent must leave its routes");
    ping_mesh(&c, &podman, &agents);
    podman.check(&["start", &agents[0]]);
    assert!(probes_pass(&ds, &c.nodes[0], READY), "restarted agent not ready:\n{}", podman.logs(&agents[0]));
    assert_eq!(c.nodes[0].subnet().as_deref(), Some(subnet.as_str()), "a restarted agent keeps its subnet");
    let leases = c.leases();
    assert_eq!(leases.len(), 3, "{leases:?}");
    let own = leases.iter().find(|(s, _)| *s == subnet).expect("node1's lease");
    assert_eq!(own.1["PublicIP"], c.nodes[0].ip.to_string());
    ping_mesh(&c, &podman, &agents);
    c.assert_idle();

    // The rules, written from inside the container with the manifest's capabilities.
    for (i, n) in c.nodes.iter().enumerate() {
        let tables = run_in(&n.ns, "nft", &["list", "tables"]);
        let saved = run_in(&n.ns, "iptables-save", &[]);
        if nftables {
            assert!(tables.contains("table ip flannel-ipv4"), "node{}: {tables}", i + 1);
            assert!(!saved.contains("FLANNEL"), "node{}: iptables rules in nftables mode:\n{saved}", i + 1);
        } else {
            assert!(saved.contains("-A FLANNEL-POSTRTG") && saved.contains("-A FLANNEL-FWD"), "node{}: {saved}", i + 1);
            assert!(!tables.contains("flannel-ipv4"), "node{}: {tables}", i + 1);
        }
    }
}

#[test]
fn daemonset_from_the_image_vxlan() {
    daemonset_on("vxlan", false);
}

#[test]
fn daemonset_from_the_image_vxlan_nftables() {
    daemonset_on("vxlan", true);
}

#[test]
fn daemonset_from_the_image_host_gw() {
    daemonset_on("host-gw", false);
}

/// The wireguard backend from the image: no kernel WireGuard here, so each agent
/// container runs the userspace device, making `/dev/net/tun` itself (the
/// container has none) with CAP_MKNOD, which a kubelet on containerd keeps
/// from the runtime's default set beside the manifest's NET_ADMIN and NET_RAW.
#[test]
fn daemonset_from_the_image_wireguard() {
    let ds = DaemonSet::load();
    let mut net_conf: Value =
        serde_json::from_str(ds.config_file("net-conf.json").expect("net-conf.json")).expect("JSON");
    net_conf["Backend"] = serde_json::json!({"Type": "wireguard"});
    let plugin_dst = copy_destination(init_copying_into(&ds, CNI_BIN_DIR)).to_string();
    let conflist_dst = copy_destination(init_copying_into(&ds, CNI_CONF_DIR)).to_string();
    let mut c = Cluster::new("dw");
    c.put_config(&net_conf.to_string());
    let podman = Podman::new("dw-podman");
    podman.load(&podman::image_archive());
    let kubelet = Kubelet { podman: &podman, ds: &ds };
    let args = agent_args(&ds, &c.endpoint());
    let mut agents = Vec::new();
    for i in 0..2 {
        c.add_node();
        let node = &c.nodes[i];
        kubelet.run_init(node);
        std::os::unix::fs::symlink(host_path(node, "/run/flannel/subnet.env"), node.subnet_file()).unwrap();
        run_in(&node.ns, "sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
        if i == 0 {
            // With the manifest's capabilities alone (a policy dropping the runtime's),
            // the agent stops and says what is missing.
            let name = kubelet.start_agent(node, &args);
            let stopped = wait_until(READY, || podman.state(&name).as_deref() == Some("exited"));
            let log = podman.logs(&name);
            assert!(stopped && log.contains("/dev/net/tun is missing and cannot be made"), "{log}");
            podman.check(&["rm", "-f", &name]);
        }
        agents.push(kubelet.start_agent_with(node, &args, &["MKNOD"]));
    }
    for (i, name) in agents.iter().enumerate() {
        assert!(probes_pass(&ds, &c.nodes[i], READY), "{name} not ready:\n{}", podman.logs(name));
        let log = podman.logs(name);
        assert!(log.contains("made /dev/net/tun") && log.contains("userspace (boringtun over TUN) WireGuard"), "{log}");
        // The key lives in the hostPath /run/flannel, so a restarted container keeps it.
        assert!(host_path(&c.nodes[i], "/run/flannel/wgkey").is_file(), "{log}");
        let dev = c.nodes[i].ns.ip_json(&["-d", "link", "show", "flannel-wg"]);
        assert_eq!(dev[0]["mtu"], 1420, "{dev}");
    }
    for i in 0..2 {
        let plugin = host_path(&c.nodes[i], &plugin_dst);
        let (_, conf) = daemonset::installed_flannel_conf(&c.nodes[i], &conflist_dst);
        c.add_pod_with(i, &plugin, &conf);
    }
    let hosts: Vec<_> = c.pods.iter().map(|p| (&p.ns, p.ip, p.node)).collect();
    let ok = wait_until(Duration::from_secs(15), || e2e::cluster::ping_mesh(&hosts).is_ok());
    if !ok {
        for n in &agents {
            eprintln!("---- {n} ----\n{}", podman.logs(n));
        }
        panic!("{:?}", e2e::cluster::ping_mesh(&hosts));
    }
}

/// The offline build (scripts/image.sh) and the registry build
/// (manifests/Containerfile) install the same package list and put the binaries
/// where the manifest runs them. No root needed.
#[test]
fn both_image_builds_match_the_manifest() {
    let ds = DaemonSet::load();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let containerfile = std::fs::read_to_string(root.join("manifests/Containerfile")).unwrap();
    let script = std::fs::read_to_string(root.join("scripts/image.sh")).unwrap();
    let packages = std::fs::read_to_string(root.join("manifests/image-packages")).unwrap();
    let listed: Vec<&str> = packages.lines().filter_map(|l| l.split('#').next()?.split_whitespace().next()).collect();
    assert!(listed.contains(&"iptables"), "flanneld runs iptables-restore: {listed:?}");
    assert!(containerfile.contains("COPY manifests/image-packages"), "Containerfile must install the shared list");
    for f in [&containerfile, &script] {
        assert!(f.contains("scripts/image-slim.sh"), "both builds cut the root down the same way");
    }
    assert!(script.contains("manifests/image-packages"), "image.sh must install the shared list");

    let agent = ds.agent.command.first().expect("agent command");
    let plugin_init = init_copying_into(&ds, CNI_BIN_DIR);
    let plugin_src = &plugin_init.args[plugin_init.args.len() - 2];
    let install_conf = init_copying_into(&ds, CNI_CONF_DIR).command.first().expect("install-cni command");
    for (bin, dst) in
        [("flanneld", agent.as_str()), ("flannel", plugin_src.as_str()), ("install-conf", install_conf.as_str())]
    {
        let dst = Path::new(dst);
        assert_eq!(dst.file_name().and_then(|f| f.to_str()), Some(bin), "{} is not the {bin} binary", dst.display());
        let dir = dst.parent().and_then(|d| d.to_str()).expect("dir");
        let copy_in = format!("copy-in $out/bin/{bin} {dir}");
        assert!(script.contains(&copy_in), "image.sh must `{copy_in}`");
        let copy = format!("COPY --from=build /src/target/release/{bin} {}", dst.display());
        assert!(containerfile.contains(&copy), "Containerfile must `{copy}`");
    }
    let entrypoint = format!("ENTRYPOINT {}", serde_json::to_string(&ds.agent.command).unwrap());
    assert!(containerfile.contains(&entrypoint.replace(',', ", ")) || containerfile.contains(&entrypoint));
    assert!(script.contains(&format!("--entrypoint '{}'", serde_json::to_string(&ds.agent.command).unwrap())));
}

/// containerd (the kubelet's usual runtime) takes the same archive: a private
/// containerd on a unix socket in a scratch dir imports it into the CRI
/// namespace under the manifest's name, layers unpacked.
#[test]
fn containerd_imports_the_archive() {
    let ds = DaemonSet::load();
    let archive = podman::image_archive();
    assert!(archive.is_file(), "{} not found: build it with `bash scripts/image.sh`", archive.display());
    let dir = e2e::TempDir::new("ctrd");
    let sock = dir.join("containerd.sock");
    let config = format!(
        "version = 2\nroot = \"{}\"\nstate = \"{}\"\n[grpc]\n  address = \"{}\"\n",
        dir.join("root").display(),
        dir.join("state").display(),
        sock.display()
    );
    std::fs::write(dir.join("config.toml"), config).unwrap();
    let log = std::fs::File::create(dir.join("containerd.log")).unwrap();
    let child = std::process::Command::new("containerd")
        .arg("--config")
        .arg(dir.join("config.toml"))
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("containerd (bash scripts/deps.sh installs Debian's containerd)");
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _containerd = Kill(child);
    let ctr = |args: &[&str]| {
        let out = std::process::Command::new("ctr")
            .arg("--address")
            .arg(&sock)
            .args(["--namespace", "k8s.io"])
            .args(args)
            .output()
            .expect("ctr");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
        )
    };
    assert!(wait_until(Duration::from_secs(20), || ctr(&["version"]).0), "containerd did not come up");
    let (ok, out) = ctr(&["images", "import", archive.to_str().unwrap()]);
    assert!(ok, "ctr images import: {out}");
    let (ok, out) = ctr(&["images", "check"]);
    let line = out.lines().find(|l| l.starts_with(&format!("{} ", ds.agent.image)));
    assert!(ok && line.is_some_and(|l| l.contains("complete") && l.contains("true")), "{out}");
}
