//! What the wireguard tests and `e2e wg-bench` share: nodes started with their
//! own key file and `wg show` socket directory, the userspace device's UAPI
//! answer, a TCP stream between namespaces, and Debian's wireguard-go as a
//! reference device.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::cluster::{Cluster, Node};
use crate::ns::Netns;

/// Starts node `i`'s flanneld with its own key file and `wg show` socket
/// directory (the test-bed's nodes share one filesystem).
pub fn start_node(c: &mut Cluster, i: usize) {
    let dir = c.nodes[i].dir.clone();
    let key = dir.join("wgkey");
    let socks = dir.join("wg");
    c.start_agent_env(
        i,
        &[],
        &[("WIREGUARD_KEY_FILE", key.to_str().unwrap()), ("FLANNEL_WG_SOCKET_DIR", socks.to_str().unwrap())],
    );
}

/// `flanneld doctor --json` on node `i`, reading the device as its agent serves it.
pub fn doctor(c: &Cluster, i: usize) -> (i32, serde_json::Value) {
    let socks = c.nodes[i].dir.join("wg");
    c.doctor_env(i, &[], &[("FLANNEL_WG_SOCKET_DIR", socks.to_str().unwrap())])
}

/// The `get=1` answer of a node's userspace device, as `wg` would read it.
pub fn uapi(node: &Node, dev: &str) -> Option<String> {
    let mut s = UnixStream::connect(node.dir.join("wg").join(format!("{dev}.sock"))).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(b"get=1\n\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

/// (public key hex, endpoint, allowed IPs) of each peer on a node's device.
pub fn device_peers(node: &Node, dev: &str) -> Vec<(String, String, Vec<String>)> {
    let mut peers: Vec<(String, String, Vec<String>)> = Vec::new();
    for line in uapi(node, dev).unwrap_or_default().lines() {
        let Some((k, v)) = line.split_once('=') else { continue };
        match k {
            "public_key" => peers.push((v.to_string(), String::new(), Vec::new())),
            "endpoint" => peers.last_mut().expect("a peer").1 = v.to_string(),
            "allowed_ip" => peers.last_mut().expect("a peer").2.push(v.to_string()),
            _ => {}
        }
    }
    peers
}

/// FNV-1a, to compare what was sent with what arrived.
fn fnv(data: &[u8], mut h: u64) -> u64 {
    for b in data {
        h = (h ^ *b as u64).wrapping_mul(0x100_0000_01b3);
    }
    h
}

const FNV_START: u64 = 0xcbf2_9ce4_8422_2325;

/// Receives one connection on `to`:`port`, answers "<bytes> <hash>" of what arrived.
fn receiver(to: &Netns, port: u16, hash: bool) -> std::thread::JoinHandle<()> {
    let listener = to.tcp_listen((Ipv4Addr::UNSPECIFIED, port).into()).expect("listen");
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        let mut buf = vec![0u8; 1 << 17];
        let (mut n, mut h) = (0usize, FNV_START);
        loop {
            let k = s.read(&mut buf).expect("read");
            if k == 0 {
                break;
            }
            if hash {
                h = fnv(&buf[..k], h);
            }
            n += k;
        }
        let _ = writeln!(s, "{n} {h:x}");
    })
}

/// Sends `len` bytes over TCP from `from` to `ip`:`port` in `to`; the receiver
/// answers how many bytes arrived and their hash. Returns (what was sent, the answer).
pub fn transfer(from: &Netns, to: &Netns, ip: Ipv4Addr, port: u16, len: usize) -> (String, String) {
    let server = receiver(to, port, true);
    let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
    let want = format!("{len} {:x}", fnv(&data, FNV_START));
    let mut s = from.tcp_connect(SocketAddr::new(ip.into(), port), Duration::from_secs(5)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(&data).expect("send");
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut got = String::new();
    s.read_to_string(&mut got).expect("answer");
    server.join().unwrap();
    (want, got.trim().to_string())
}

/// Streams for `dur` from `from` to `ip`:`port` in `to`; (bytes the receiver counted, seconds).
pub fn stream(from: &Netns, to: &Netns, ip: Ipv4Addr, port: u16, dur: Duration) -> (u64, f64) {
    let server = receiver(to, port, false);
    let chunk = vec![0x5au8; 1 << 17];
    let mut s = from.tcp_connect(SocketAddr::new(ip.into(), port), Duration::from_secs(5)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let started = Instant::now();
    while started.elapsed() < dur {
        s.write_all(&chunk).expect("send");
    }
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut got = String::new();
    s.read_to_string(&mut got).expect("answer");
    let secs = started.elapsed().as_secs_f64();
    server.join().unwrap();
    let bytes = got.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or(0);
    (bytes, secs)
}

/// A base64 key's hex form (UAPI's).
pub fn hex_of(base64_key: &str) -> String {
    let out = Command::new("sh")
        .args(["-c", &format!("echo {base64_key} | base64 -d | od -An -tx1 | tr -d ' \\n'")])
        .output()
        .expect("base64");
    String::from_utf8(out.stdout).unwrap()
}

/// `wg pubkey` of a private key.
pub fn public_key(private: &str) -> String {
    let mut p = Command::new("wg").arg("pubkey").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().expect("wg");
    p.stdin.take().unwrap().write_all(private.trim().as_bytes()).unwrap();
    String::from_utf8(p.wait_with_output().unwrap().stdout).unwrap().trim().to_string()
}

/// Debian's wireguard-go running device `dev` in a namespace (foreground, so it
/// goes with this value), configured with `wg` and `ip`.
pub struct WireguardGo {
    pub ns: Netns,
    pub dev: String,
    child: Child,
}

impl WireguardGo {
    pub fn start(ns_name: &str, dev: &str) -> WireguardGo {
        let ns = Netns::existing(ns_name);
        let child = ns
            .command("wireguard-go")
            .arg(dev)
            .env("WG_PROCESS_FOREGROUND", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("wireguard-go");
        let w = WireguardGo { ns, dev: dev.to_string(), child };
        assert!(
            crate::wait_until(Duration::from_secs(5), || w.ns.links().contains(&w.dev)),
            "wireguard-go made no {dev}"
        );
        w
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Runs a command in its namespace; its stdout (panics on failure).
    pub fn run(&self, args: &[&str]) -> String {
        let out = self.ns.run(args[0], &args[1..]);
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Key, port, address, MTU, up, and the pod network routed onto it.
    pub fn configure(&self, key_file: &std::path::Path, addr: &str, network: &str) {
        let dev = self.dev.as_str();
        self.run(&["wg", "set", dev, "private-key", key_file.to_str().unwrap(), "listen-port", "51820"]);
        self.run(&["ip", "addr", "add", &format!("{addr}/32"), "dev", dev]);
        self.run(&["ip", "link", "set", dev, "mtu", "1420", "up"]);
        self.run(&["ip", "route", "add", network, "dev", dev, "src", addr]);
    }

    pub fn add_peer(&self, public: &str, endpoint: &str, allowed: &str) {
        self.run(&["wg", "set", &self.dev, "peer", public, "endpoint", endpoint, "allowed-ips", allowed]);
    }
}

impl Drop for WireguardGo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(format!("/var/run/wireguard/{}.sock", self.dev));
    }
}
