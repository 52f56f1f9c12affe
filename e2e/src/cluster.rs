//! A multi-node cluster on one host: an underlay bridge in its own namespace
//! with etcd (Debian's `etcd-server`) on it, node namespaces with `eth0` on
//! the underlay running the real `flanneld`, and pods wired into them by the
//! real `flannel` plugin from the upstream conflist. Everything is removed
//! when the [`Cluster`] is dropped, including after a panic.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use crate::{Netns, TempDir, wait_until};

/// etcd's address on the underlay.
pub const ETCD_IP: &str = "192.0.2.254";
pub const ETCD_URL: &str = "http://192.0.2.254:2379";
/// The underlay's IPv6 address, where etcd listens too (IPv6-only clusters reach it there).
pub const ETCD_IP6: &str = "2001:db8::fe";
pub const PREFIX: &str = "/coreos.com/network";
/// The agents' health/metrics port inside each node.
pub const HEALTHZ_PORT: u16 = 8471;

/// Where the workspace's binaries are: `$FLANNEL_BIN_DIR`, else next to (or
/// one level above) the running executable, which covers `target/<profile>/`
/// for the `e2e` binary and `target/<profile>/deps/` for test binaries.
pub fn bin_path(name: &str) -> PathBuf {
    let mut dirs = Vec::new();
    if let Some(d) = std::env::var_os("FLANNEL_BIN_DIR") {
        dirs.push(PathBuf::from(d));
    }
    if let Ok(exe) = std::env::current_exe()
        && let Some(d) = exe.parent()
    {
        dirs.push(d.to_path_buf());
        if let Some(p) = d.parent() {
            dirs.push(p.to_path_buf());
        }
    }
    dirs.iter().map(|d| d.join(name)).find(|p| p.is_file()).unwrap_or_else(|| {
        panic!("{name} not found in {dirs:?}: build the workspace first (cargo build --workspace --bins)")
    })
}

/// Runs a command, panicking with its output when it fails; returns stdout.
pub(crate) fn check(mut c: Command, what: &str) -> String {
    let out = c.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A throwaway CA with a server certificate for etcd's underlay address and a
/// client certificate (ECDSA P-256, made with the `openssl` CLI); returns `dir`.
fn make_certs(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).expect("tls dir");
    let ssl = |args: &[&str]| {
        let mut c = Command::new("openssl");
        c.current_dir(dir).args(args);
        check(c, "openssl (apt-get install openssl)");
    };
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
    ssl(&[
        &["req", "-x509"][..],
        &ec,
        &["-keyout", "ca-key.pem", "-out", "ca.pem", "-days", "2", "-subj", "/CN=e2e-ca"],
    ]
    .concat());
    for (name, ext) in [
        ("server", format!("subjectAltName=IP:{ETCD_IP}\nextendedKeyUsage=serverAuth,clientAuth\n")),
        ("client", "extendedKeyUsage=clientAuth\n".to_string()),
    ] {
        let key = format!("{name}-key.pem");
        let csr = format!("{name}.csr");
        ssl(&[&["req"][..], &ec, &["-keyout", &key, "-out", &csr, "-subj", &format!("/CN=e2e-{name}")]].concat());
        std::fs::write(dir.join(format!("{name}.ext")), ext).expect("ext file");
        let (out, extfile) = (format!("{name}.pem"), format!("{name}.ext"));
        ssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca-key.pem",
            "-CAcreateserial",
            "-out",
            &out,
            "-days",
            "2",
            "-extfile",
            &extfile,
        ]);
    }
    dir.to_path_buf()
}

/// Upstream's conflist entry for the `flannel` plugin, with its files redirected.
pub fn flannel_conf(version: &str, subnet_file: &Path, state_dir: &Path, ipam_dir: &Path) -> Value {
    json!({
        "cniVersion": version,
        "name": "cbr0",
        "type": "flannel",
        "subnetFile": subnet_file,
        "dataDir": state_dir,
        "ipam": {"dataDir": ipam_dir},
        "delegate": {"hairpinMode": true, "isDefaultGateway": true},
    })
}

