use std::fs::File;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

/// A named network namespace (`/var/run/netns/<name>`), deleted on drop
/// unless it belongs to someone else ([`Netns::existing`]).
pub struct Netns {
    name: String,
    owned: bool,
}

/// Runs a command and returns its output, panicking with everything it printed on failure.
pub fn sh(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("{cmd}: {e}"));
    if !out.status.success() {
        panic!(
            "{cmd} {} failed ({}):\n{}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Netns {
    /// Creates a namespace with a unique name starting with `prefix`, loopback up.
    pub fn new(prefix: &str) -> Netns {
        let name = crate::unique_name(prefix);
        sh("ip", &["netns", "add", &name]);
        let ns = Netns { name, owned: true };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// A namespace someone else created (e.g. a container runtime's sandbox), left alone on drop.
    pub fn existing(name: &str) -> Netns {
        Netns { name: name.to_string(), owned: false }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/var/run/netns/{}", self.name))
    }

    pub fn open(&self) -> File {
        File::open(self.path()).expect("open netns")
    }

    /// `ip -n <ns> <args>`, panicking on failure.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut a = vec!["-n", self.name.as_str()];
        a.extend_from_slice(args);
        sh("ip", &a)
    }

    /// `ip -n <ns> -j <args>` parsed as JSON.
    pub fn ip_json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = vec!["-j"];
        a.extend_from_slice(args);
        parse_ip_json(args, &self.ip(&a))
    }

    /// [`Netns::ip_json`] that returns `None` when `ip` fails (e.g. the device is
    /// gone for a moment while an agent rebuilds it): for polling.
    pub fn try_ip_json(&self, args: &[&str]) -> Option<serde_json::Value> {
        let out = Command::new("ip").args(["-n", &self.name, "-j"]).args(args).output().ok()?;
        out.status.success().then(|| parse_ip_json(args, &String::from_utf8_lossy(&out.stdout)))
    }

    /// A command that will run inside this namespace (`ip netns exec`).
    pub fn command(&self, program: &str) -> Command {
        // `ip` from this process's PATH: a caller may give the program another PATH.
        let ip = flannel_shared::firewall::find_in_path("ip").unwrap_or_else(|| "ip".into());
        let mut c = Command::new(ip);
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Re-runs this test binary's `test` inside the namespace (`ip netns exec`),
    /// with `marker` set in its environment so the inner run knows it is the
    /// one to do the work; panics with the inner run's output if it fails.
    pub fn rerun_test_inside(&self, test: &str, marker: &str) {
        let exe = std::env::current_exe().expect("the test binary");
        let out = self
            .command(exe.to_str().expect("utf-8 path"))
            .args(["--exact", test, "--nocapture", "--test-threads", "1"])
            .env(marker, "1")
            .output()
            .expect("run the test inside the namespace");
        assert!(
            out.status.success(),
            "inner run of {test} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Runs a program inside the namespace and returns its output (whatever the exit status).
    pub fn run(&self, program: &str, args: &[&str]) -> Output {
        self.command(program).args(args).output().unwrap_or_else(|e| panic!("{program}: {e}"))
    }

    /// Names of the links in this namespace.
    pub fn links(&self) -> Vec<String> {
        self.ip_json(&["link", "show"])
            .as_array()
            .map(|a| a.iter().filter_map(|l| l["ifname"].as_str().map(String::from)).collect())
            .unwrap_or_default()
    }

    /// One `ping` from inside this namespace; returns the reply's TTL.
    pub fn ping(&self, dst: &str) -> Option<u32> {
        let out = self.run("ping", &["-c", "1", "-W", "2", dst]);
        let text = String::from_utf8_lossy(&out.stdout);
        text.split_whitespace().find_map(|w| w.strip_prefix("ttl=")).and_then(|t| t.parse().ok())
    }

    /// Binds a TCP listener inside this namespace (the socket stays in it).
    pub fn tcp_listen(&self, addr: SocketAddr) -> io::Result<TcpListener> {
        flannel_shared::netns::run_in(&self.open(), || TcpListener::bind(addr))?
    }

    /// Connects from inside this namespace.
    pub fn tcp_connect(&self, addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
        flannel_shared::netns::run_in(&self.open(), || TcpStream::connect_timeout(&addr, timeout))?
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

fn parse_ip_json(args: &[&str], out: &str) -> serde_json::Value {
    if out.trim().is_empty() {
        return serde_json::Value::Array(vec![]);
    }
    serde_json::from_str(out).unwrap_or_else(|e| panic!("ip -j {args:?}: {e}: {out}"))
}