/// A node: a namespace with `eth0` on the underlay and, when started, a flanneld.
pub struct Node {
    pub ns: Netns,
    /// 192.0.2.<n> on eth0 (not configured when the cluster is IPv6-only).
    pub ip: Ipv4Addr,
    /// 2001:db8::<n> on eth0 when the cluster has IPv6 on its underlay.
    pub ip6: Option<Ipv6Addr>,
    pub dir: PathBuf,
    agent: Option<Child>,
}

impl Node {
    pub fn subnet_file(&self) -> PathBuf {
        self.dir.join("subnet.env")
    }

    pub fn log_file(&self) -> PathBuf {
        self.dir.join("flanneld.log")
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_file()).unwrap_or_default()
    }

    /// PID of the running agent.
    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(Child::id)
    }

    pub fn agent_running(&mut self) -> bool {
        self.agent.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// `KEY=value` lines of subnet.env, if written.
    pub fn subnet_env(&self) -> Option<String> {
        std::fs::read_to_string(self.subnet_file()).ok()
    }

    /// subnet.env as the plugin reads it.
    fn parsed_env(&self) -> Option<flannel_shared::subnet_env::SubnetEnv> {
        flannel_shared::subnet_env::SubnetEnv::read(&self.subnet_file()).ok()
    }

    /// This node's IPv6 subnet (`fd00:10:244:5::/64`) from subnet.env, when dual-stack.
    pub fn subnet6(&self) -> Option<String> {
        Some(self.parsed_env()?.ipv6_subnet?.network().to_string())
    }

    /// IPv6 routes flanneld owns (`proto 76`) as `ip -j -6 route` objects.
    pub fn flannel_routes6(&self) -> Vec<Value> {
        self.ns.ip_json(&["-6", "route", "show", "proto", "76"]).as_array().cloned().unwrap_or_default()
    }

    /// This node's subnet (`10.244.1.0/24`) from subnet.env.
    pub fn subnet(&self) -> Option<String> {
        Some(self.parsed_env()?.subnet?.network().to_string())
    }

    /// The conflist's flannel entry, pointed at this node's files.
    pub fn cni_conf(&self) -> Value {
        flannel_conf("0.3.1", &self.subnet_file(), &self.dir.join("cni-state"), &self.dir.join("ipam"))
    }

    /// Whether `ip` lies in this node's subnet (from subnet.env).
    pub fn in_subnet(&self, ip: Ipv4Addr) -> bool {
        self.subnet().and_then(|s| s.parse::<flannel_shared::IpNet>().ok()).is_some_and(|n| n.contains(ip.into()))
    }

    /// Addresses in the IP store of [`Node::cni_conf`] (file names that parse as IPs), sorted.
    pub fn reserved(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.dir.join("ipam/cbr0"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.parse::<IpAddr>().is_ok())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// Host-side veths of pods on this node.
    pub fn veths(&self) -> Vec<String> {
        self.ns.links().into_iter().filter(|l| l.starts_with("veth")).collect()
    }

    /// Routes flanneld owns (`proto 76`) as `ip -j route` objects.
    pub fn flannel_routes(&self) -> Vec<Value> {
        self.ns.ip_json(&["route", "show", "proto", "76"]).as_array().cloned().unwrap_or_default()
    }

    /// A GET against the agent's health server from inside the node; (status, body).
    pub fn http_get(&self, path: &str) -> Option<(u16, String)> {
        self.http_get_port(HEALTHZ_PORT, path)
    }

    /// A GET against `port` on the node's loopback (e.g. a manifest's probe); (status, body).
    pub fn http_get_port(&self, port: u16, path: &str) -> Option<(u16, String)> {
        let addr: SocketAddr = (Ipv4Addr::LOCALHOST, port).into();
        let mut s = self.ns.tcp_connect(addr, Duration::from_secs(2)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes()).ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        let code = out.split_whitespace().nth(1)?.parse().ok()?;
        let body = out.split_once("\r\n\r\n").map(|x| x.1.to_string()).unwrap_or_default();
        Some((code, body))
    }

    /// One value from /metrics.
    pub fn metric(&self, name: &str) -> Option<f64> {
        let (_, body) = self.http_get("/metrics")?;
        body.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
    }

    /// Waits until the agent stops running reconcile passes (none for `quiet`) and
    /// returns the count then; `Err` with the counts seen if it never goes quiet
    /// within `deadline` (a pass that keeps waking the next one).
    fn settles(&self, quiet: Duration, deadline: Duration) -> Result<f64, String> {
        let runs = || self.metric("flannel_reconcile_runs_total");
        let start = std::time::Instant::now();
        let mut seen = Vec::new();
        let mut last = runs();
        let mut since = std::time::Instant::now();
        while start.elapsed() < deadline {
            std::thread::sleep(Duration::from_millis(200));
            let now = runs();
            if now != last {
                seen.extend(now);
                last = now;
                since = std::time::Instant::now();
            } else if since.elapsed() >= quiet {
                return last.ok_or_else(|| "no metrics".to_string());
            }
        }
        Err(format!("reconcile passes never stopped: {seen:?}\n{}", self.log()))
    }

    fn kill_agent(&mut self, sig: i32) {
        if let Some(mut c) = self.agent.take() {
            // SAFETY: kill(2) on a child we spawned and have not reaped yet.
            unsafe { libc::kill(c.id() as i32, sig) };
            let _ = c.wait();
        }
    }
}

const SIGKILL: i32 = libc::SIGKILL;
const SIGTERM: i32 = libc::SIGTERM;

/// A pod: its namespace, the node it runs on and its IP.
pub struct Pod {
    pub ns: Netns,
    pub node: usize,
    pub ip: Ipv4Addr,
    /// The pod's IPv6 address when the network is dual-stack.
    pub ip6: Option<Ipv6Addr>,
    pub cid: String,
}

impl Pod {
    /// Serves TCP on `port` inside the pod until the process exits: each
    /// connection gets one line, `<pod ip> saw <client ip>`.
    pub fn serve(&self, port: u16) {
        serve(&self.ns, self.ip, port);
    }
}

/// Serves TCP on `port` inside `ns` until the process exits: each connection
/// gets one line, `<me> saw <client ip>`.
pub fn serve(ns: &Netns, me: Ipv4Addr, port: u16) {
    let listener = ns.tcp_listen((Ipv4Addr::UNSPECIFIED, port).into()).expect("listen in pod");
    std::thread::spawn(move || {
        for s in listener.incoming().flatten() {
            let mut s = s;
            let peer = s.peer_addr().map(|a| a.ip().to_string()).unwrap_or_default();
            let _ = writeln!(s, "{me} saw {peer}");
        }
    });
}

/// net-conf.json for the test-bed's pod network with `backend`.
pub fn netconf(backend: &str) -> String {
    format!(r#"{{"Network":"10.244.0.0/16","Backend":{{"Type":"{backend}"}}}}"#)
}

/// Pings every host from every other: ttl 64 on one node, 62 across nodes (two
/// routers: the sender's node and the receiver's). Hosts are (netns, IP, node
/// index); the first wrong answer is the error.
pub fn ping_mesh(hosts: &[(&Netns, Ipv4Addr, usize)]) -> Result<(), String> {
    for (i, (ns, ip, node)) in hosts.iter().enumerate() {
        for (j, (_, dst, dst_node)) in hosts.iter().enumerate() {
            if i == j {
                continue;
            }
            let want = if node == dst_node { 64 } else { 62 };
            let got = ns.ping(&dst.to_string());
            if got != Some(want) {
                return Err(format!(
                    "{ip} (node{}) -> {dst} (node{}): ttl {got:?}, want {want}",
                    node + 1,
                    dst_node + 1
                ));
            }
        }
    }
    Ok(())
}

/// Connects from `ns` to `addr` and returns the server's line (see [`Pod::serve`]).
pub fn request(ns: &Netns, addr: SocketAddr) -> std::io::Result<String> {
    let mut s = ns.tcp_connect(addr, Duration::from_secs(3))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out.trim().to_string())
}

pub struct Cluster {
    /// Holds the underlay bridge `br0` (192.0.2.254/24) and etcd.
    pub underlay: Netns,
    pub nodes: Vec<Node>,
    pub pods: Vec<Pod>,
    etcd: Option<Child>,
    dir: TempDir,
    /// Prefix of every namespace name (lets `e2e down` find the demo's).
    ns_prefix: String,
    /// Directory with ca.pem, server/client certs and keys when etcd speaks mutual TLS.
    tls: Option<PathBuf>,
    /// etcd user and password once auth is enabled.
    auth: Option<(String, String)>,
    /// Whether nodes added later carry IPv6 too (2001:db8::/64).
    ipv6: bool,
    /// Whether nodes added later carry IPv6 only (no IPv4 address, etcd over IPv6).
    ipv6_only: bool,
}

impl Cluster {
    /// An underlay with etcd running on it; no nodes yet.
    pub fn new(tag: &str) -> Cluster {
        Cluster::with_prefix(tag, "")
    }

    /// Like [`Cluster::new`], with every namespace name starting with `ns_prefix`.
    pub fn with_prefix(tag: &str, ns_prefix: &str) -> Cluster {
        Cluster::build(tag, ns_prefix, false)
    }

    /// etcd with mutual TLS (a throwaway CA, server cert for 192.0.2.254, client cert);
    /// agents get `--etcd-cafile/--etcd-certfile/--etcd-keyfile`.
    pub fn with_tls(tag: &str) -> Cluster {
        Cluster::build(tag, "", true)
    }

    fn build(tag: &str, ns_prefix: &str, tls: bool) -> Cluster {
        let underlay = Netns::new(&format!("{ns_prefix}ul"));
        // A bridge without a MAC of its own takes its lowest port's and changes it as ports come;
        // a node that cached the old one (another port's MAC) is then cut off from etcd.
        underlay.ip(&["link", "add", "br0", "address", "02:00:c0:00:02:fe", "type", "bridge"]);
        underlay.ip(&["addr", "add", &format!("{ETCD_IP}/24"), "dev", "br0"]);
        underlay.ip(&["addr", "add", &format!("{ETCD_IP6}/64"), "dev", "br0", "nodad"]);
        underlay.ip(&["link", "set", "br0", "up"]);
        let mut c = Cluster {
            underlay,
            nodes: Vec::new(),
            pods: Vec::new(),
            etcd: None,
            dir: TempDir::new(tag),
            ns_prefix: ns_prefix.to_string(),
            tls: None,
            auth: None,
            ipv6: false,
            ipv6_only: false,
        };
        if tls {
            c.tls = Some(make_certs(&c.dir.join("tls")));
        }
        c.start_etcd();
        c
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// etcd's client URL for the agents (https with TLS; over IPv6 in an IPv6-only cluster).
    pub fn endpoint(&self) -> String {
        let url = if self.ipv6_only { format!("http://[{ETCD_IP6}]:2379") } else { ETCD_URL.to_string() };
        if self.tls.is_some() { url.replacen("http:", "https:", 1) } else { url }
    }

    /// Flags that connect a flanneld (or an etcdctl, with `etcdctl` = true) to this etcd.
    fn client_flags(&self, etcdctl: bool) -> Vec<String> {
        let mut f = Vec::new();
        if let Some(d) = &self.tls {
            let names = if etcdctl {
                ["--cacert", "--cert", "--key"]
            } else {
                ["--etcd-cafile", "--etcd-certfile", "--etcd-keyfile"]
            };
            for (flag, file) in names.iter().zip(["ca.pem", "client.pem", "client-key.pem"]) {
                f.push(format!("{flag}={}", d.join(file).display()));
            }
        }
        if let Some((u, p)) = &self.auth {
            if etcdctl {
                f.push(format!("--user={u}:{p}"));
            } else {
                f.push(format!("--etcd-username={u}"));
                f.push(format!("--etcd-password={p}"));
            }
        }
        f
    }

    /// Nodes added afterwards also get 2001:db8::<n>/64 (the underlay has 2001:db8::fe).
    pub fn enable_ipv6(&mut self) {
        self.ipv6 = true;
    }

    /// Nodes added afterwards get 2001:db8::<n>/64 and no IPv4 at all (their
    /// default route is via the underlay's IPv6 address); agents reach etcd over IPv6.
    pub fn ipv6_only(&mut self) {
        self.ipv6 = true;
        self.ipv6_only = true;
    }

    /// Turns on etcd authentication with a root user; etcdctl and agents started later use it.
    pub fn enable_auth(&mut self, user: &str, password: &str) {
        assert_eq!(user, "root", "etcd needs its root user before auth can be enabled");
        self.etcdctl(&["user", "add", &format!("{user}:{password}")]);
        self.etcdctl(&["auth", "enable"]);
        self.auth = Some((user.to_string(), password.to_string()));
    }

    /// Starts etcd (again) on its data dir and waits until it answers.
    pub fn start_etcd(&mut self) {
        let data = self.dir.join("etcd");
        let log = File::options().create(true).append(true).open(self.dir.join("etcd.log")).expect("etcd log");
        let peer = "http://127.0.0.1:2380";
        let url = if self.tls.is_some() { ETCD_URL.replacen("http:", "https:", 1) } else { ETCD_URL.to_string() };
        let url6 = url.replace(ETCD_IP, &format!("[{ETCD_IP6}]"));
        let mut tls_flags = Vec::new();
        if let Some(d) = &self.tls {
            tls_flags.push(format!("--cert-file={}", d.join("server.pem").display()));
            tls_flags.push(format!("--key-file={}", d.join("server-key.pem").display()));
            tls_flags.push(format!("--trusted-ca-file={}", d.join("ca.pem").display()));
            tls_flags.push("--client-cert-auth".to_string());
        }
        let child = self
            .underlay
            .command("etcd")
            .args(["--name", "e2e", "--data-dir"])
            .arg(&data)
            .args(["--listen-client-urls", &format!("{url},{url6}"), "--advertise-client-urls", &url])
            .args(&tls_flags)
            .args(["--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer])
            .args(["--initial-cluster", &format!("e2e={peer}"), "--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("etcd log"))
            .stderr(log)
            .spawn()
            .expect("start etcd (apt-get install etcd-server)");
        self.etcd = Some(child);
        let ok = wait_until(Duration::from_secs(20), || self.etcdctl_raw(&["endpoint", "health"]).status.success());
        assert!(ok, "etcd did not come up: {}", std::fs::read_to_string(self.dir.join("etcd.log")).unwrap_or_default());
    }

    /// Kills etcd (the agents see it vanish mid-stream).
    pub fn stop_etcd(&mut self) {
        if let Some(mut c) = self.etcd.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn etcdctl_raw(&self, args: &[&str]) -> std::process::Output {
        self.underlay
            .command("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &self.endpoint(), "--dial-timeout", "2s"])
            .args(self.client_flags(true))
            .args(args)
            .output()
            .expect("etcdctl (apt-get install etcd-client)")
    }

    /// `etcdctl <args>`, panicking on failure.
    pub fn etcdctl(&self, args: &[&str]) -> String {
        let out = self.etcdctl_raw(args);
        assert!(out.status.success(), "etcdctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Writes net-conf.json to `<prefix>/config`.
    pub fn put_config(&self, netconf: &str) {
        self.etcdctl(&["put", &format!("{PREFIX}/config"), netconf]);
    }

    /// Every lease in etcd: (key's subnet as `10.244.1.0/24`, value JSON).
    pub fn leases(&self) -> Vec<(String, Value)> {
        let out = self.etcdctl(&["get", "--prefix", &format!("{PREFIX}/subnets/")]);
        let lines: Vec<&str> = out.lines().collect();
        lines
            .chunks(2)
            .filter(|kv| kv.len() == 2)
            .map(|kv| {
                let key = kv[0].rsplit('/').next().unwrap_or_default().replacen('-', "/", 1);
                (key, serde_json::from_str(kv[1]).unwrap_or(Value::Null))
            })
            .collect()
    }

    /// Adds a node namespace with `eth0` = 192.0.2.<n>/24 on the underlay and
    /// a default route via the underlay; returns its index.
    pub fn add_node(&mut self) -> usize {
        let i = self.nodes.len();
        let ip = Ipv4Addr::new(192, 0, 2, (i + 1) as u8);
        let ns = Netns::new(&format!("{}nd", self.ns_prefix));
        let port = format!("u{}", i + 1);
        self.underlay.ip(&["link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", ns.name()]);
        self.underlay.ip(&["link", "set", &port, "master", "br0", "up"]);
        if !self.ipv6_only {
            ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
        }
        ns.ip(&["link", "set", "eth0", "up"]);
        let ip6 = self.ipv6.then(|| Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, (i + 1) as u16));
        if let Some(v6) = ip6 {
            ns.ip(&["addr", "add", &format!("{v6}/64"), "dev", "eth0", "nodad"]);
        }
        if self.ipv6_only {
            ns.ip(&["-6", "route", "add", "default", "via", ETCD_IP6, "dev", "eth0"]);
        } else {
            ns.ip(&["route", "add", "default", "via", ETCD_IP]);
        }
        let dir = self.dir.join(format!("node{}", i + 1));
        std::fs::create_dir_all(&dir).expect("node dir");
        self.nodes.push(Node { ns, ip, ip6, dir, agent: None });
        i
    }

    /// `n` nodes running flanneld on `netconf`, every agent ready and every
    /// peer's route programmed (each node has `n - 1`).
    pub fn with_ready_agents(tag: &str, n: usize, netconf: &str) -> Cluster {
        let mut c = Cluster::new(tag);
        c.put_config(netconf);
        for i in 0..n {
            c.add_node();
            c.start_agent(i, &[]);
        }
        for i in 0..n {
            assert!(c.wait_ready(i, Duration::from_secs(30)), "node{} not ready:\n{}", i + 1, c.nodes[i].log());
        }
        for (i, node) in c.nodes.iter().enumerate() {
            let routed = wait_until(Duration::from_secs(10), || node.flannel_routes().len() == n - 1);
            assert!(routed, "node{} routes: {:?}", i + 1, node.flannel_routes());
        }
        c
    }

    /// Leaves everything running (the `--keep` of the demo): no cleanup on drop.
    pub fn leak(self) {
        std::mem::forget(self);
    }

    /// Starts flanneld in node `i` with the test-bed's settings plus `extra` flags.
    pub fn start_agent(&mut self, i: usize, extra: &[&str]) {
        self.start_agent_env(i, extra, &[]);
    }

    /// [`Cluster::start_agent`] with extra environment variables (e.g. `NODE_NAME`).
    pub fn start_agent_env(&mut self, i: usize, extra: &[&str], env: &[(&str, &str)]) {
        let bin = bin_path("flanneld");
        let endpoint = self.endpoint();
        let client = self.client_flags(false);
        let node = &mut self.nodes[i];
        node.kill_agent(SIGTERM);
        let log = File::options().create(true).append(true).open(node.log_file()).expect("agent log");
        let child = node
            .ns
            .command(bin.to_str().expect("utf-8 path"))
            .arg(format!("--etcd-endpoints={endpoint}"))
            .args(&client)
            .arg(format!("--subnet-file={}", node.subnet_file().display()))
            .arg(format!("--healthz-port={HEALTHZ_PORT}"))
            .args(["--ip-masq", "--iptables-resync=1", "-v=1"])
            .args(extra)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("agent log"))
            .stderr(log)
            .spawn()
            .expect("spawn flanneld");
        node.agent = Some(child);
    }

    /// Runs `flanneld doctor --json` in node `i` with the flags its agent gets
    /// (plus `extra`); returns the exit code and the JSON report.
    pub fn doctor(&self, i: usize, extra: &[&str]) -> (i32, Value) {
        self.doctor_env(i, extra, &[])
    }

    /// [`Cluster::doctor`] with extra environment variables (the agent's, e.g. `FLANNEL_WG_SOCKET_DIR`).
    pub fn doctor_env(&self, i: usize, extra: &[&str], env: &[(&str, &str)]) -> (i32, Value) {
        let node = &self.nodes[i];
        let out = node
            .ns
            .command(bin_path("flanneld").to_str().expect("utf-8 path"))
            .arg("doctor")
            .arg("--json")
            .arg(format!("--etcd-endpoints={}", self.endpoint()))
            .args(self.client_flags(false))
            .arg(format!("--subnet-file={}", node.subnet_file().display()))
            .arg(format!("--healthz-port={HEALTHZ_PORT}"))
            .args(["--ip-masq", "--iptables-resync=1"])
            .arg(format!("--ipam-dir={}", node.dir.join("ipam/cbr0").display()))
            .args(extra)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .output()
            .expect("run flanneld doctor");
        let text = String::from_utf8_lossy(&out.stdout);
        let report = serde_json::from_str(&text).unwrap_or_else(|e| {
            panic!("doctor printed no JSON ({e}): {text}\n{}", String::from_utf8_lossy(&out.stderr))
        });
        (out.status.code().unwrap_or(-1), report)
    }

    /// Asserts that every running agent goes idle once converged: no reconcile pass
    /// for 2 s, within 20 s (a pass must not keep waking the next one).
    pub fn assert_idle(&self) {
        for n in self.nodes.iter().filter(|n| n.agent.is_some()) {
            if let Err(e) = n.settles(Duration::from_secs(2), Duration::from_secs(20)) {
                panic!("{}: {e}", n.ns.name());
            }
        }
    }

    /// Waits until node `i`'s agent reports ready (lease, subnet.env, rules, first peers).
    pub fn wait_ready(&mut self, i: usize, timeout: Duration) -> bool {
        let node = &self.nodes[i];
        wait_until(timeout, || node.http_get("/readyz").is_some_and(|(code, _)| code == 200))
    }

    /// `kill -9` of node `i`'s agent.
    pub fn kill_agent(&mut self, i: usize) {
        self.nodes[i].kill_agent(SIGKILL);
    }

    /// SIGTERM to node `i`'s agent; waits for it to exit.
    pub fn stop_agent(&mut self, i: usize) {
        self.nodes[i].kill_agent(SIGTERM);
    }

    /// Starts a pod on node `i` through the real `flannel` plugin.
    pub fn add_pod(&mut self, i: usize) -> &Pod {
        let conf = self.nodes[i].cni_conf();
        self.add_pod_with(i, &bin_path("flannel"), &conf)
    }

    /// Starts a pod on node `i` by running `plugin` (CNI ADD) with `conf` on stdin.
    pub fn add_pod_with(&mut self, i: usize, plugin: &Path, conf: &Value) -> &Pod {
        let ns = Netns::new(&format!("{}pd", self.ns_prefix));
        let cid = format!("pod-{}", ns.name());
        let node = &self.nodes[i];
        let mut child = node
            .ns
            .command(plugin.to_str().expect("utf-8 path"))
            .env("CNI_COMMAND", "ADD")
            .env("CNI_CONTAINERID", &cid)
            .env("CNI_NETNS", ns.path())
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", "/usr/lib/cni")
            .env_remove("CNI_ARGS")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run the flannel plugin");
        child.stdin.take().expect("stdin").write_all(conf.to_string().as_bytes()).expect("write conf");
        let out = child.wait_with_output().expect("plugin output");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "CNI ADD on node {i} failed: {text} {}", String::from_utf8_lossy(&out.stderr));
        let res: Value = serde_json::from_str(&text).expect("CNI result JSON");
        let ips: Vec<IpAddr> = res["ips"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e["address"].as_str()?.split('/').next()?.parse().ok())
            .collect();
        let ip6 = ips.iter().find_map(|a| if let IpAddr::V6(v6) = a { Some(*v6) } else { None });
        // An IPv6-only pod has no IPv4 address: `ip` is 0.0.0.0 then.
        let ip = ips
            .iter()
            .find_map(|a| if let IpAddr::V4(v4) = a { Some(*v4) } else { None })
            .or(ip6.and(Some(Ipv4Addr::UNSPECIFIED)))
            .unwrap_or_else(|| panic!("no address in CNI result {res}"));
        self.pods.push(Pod { ns, node: i, ip, ip6, cid });
        self.pods.last().expect("just pushed")
    }

    /// Dumps every agent's log to stderr (for failing tests).
    pub fn dump_logs(&self) {
        for (i, n) in self.nodes.iter().enumerate() {
            eprintln!("---- node{} flanneld log ----\n{}", i + 1, n.log());
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
        for n in &mut self.nodes {
            n.kill_agent(SIGKILL);
        }
        self.stop_etcd();
        // Pods, then nodes (their veths go with them), then the underlay and the files.
        self.pods.clear();
        self.nodes.clear();
    }
}

/// The tool used for one-off commands in a namespace, e.g. `tcpdump`.
pub fn run_in(ns: &Netns, program: &str, args: &[&str]) -> String {
    let mut c = ns.command(program);
    c.args(args);
    check(c, program)
}

/// Runs `tcpdump -l -nn --immediate-mode -c <count> -i <iface> <filter>` in
/// `ns`, does `action` once it is listening, and returns what it printed
/// (stopping it after `timeout` if fewer packets came).
pub fn capture(ns: &Netns, iface: &str, filter: &str, count: u32, timeout: Duration, action: impl FnOnce()) -> String {
    use std::io::BufRead;
    let mut child = ns
        .command("tcpdump")
        .args(["-l", "-nn", "--immediate-mode", "-c", &count.to_string(), "-i", iface])
        .args(filter.split_whitespace())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tcpdump");
    let mut err = std::io::BufReader::new(child.stderr.take().expect("stderr"));
    let mut line = String::new();
    while err.read_line(&mut line).unwrap_or(0) > 0 && !line.contains("listening on") {
        line.clear();
    }
    action();
    let deadline = std::time::Instant::now() + timeout;
    while matches!(child.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if matches!(child.try_wait(), Ok(None)) {
        // SAFETY: kill(2) on our own child, not reaped yet.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    }
    let out = child.wait_with_output().expect("tcpdump output");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `etcdctl txn` of `puts` (key, value) in the underlay, 128 at a time (etcd's default --max-txn-ops).
pub fn etcd_puts(underlay: &Netns, puts: &[(String, String)]) -> Result<(), String> {
    for chunk in puts.chunks(128) {
        let mut body = String::from("\n");
        for (k, v) in chunk {
            body.push_str(&format!("put {k} {v}\n"));
        }
        body.push_str("\n\n");
        let mut child = underlay
            .command("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", ETCD_URL, "txn"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("etcdctl txn: {e}"))?;
        child.stdin.take().ok_or("etcdctl stdin")?.write_all(body.as_bytes()).map_err(|e| format!("txn: {e}"))?;
        let out = child.wait_with_output().map_err(|e| format!("etcdctl: {e}"))?;
        if !out.status.success() {
            return Err(format!("etcdctl txn failed: {}", String::from_utf8_lossy(&out.stderr)));
        }
    }
    Ok(())
}
