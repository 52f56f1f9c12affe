//! `e2e scale [--kube] [--churn RATE --duration S]`: what one agent costs with many peers.
//!
//! Start-up: N simulated vxlan peers as leases in a real etcd (with `--kube`, also
//! in the same run, as N annotated Nodes with a realistic ~6 KB status, from the real
//! kube-apiserver of `../shared/reference/kubernetes` when that folder exists, the
//! agent authenticated as the manifest's ServiceAccount over TLS; otherwise, or with
//! `--stand-in`, from the e2e stand-in API server); one flanneld started and timed
//! until the kernel holds every route, ARP and FDB entry; then peak RSS, CPU
//! seconds, and idle CPU. The reference, measured in the same run, is `ip -batch`
//! writing the same entries into a fresh namespace (the kernel's own floor).
//!
//! Steady state (`--churn RATE --duration S`): once converged, for S seconds RATE
//! events a second that change nothing the agent uses (Kubernetes: kubelet-style
//! status heartbeats, strategic-merge PATCHes of `nodes/<name>/status`, round-robin
//! over the peers; etcd: lease values re-put unchanged, one txn a second), plus one
//! real change every 5 s (a peer's VtepMAC), timed until the new MAC is in the
//! agent's FDB. Reported: CPU seconds and share of one core, log lines written, RSS,
//! reconcile passes and the change latency. Upstream's flanneld v0.21.5
//! (`../shared/reference/upstream`), when present, gets the same start-up and the
//! same window in the same run, on a node namespace of its own after ours.
//!
//! Every namespace and process goes with the run, also on a panic (the panic hook
//! of `main` removes the `demo-` namespaces and what runs in them).

use std::io::{Read, Seek, SeekFrom, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use e2e::Netns;
use e2e::cluster::{Cluster, ETCD_IP, ETCD_URL, HEALTHZ_PORT, Node, PREFIX, etcd_puts};
use e2e::kube_api::{self, FakeApi};
use e2e::kube_apiserver::{Identity, KubeApiServer};
use flannel_shared::Mac;
use flannel_shared::netlink::{Netlink, RT_TABLE_MAIN};
use serde_json::{Value, json};

const ANNOTATION_PREFIX: &str = "flannel.alpha.coreos.com";
const NETCONF: &str = r#"{"Network":"10.0.0.0/8","SubnetLen":24,"Backend":{"Type":"vxlan"}}"#;
/// One real change (a peer's new VtepMAC) every this often, the first half a period in.
const CHANGE_EVERY: Duration = Duration::from_secs(5);
/// How long a changed MAC may take to reach the FDB before it counts as missed.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(10);
/// Nodes created at a time on the real API server.
const CREATE_CONCURRENCY: usize = 32;

fn peer(i: usize) -> (String, String, String) {
    let n = i + 1;
    let subnet = format!("10.{}.{}.0", n / 256, n % 256);
    let public = format!("198.18.{}.{}", n / 256, n % 256);
    let mac = format!("0e:00:00:00:{:02x}:{:02x}", n / 256, n % 256);
    (subnet, public, mac)
}

fn peer_name(i: usize) -> String {
    format!("peer-{i:05}")
}

/// The Node of the `k`-th agent started on a bed, and its podCIDR.
fn own_node(k: usize) -> (String, String) {
    (format!("self-{k}"), format!("10.255.{k}.0/24"))
}

/// What a kubelet and the attach-detach controller leave on every Node (upstream's
/// v0.21.5 agent panics on a Node without any annotation: "assignment to entry in nil map").
fn kubelet_annotations() -> Value {
    json!({
        "node.alpha.kubernetes.io/ttl": "0",
        "volumes.kubernetes.io/controller-managed-attach-detach": "true",
    })
}

fn lease_key(i: usize) -> String {
    format!("{PREFIX}/subnets/{}-24", peer(i).0)
}

fn lease_value(i: usize, mac: &str) -> String {
    let public = peer(i).1;
    format!(r#"{{"PublicIP":"{public}","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{mac}"}}}}"#)
}

fn write_leases(c: &Cluster, n: usize) {
    let puts: Vec<(String, String)> = (0..n).map(|i| (lease_key(i), lease_value(i, &peer(i).2))).collect();
    etcd_puts(&c.underlay, &puts).unwrap_or_else(|e| panic!("{e}"));
}

fn proc_stat(pid: u32) -> (f64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit_once(") ").map(|x| x.1).unwrap_or_default().split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let cpu = (ticks(11) + ticks(12)) as f64 / hz;
    (cpu, status_kb(pid, "VmHWM:"))
}

/// A `kB` field of /proc/<pid>/status (0 when gone).
fn status_kb(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Current resident memory split into (anonymous, file-backed) KB: the
/// file-backed part is mostly the agent's own code pages.
fn rss_split(pid: u32) -> (u64, u64) {
    (status_kb(pid, "RssAnon:"), status_kb(pid, "RssFile:"))
}

fn mb(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The same entries through `ip -batch`: one process, one netlink request per entry.
fn reference(n: usize) -> Duration {
    let ns = Netns::new(&format!("{}ref", crate::NS_PREFIX));
    ns.ip(&["link", "add", "eth0", "type", "veth", "peer", "name", "eth1"]);
    ns.ip(&["addr", "add", "192.0.2.1/24", "dev", "eth0"]);
    ns.ip(&["link", "set", "eth0", "up"]);
    ns.ip(&[
        "link",
        "add",
        "flannel.1",
        "type",
        "vxlan",
        "id",
        "1",
        "local",
        "192.0.2.1",
        "dev",
        "eth0",
        "dstport",
        "8472",
        "nolearning",
    ]);
    ns.ip(&["link", "set", "flannel.1", "up"]);
    let mut ip_cmds = String::new();
    let mut fdb_cmds = String::new();
    for i in 0..n {
        let (subnet, public, mac) = peer(i);
        ip_cmds.push_str(&format!("neigh replace {subnet} lladdr {mac} dev flannel.1 nud permanent\n"));
        ip_cmds.push_str(&format!("route replace {subnet}/24 via {subnet} dev flannel.1 onlink\n"));
        fdb_cmds.push_str(&format!("fdb replace {mac} dev flannel.1 dst {public} self permanent\n"));
    }
    let run = |prog: &str, input: &str| {
        let mut child = ns.command(prog).args(["-batch", "-"]).stdin(Stdio::piped()).spawn().expect(prog);
        child.stdin.take().expect("stdin").write_all(input.as_bytes()).expect("batch");
        assert!(child.wait().expect(prog).success(), "{prog} -batch failed");
    };
    let t = Instant::now();
    run("ip", &ip_cmds);
    run("bridge", &fdb_cmds);
    t.elapsed()
}

/// Upstream's flanneld: `$FLANNEL_UPSTREAM_REFERENCE_DIR`, else `../shared/reference/upstream`.
fn upstream_binary() -> Option<PathBuf> {
    let dir = std::env::var_os("FLANNEL_UPSTREAM_REFERENCE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/reference/upstream"));
    Some(dir.join("flanneld-v0.21.5")).filter(|p| p.is_file())
}

fn rfc3339_now() -> String {
    let t = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now());
    serde_json::to_value(t).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default()
}

/// A kubelet's status update: every condition with a new `lastHeartbeatTime`
/// (strategic merge keys them by type); every tenth also carries the images list,
/// as when an image was pulled or collected. No annotation changes.
fn heartbeat(seq: usize, images: &Value) -> Value {
    let now = rfc3339_now();
    let cond = |t: &str, s: &str, r: &str| {
        json!({"type": t, "status": s, "reason": r, "message": format!("kubelet reports {r}"),
               "lastHeartbeatTime": now, "lastTransitionTime": "2026-11-01T10:00:00Z"})
    };
    let mut status = json!({"conditions": [
        cond("MemoryPressure", "False", "KubeletHasSufficientMemory"),
        cond("DiskPressure", "False", "KubeletHasNoDiskPressure"),
        cond("PIDPressure", "False", "KubeletHasSufficientPID"),
        cond("Ready", "True", "KubeletReady"),
    ]});
    if seq % 10 == 9 {
        let mut images = images.clone();
        images[0]["sizeBytes"] = json!(10_000_000 + seq);
        status["images"] = images;
    }
    json!({"status": status})
}

/// The real change: a peer's agent came back with a new VTEP (a PATCH of the Node's metadata).
fn vtep_patch(mac: &str) -> Value {
    json!({"metadata": {"annotations": {
        format!("{ANNOTATION_PREFIX}/backend-data"): format!(r#"{{"VNI":1,"VtepMAC":"{mac}"}}"#),
    }}})
}

/// A Node as its kubelet and agent leave it: podCIDR, flannel's annotations, a realistic status.
fn node_object(name: &str, cidr: &str, annotations: Value, status: &Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "annotations": annotations},
        "spec": {"podCIDR": cidr, "podCIDRs": [cidr]},
        "status": status,
    })
}

fn block_on<T>(fut: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime").block_on(fut)
}

/// A client of the real API server from a kubeconfig; to be made on a thread inside
/// the API server's namespace (its sockets are created there).
async fn kube_nodes(kubeconfig: &Path) -> Result<kube::Api<k8s_openapi::api::core::v1::Node>, String> {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig).map_err(|e| format!("{}: {e}", kubeconfig.display()))?;
    let config = kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
        .await
        .map_err(|e| format!("kubeconfig: {e}"))?;
    let client = kube::Client::try_from(config).map_err(|e| format!("client: {e}"))?;
    Ok(kube::Api::all(client))
}

/// Creates `nodes` on the real API server, [`CREATE_CONCURRENCY`] at a time, over
/// connections made inside `ns`. A status the create did not keep is patched in.
fn create_nodes(ns: &Netns, kubeconfig: &Path, nodes: Vec<Value>) -> Result<(), String> {
    use futures_util::StreamExt;
    use kube::api::{Patch, PatchParams, PostParams};
    let run = || {
        block_on(async {
            let api = kube_nodes(kubeconfig).await?;
            let results: Vec<Result<(), String>> = futures_util::stream::iter(nodes)
                .map(|v| {
                    let api = api.clone();
                    async move {
                        let name = v["metadata"]["name"].as_str().unwrap_or_default().to_string();
                        let node: k8s_openapi::api::core::v1::Node =
                            serde_json::from_value(v.clone()).map_err(|e| format!("{name}: {e}"))?;
                        let made = api
                            .create(&PostParams::default(), &node)
                            .await
                            .map_err(|e| format!("create {name}: {e}"))?;
                        if made.status.and_then(|s| s.images).is_none_or(|i| i.is_empty()) {
                            let patch = Patch::Strategic(json!({"status": v["status"]}));
                            api.patch_status(&name, &PatchParams::default(), &patch)
                                .await
                                .map_err(|e| format!("status of {name}: {e}"))?;
                        }
                        Ok(())
                    }
                })
                .buffer_unordered(CREATE_CONCURRENCY)
                .collect()
                .await;
            results.into_iter().collect::<Result<(), String>>()
        })
    };
    flannel_shared::netns::run_in(&ns.open(), run).map_err(|e| format!("enter {}: {e}", ns.name()))?
}

/// The agent namespace's kernel state, read in-process over netlink: the dumps
/// `ip route`, `ip neigh` and `bridge fdb show` make, without a process per poll
/// (a `bridge fdb show` of 5,000 entries takes ~20 ms here, too coarse for the latency).
struct Kernel {
    rt: tokio::runtime::Runtime,
    nl: Netlink,
}

impl Kernel {
    fn new(ns: &Netns) -> Kernel {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
        let nl = rt.block_on(async { Netlink::connect_in(&ns.open()) }).expect("netlink in the node");
        Kernel { rt, nl }
    }

    fn vxlan(&self) -> Option<u32> {
        self.rt.block_on(self.nl.link_by_name("flannel.1")).ok().flatten().map(|l| l.index)
    }

    /// Whether flannel.1 has `want` routes (main table), ARP entries and FDB entries
    /// with a remote; (neighbours, fdb) when it has.
    fn holds(&self, idx: u32, want: usize) -> Option<(usize, usize)> {
        self.rt.block_on(async {
            let routes = self.nl.routes(true, Some(RT_TABLE_MAIN)).await.ok()?;
            if routes.iter().filter(|r| r.oif == Some(idx)).count() < want {
                return None;
            }
            let neigh = self.nl.neighbours(idx, false).await.ok()?.len();
            let fdb = self.nl.neighbours(idx, true).await.ok()?.iter().filter(|n| n.ip.is_some()).count();
            (neigh >= want && fdb >= want).then_some((neigh, fdb))
        })
    }

    fn fdb_has(&self, idx: u32, mac: Mac) -> bool {
        self.rt
            .block_on(self.nl.neighbours(idx, true))
            .is_ok_and(|v| v.iter().any(|n| n.mac == Some(mac) && n.ip.is_some()))
    }
}

#[derive(Clone)]
struct Spec {
    label: String,
    bin: PathBuf,
    upstream: bool,
}

/// A running agent; killed on drop.
struct Agent {
    child: Option<Child>,
    pid: u32,
}

impl Agent {
    fn exited(&mut self) -> bool {
        self.child.as_mut().is_none_or(|c| !matches!(c.try_wait(), Ok(None)))
    }

    /// SIGTERM, then SIGKILL if it is still there after 10 s.
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on a child we spawned and have not reaped.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(c.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Where the peers come from.
enum Source {
    Etcd,
    StandIn(FakeApi),
    Real(Box<KubeApiServer>),
}

/// One cluster for one peer count: the peers in their store and the agents run against them in turn.
struct Bed {
    /// Before `c`: the API server (in the underlay) goes before the namespaces.
    src: Source,
    c: Cluster,
    n: usize,
    netconf: PathBuf,
    /// The agents' kubeconfig (the manifest's ServiceAccount on the real API server).
    kubeconfig: PathBuf,
    /// Agents started so far (the `k`-th runs as Node `self-k`).
    runs: usize,
    /// Real changes made so far (each one a fresh MAC) and the heartbeat cursor.
    changes: usize,
    cursor: usize,
    /// The last `reserved` peers take the real changes and no heartbeats or re-puts:
    /// an unchanged re-put of a lease whose MAC was changed would undo the change.
    reserved: usize,
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Etcd,
    StandIn,
    Real,
}

impl Bed {
    fn new(n: usize, kind: Kind, agents: usize) -> Bed {
        let c = Cluster::with_prefix("demo-scale", crate::NS_PREFIX);
        let netconf = c.dir().join("net-conf.json");
        std::fs::write(&netconf, NETCONF).expect("net-conf.json");
        let status = kube_api::realistic_status();
        let peers = || {
            (0..n).map(|i| {
                let (subnet, public, mac) = peer(i);
                let mut ann = kube_api::vxlan_annotations(&public, &mac);
                if let (Some(a), Value::Object(k)) = (ann.as_object_mut(), kubelet_annotations()) {
                    a.extend(k);
                }
                (peer_name(i), format!("{subnet}/24"), ann)
            })
        };
        let (src, kubeconfig) = match kind {
            Kind::Etcd => {
                c.put_config(NETCONF);
                write_leases(&c, n);
                (Source::Etcd, PathBuf::new())
            }
            Kind::StandIn => {
                let api = FakeApi::default();
                api.0.0.lock().expect("stand-in state").status = Some(status);
                for k in 0..agents {
                    let (name, cidr) = own_node(k);
                    api.put_node(&name, &cidr, kubelet_annotations());
                }
                for (name, cidr, ann) in peers() {
                    api.put_node(&name, &cidr, ann);
                }
                let kubeconfig = kube_api::kubeconfig(c.dir());
                (Source::StandIn(api), kubeconfig)
            }
            Kind::Real => {
                let ip: IpAddr = ETCD_IP.parse().expect("underlay address");
                let api = KubeApiServer::start("demo-kas", &c.underlay, ip).unwrap_or_else(|e| panic!("{e}"));
                println!("kube-apiserver (../shared/reference/kubernetes) ready after {:.1?}", api.ready_after);
                api.apply_manifest_rbac().unwrap_or_else(|e| panic!("{e}"));
                let mut nodes: Vec<Value> = (0..agents)
                    .map(own_node)
                    .map(|(m, c)| node_object(&m, &c, kubelet_annotations(), &status))
                    .collect();
                nodes.extend(peers().map(|(m, c, ann)| node_object(&m, &c, ann, &status)));
                let t = Instant::now();
                create_nodes(&c.underlay, &api.kubeconfig(Identity::Admin), nodes).unwrap_or_else(|e| panic!("{e}"));
                let size = api.node(&peer_name(0)).map(|v| v.to_string().len()).unwrap_or(0);
                println!(
                    "created {} Nodes ({:.1} KB of JSON each as the API serves them) in {:.1} s, {CREATE_CONCURRENCY} at a time",
                    n + agents,
                    size as f64 / 1024.0,
                    t.elapsed().as_secs_f64()
                );
                // How the API server answers a first listing: ours (a consistent list in
                // pages, from etcd) and upstream's informer's (from the watch cache, whole).
                for query in ["limit=100", "limit=500&resourceVersion=0"] {
                    let t = Instant::now();
                    match api.request(Identity::Flannel, "GET", &format!("/api/v1/nodes?{query}"), None) {
                        Ok((200, list)) => println!(
                            "GET /api/v1/nodes?{query}: {} items{}, {:.1} MB, {:.0} ms (curl)",
                            list["items"].as_array().map_or(0, Vec::len),
                            if list["metadata"]["continue"].as_str().is_some_and(|c| !c.is_empty()) {
                                " and a continue token"
                            } else {
                                ", no continue"
                            },
                            list.to_string().len() as f64 / 1e6,
                            ms(t.elapsed())
                        ),
                        other => println!("GET /api/v1/nodes?{query}: {other:?}"),
                    }
                }
                let kubeconfig = api.kubeconfig(Identity::Flannel);
                (Source::Real(Box::new(api)), kubeconfig)
            }
        };
        Bed { src, c, n, netconf, kubeconfig, runs: 0, changes: 0, cursor: 0, reserved: (n / 4).clamp(1, 64) }
    }

    /// A node namespace for the next agent (the stand-in listening in it).
    fn add_node(&mut self) -> usize {
        let i = self.c.add_node();
        if let Source::StandIn(api) = &self.src {
            api.serve(self.c.nodes[i].ns.tcp_listen(kube_api::ADDR.parse().expect("addr")).expect("listen"));
        }
        i
    }

    /// Starts `spec` in node `i` with the same settings for ours and upstream's:
    /// `--ip-masq --iptables-resync=5`, its own subnet file, the bed's store.
    fn start(&mut self, spec: &Spec, i: usize) -> Agent {
        let node = &self.c.nodes[i];
        let (name, _) = own_node(self.runs);
        self.runs += 1;
        let mut cmd = node.ns.command(spec.bin.to_str().expect("utf-8 path"));
        cmd.arg(format!("--subnet-file={}", node.subnet_file().display())).args(["--ip-masq", "--iptables-resync=5"]);
        if !spec.upstream {
            cmd.arg(format!("--healthz-port={HEALTHZ_PORT}")).arg("-v=0");
        }
        match self.src {
            Source::Etcd => {
                cmd.arg(format!("--etcd-endpoints={ETCD_URL}"));
            }
            Source::StandIn(_) | Source::Real(_) => {
                cmd.args([
                    "--kube-subnet-mgr".to_string(),
                    format!("--kubeconfig-file={}", self.kubeconfig.display()),
                    format!("--net-config-path={}", self.netconf.display()),
                ])
                .env("NODE_NAME", &name);
            }
        }
        let log = std::fs::File::options().create(true).append(true).open(node.log_file()).expect("agent log");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("agent log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", spec.bin.display()));
        Agent { pid: child.id(), child: Some(child) }
    }

    /// Removes what the stopped agent of node `i` (the `k`-th started) published, its
    /// Node or its lease, so that the next agent has the same `n` peers. Upstream's
    /// v0.21.5 could not even start with one more: its Node informer hands every
    /// annotated Node to a channel of 5,000 that nothing reads before the informer
    /// has synced, so at 5,001 it waits for the sync forever.
    fn forget(&self, i: usize, k: usize) {
        let (name, _) = own_node(k);
        match &self.src {
            Source::Etcd => {
                if let Some(subnet) = self.c.nodes[i].subnet() {
                    self.c.etcdctl(&["del", &format!("{PREFIX}/subnets/{}", subnet.replacen('/', "-", 1))]);
                }
            }
            Source::StandIn(api) => api.delete_node(&name),
            Source::Real(api) => {
                api.admin("DELETE", &format!("/api/v1/nodes/{name}"), None).unwrap_or_else(|e| panic!("{e}"));
            }
        }
    }

    /// Waits until node `i` holds `want` routes, ARP and FDB entries on flannel.1.
    fn converge(&self, i: usize, agent: &mut Agent, started: Instant, want: usize) -> Result<Startup, String> {
        let node = &self.c.nodes[i];
        let kernel = Kernel::new(&node.ns);
        let (secs, neigh, fdb) = loop {
            if let Some((neigh, fdb)) = kernel.vxlan().and_then(|idx| kernel.holds(idx, want)) {
                break (started.elapsed(), neigh, fdb);
            }
            if agent.exited() || started.elapsed() > Duration::from_secs(120) {
                let log = node.log();
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                return Err(format!(
                    "not converged to {want} peers after {:.1?} (agent {}): log ends\n{}",
                    started.elapsed(),
                    if agent.exited() { "exited" } else { "running" },
                    tail.join("\n")
                ));
            }
            std::thread::sleep(Duration::from_millis(25));
        };
        if let Source::StandIn(api) = &self.src {
            let queries = std::mem::take(&mut api.0.0.lock().expect("stand-in state").list_queries);
            println!(
                "  (the agent listed Nodes {} times, first with ?{})",
                queries.len(),
                queries.first().map_or("", |q| q)
            );
        }
        let (cpu, hwm) = proc_stat(agent.pid);
        let (anon, file) = rss_split(agent.pid);
        Ok(Startup { secs, neigh, fdb, cpu, hwm, anon, file })
    }

    /// The window's events: RATE a second for `secs`, and a real change every [`CHANGE_EVERY`].
    fn schedule(&mut self, churn: Churn, per_second: bool) -> Vec<(Duration, Ev)> {
        let rotation = self.n - self.reserved;
        let mut evs = Vec::new();
        let rate = churn.rate as usize;
        if per_second {
            for s in 0..churn.secs {
                let peers = (0..rate).map(|_| self.next_peer(rotation)).collect();
                evs.push((Duration::from_secs(s), Ev::RePut(peers)));
            }
        } else {
            for k in 0..rate * churn.secs as usize {
                let p = self.next_peer(rotation);
                evs.push((Duration::from_secs_f64(k as f64 / rate as f64), Ev::Beat(p, k)));
            }
        }
        let mut at = CHANGE_EVERY / 2;
        while at < Duration::from_secs(churn.secs) {
            let k = self.changes;
            self.changes += 1;
            let p = self.n - 1 - k % self.reserved;
            evs.push((at, Ev::Change(p, format!("0e:ff:00:00:{:02x}:{:02x}", k / 256 % 256, k % 256))));
            at += CHANGE_EVERY;
        }
        evs.sort_by_key(|(at, _)| *at);
        evs
    }

    fn next_peer(&mut self, rotation: usize) -> usize {
        let p = self.cursor % rotation.max(1);
        self.cursor += 1;
        p
    }

    /// Drives the window's events from another thread, reporting to `tx`.
    fn spawn_driver(&self, evs: Vec<(Duration, Ev)>, tx: mpsc::Sender<Msg>) -> std::thread::JoinHandle<()> {
        let images = kube_api::realistic_status()["images"].clone();
        match &self.src {
            Source::Etcd => {
                let ul = Netns::existing(self.c.underlay.name());
                std::thread::spawn(move || {
                    drive_sync(evs, &tx, |ev| match ev {
                        Ev::RePut(peers) => {
                            let puts: Vec<_> =
                                peers.iter().map(|&i| (lease_key(i), lease_value(i, &peer(i).2))).collect();
                            etcd_puts(&ul, &puts)
                        }
                        Ev::Change(i, mac) => etcd_puts(&ul, &[(lease_key(*i), lease_value(*i, mac))]),
                        Ev::Beat(..) => Ok(()),
                    })
                })
            }
            Source::StandIn(api) => {
                let api = api.clone();
                std::thread::spawn(move || {
                    drive_sync(evs, &tx, |ev| {
                        let found = match ev {
                            Ev::Beat(i, seq) => api.patch(&peer_name(*i), true, &heartbeat(*seq, &images)),
                            Ev::Change(i, mac) => api.patch(&peer_name(*i), false, &vtep_patch(mac)),
                            Ev::RePut(_) => true,
                        };
                        if found { Ok(()) } else { Err("no such node".into()) }
                    })
                })
            }
            Source::Real(api) => {
                let ul = self.c.underlay.open();
                let kubeconfig = api.kubeconfig(Identity::Admin);
                std::thread::spawn(move || {
                    let tx2 = tx.clone();
                    let r = flannel_shared::netns::run_in(&ul, move || {
                        block_on(drive_real(&kubeconfig, evs, &tx2, &images))
                    });
                    let err = match r {
                        Ok(Ok(())) => return,
                        Ok(Err(e)) => e,
                        Err(e) => format!("enter the underlay: {e}"),
                    };
                    let _ = tx.send(Msg::Done { noop: 0, errors: vec![err] });
                })
            }
        }
    }

    /// The steady-state window for the agent in node `i`.
    fn churn(&mut self, i: usize, agent: &Agent, churn: Churn, ours: bool) -> Window {
        let per_second = matches!(self.src, Source::Etcd);
        let evs = self.schedule(churn, per_second);
        let changes = evs.iter().filter(|(_, e)| matches!(e, Ev::Change(..))).count();
        let node = &self.c.nodes[i];
        let kernel = Kernel::new(&node.ns);
        let idx = kernel.vxlan().expect("flannel.1");
        let metric = |name: &str| if ours { node.metric(name) } else { None };
        let log_at = std::fs::metadata(node.log_file()).map(|m| m.len()).unwrap_or(0);
        let (runs0, changes0) = (metric("flannel_reconcile_runs_total"), metric("flannel_reconcile_changes_total"));
        let rss_start = status_kb(agent.pid, "VmRSS:");
        let mut peak = rss_start;
        let t0 = Instant::now();
        let (cpu0, _) = proc_stat(agent.pid);
        let (tx, rx) = mpsc::channel();
        let driver = self.spawn_driver(evs, tx);
        let mut w = Window { churn, changes, ..Window::default() };
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(Msg::Issued(mac, at)) => {
                    let want = Mac::parse(&mac).expect("mac");
                    loop {
                        if kernel.fdb_has(idx, want) {
                            w.latency.push(at.elapsed());
                            break;
                        }
                        if at.elapsed() > CHANGE_TIMEOUT {
                            w.missed += 1;
                            break;
                        }
                        peak = peak.max(status_kb(agent.pid, "VmRSS:"));
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
                Ok(Msg::Acked(took, err)) => {
                    w.write_took.push(took);
                    w.errors.extend(err);
                }
                Ok(Msg::Done { noop, errors }) => {
                    w.noop = noop;
                    w.errors.extend(errors);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
            peak = peak.max(status_kb(agent.pid, "VmRSS:"));
        }
        let _ = driver.join();
        // The last events' handling belongs to the window.
        std::thread::sleep(Duration::from_millis(500));
        let (cpu1, hwm) = proc_stat(agent.pid);
        w.secs = t0.elapsed().as_secs_f64();
        w.cpu = cpu1 - cpu0;
        w.rss = (rss_start, status_kb(agent.pid, "VmRSS:"), peak.max(status_kb(agent.pid, "VmRSS:")), hwm);
        let delta = |a: Option<f64>, b: Option<f64>| Some(b? - a?);
        w.passes = delta(runs0, metric("flannel_reconcile_runs_total"));
        w.applied = delta(changes0, metric("flannel_reconcile_changes_total"));
        let mut added = String::new();
        if let Ok(mut f) = std::fs::File::open(node.log_file()) {
            let _ = f.seek(SeekFrom::Start(log_at));
            let _ = f.read_to_string(&mut added);
        }
        w.log_lines = added.lines().count();
        w.log_kinds = log_kinds(&added);
        w.latency.sort();
        w
    }
}

/// Log lines grouped by their message: the timestamp (ours: the first field; klog's:
/// `I1203 15:13:12.122659   28542`) dropped and numbers folded, so the same message
/// about other peers or revisions counts once; most frequent first.
fn log_kinds(text: &str) -> Vec<(usize, String)> {
    let mut kinds: Vec<(String, usize, String)> = Vec::new();
    for line in text.lines() {
        let klog = line.starts_with(['I', 'W', 'E', 'F'])
            && line.as_bytes().get(1..5).is_some_and(|d| d.iter().all(u8::is_ascii_digit));
        let mut msg = line;
        for _ in 0..if klog { 3 } else { 1 } {
            msg = msg.trim_start().split_once(char::is_whitespace).map_or("", |x| x.1);
        }
        let msg = msg.trim_start();
        let mut key = String::new();
        for c in msg.chars().take(80) {
            match (c.is_ascii_digit(), key.ends_with('#')) {
                (true, true) => {}
                (true, false) => key.push('#'),
                (false, _) => key.push(c),
            }
        }
        match kinds.iter_mut().find(|(k, _, _)| *k == key) {
            Some((_, n, _)) => *n += 1,
            None => {
                let example = if msg.is_empty() { "(empty line)".to_string() } else { msg.chars().take(160).collect() };
                kinds.push((key, 1, example));
            }
        }
    }
    kinds.sort_by_key(|k| std::cmp::Reverse(k.1));
    kinds.into_iter().map(|(_, n, e)| (n, e)).collect()
}

/// One event of a churn window.
enum Ev {
    /// A status heartbeat of peer Node `.0` (the `.1`-th of the window).
    Beat(usize, usize),
    /// These peers' lease values put again, unchanged, in one txn.
    RePut(Vec<usize>),
    /// Peer `.0`'s VtepMAC becomes `.1`.
    Change(usize, String),
}

/// What a driver reports while the window runs.
enum Msg {
    /// A real change's write is about to go out (the latency starts here).
    Issued(String, Instant),
    /// A real change's write returned after this long (with its error).
    Acked(Duration, Option<String>),
    /// The window is over: no-op events written, errors.
    Done { noop: usize, errors: Vec<String> },
}

/// Runs `evs` at their times on this thread with `act`.
fn drive_sync(evs: Vec<(Duration, Ev)>, tx: &mpsc::Sender<Msg>, mut act: impl FnMut(&Ev) -> Result<(), String>) {
    let t0 = Instant::now();
    let (mut noop, mut errors) = (0, Vec::new());
    for (at, ev) in evs {
        if let Some(wait) = (t0 + at).checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        match &ev {
            Ev::Change(_, mac) => {
                let issued = Instant::now();
                let _ = tx.send(Msg::Issued(mac.clone(), issued));
                let r = act(&ev);
                let _ = tx.send(Msg::Acked(issued.elapsed(), r.err()));
            }
            Ev::Beat(..) | Ev::RePut(_) => match act(&ev) {
                Ok(()) => noop += if let Ev::RePut(p) = &ev { p.len() } else { 1 },
                Err(e) => errors.push(e),
            },
        }
    }
    let _ = tx.send(Msg::Done { noop, errors });
}

/// Runs `evs` against the real API server: every write its own task on one
/// client (kept-alive TLS connections), so a slow one delays no other.
async fn drive_real(
    kubeconfig: &Path,
    evs: Vec<(Duration, Ev)>,
    tx: &mpsc::Sender<Msg>,
    images: &Value,
) -> Result<(), String> {
    use kube::api::{Patch, PatchParams};
    let api = kube_nodes(kubeconfig).await?;
    let t0 = tokio::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (at, ev) in evs {
        tokio::time::sleep_until(t0 + at).await;
        let api = api.clone();
        match ev {
            Ev::Beat(i, seq) => {
                let patch = heartbeat(seq, images);
                tasks.spawn(async move {
                    let pp = PatchParams::default();
                    api.patch_status(&peer_name(i), &pp, &Patch::Strategic(patch)).await.map_err(|e| e.to_string())?;
                    Ok(true)
                });
            }
            Ev::Change(i, mac) => {
                let tx = tx.clone();
                let issued = Instant::now();
                let _ = tx.send(Msg::Issued(mac.clone(), issued));
                tasks.spawn(async move {
                    let r =
                        api.patch(&peer_name(i), &PatchParams::default(), &Patch::Strategic(vtep_patch(&mac))).await;
                    let _ = tx.send(Msg::Acked(issued.elapsed(), r.err().map(|e| e.to_string())));
                    Ok(false)
                });
            }
            Ev::RePut(_) => {}
        }
    }
    let (mut noop, mut errors) = (0, Vec::new());
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(Ok(heartbeat)) => noop += usize::from(heartbeat),
            Ok(Err(e)) => errors.push(e),
            Err(e) => errors.push(e.to_string()),
        }
    }
    let _ = tx.send(Msg::Done { noop, errors });
    Ok(())
}

struct Startup {
    secs: Duration,
    neigh: usize,
    fdb: usize,
    cpu: f64,
    hwm: u64,
    anon: u64,
    file: u64,
}

#[derive(Default)]
struct Window {
    churn: Churn,
    /// From the first event to half a second after the last (its handling included).
    secs: f64,
    cpu: f64,
    /// No-op events written (heartbeats or re-puts) and real changes scheduled.
    noop: usize,
    changes: usize,
    errors: Vec<String>,
    log_lines: usize,
    /// The lines written, grouped by what they say: (count, first example).
    log_kinds: Vec<(usize, String)>,
    /// VmRSS at start, at end, the window's peak, and VmHWM (the peak since start), KB.
    rss: (u64, u64, u64, u64),
    passes: Option<f64>,
    applied: Option<f64>,
    /// Real change -> MAC in the FDB, sorted; how long the writes took; MACs never seen.
    latency: Vec<Duration>,
    write_took: Vec<Duration>,
    missed: usize,
}

fn median(v: &[Duration]) -> Option<Duration> {
    let mut v = v.to_vec();
    v.sort();
    v.get(v.len() / 2).copied()
}

impl Window {
    fn print(&self, label: &str, what: &str) {
        let (start, end, peak, hwm) = self.rss;
        println!(
            "{label}: churn window {:.1} s: {} {what} ({}/s for {} s) and {} VtepMAC changes{}",
            self.secs,
            self.noop,
            self.churn.rate,
            self.churn.secs,
            self.changes,
            if self.errors.is_empty() {
                String::new()
            } else {
                format!("; {} FAILED writes: {:?}", self.errors.len(), &self.errors[..self.errors.len().min(3)])
            }
        );
        let count = |v: Option<f64>| v.map_or("n/a".to_string(), |v| format!("{v}"));
        println!(
            "  CPU {:.2} s = {:.2}% of one core; {} log lines; reconcile passes {} (entries changed {})",
            self.cpu,
            self.cpu / self.secs * 100.0,
            self.log_lines,
            count(self.passes),
            count(self.applied)
        );
        println!(
            "  RSS {:.1} MB at the start, {:.1} MB at the end, {:.1} MB peak in the window ({:.1} MB peak since start)",
            mb(start),
            mb(end),
            mb(peak),
            mb(hwm)
        );
        match (self.latency.first(), median(&self.latency), self.latency.last()) {
            (Some(lo), Some(mid), Some(hi)) => println!(
                "  VtepMAC change -> new MAC in flannel.1's FDB: min {:.1} / median {:.1} / max {:.1} ms ({} of {}; the write itself: median {:.1} ms)",
                ms(*lo),
                ms(mid),
                ms(*hi),
                self.latency.len(),
                self.changes,
                median(&self.write_took).map_or(0.0, ms)
            ),
            _ => println!("  VtepMAC change: none seen in the FDB ({} missed)", self.missed),
        }
        if self.missed > 0 {
            println!("  {} of {} changed MACs not in the FDB within {CHANGE_TIMEOUT:?}", self.missed, self.changes);
        }
        for (count, example) in self.log_kinds.iter().take(6) {
            println!("  | {count:>5} x {example}");
        }
    }
}

struct Row {
    label: String,
    upstream: bool,
    start: Startup,
    window: Option<Window>,
}

fn summary(n: usize, what: &str, rows: &[Row]) {
    println!("\n-- {n} peers from {what}, same run:");
    println!(
        "  {:<32} {:>9} {:>9} | {:>9} {:>7} {:>6} {:>17} {:>6} {:>19}",
        "agent",
        "start-up",
        "peak RSS",
        "churn CPU",
        "% core",
        "log",
        "RSS start/end MB",
        "passes",
        "change ms min/med/max"
    );
    for r in rows {
        let mut line = format!("  {:<32} {:>7.3} s {:>6.1} MB |", r.label, r.start.secs.as_secs_f64(), mb(r.start.hwm));
        if let Some(w) = &r.window {
            let lat = match (w.latency.first(), median(&w.latency), w.latency.last()) {
                (Some(a), Some(b), Some(c)) => format!("{:.0}/{:.0}/{:.0}", ms(*a), ms(b), ms(*c)),
                _ => "-".into(),
            };
            line.push_str(&format!(
                " {:>7.2} s {:>6.2}% {:>6} {:>8.1}/{:<8.1} {:>6} {:>19}",
                w.cpu,
                w.cpu / w.secs * 100.0,
                w.log_lines,
                mb(w.rss.0),
                mb(w.rss.1),
                w.passes.map_or("n/a".into(), |p| p.to_string()),
                lat
            ));
        }
        println!("{line}");
    }
    let (Some(ours), Some(up)) = (rows.iter().find(|r| !r.upstream), rows.iter().find(|r| r.upstream)) else { return };
    let ratio = |a: f64, b: f64| if b > 0.0 { format!("{:.2}x", a / b) } else { "-".into() };
    let mut line = format!(
        "  {:<32} {:>9} {:>9} |",
        format!("ratio {} / upstream", ours.label),
        ratio(ours.start.secs.as_secs_f64(), up.start.secs.as_secs_f64()),
        ratio(ours.start.hwm as f64, up.start.hwm as f64)
    );
    if let (Some(a), Some(b)) = (&ours.window, &up.window) {
        line.push_str(&format!(
            " {:>9} {:>7} {:>6} {:>8}/{:<8}",
            ratio(a.cpu, b.cpu),
            "",
            ratio(a.log_lines as f64, b.log_lines as f64),
            ratio(a.rss.0 as f64, b.rss.0 as f64),
            ratio(a.rss.1 as f64, b.rss.1 as f64)
        ));
    }
    println!("{line}");
}

#[derive(Clone, Copy, Default)]
struct Churn {
    rate: u32,
    secs: u64,
}

struct Opts {
    peers: Vec<usize>,
    idle: u64,
    kube: bool,
    /// `--kube-only`: no etcd run beside the Kubernetes one.
    kube_only: bool,
    churn: Option<Churn>,
    stand_in: bool,
    upstream: bool,
    /// `--also-agent [LABEL=]PATH`: more flanneld builds, run after ours against the same peers.
    also: Vec<(String, PathBuf)>,
}

fn one(n: usize, o: &Opts, kind: Kind) {
    let what = match kind {
        Kind::Etcd => "etcd (leases)",
        Kind::StandIn => "the Kubernetes API (Nodes; the e2e stand-in API server)",
        Kind::Real => "the Kubernetes API (Nodes; the real kube-apiserver, agent as the manifest's ServiceAccount)",
    };
    println!("\n== {n} peers from {what}");
    let mut specs = vec![Spec { label: "ours".into(), bin: e2e::cluster::bin_path("flanneld"), upstream: false }];
    for (label, p) in &o.also {
        specs.push(Spec { label: format!("ours ({label})"), bin: p.clone(), upstream: false });
    }
    if o.upstream || o.churn.is_some() {
        match upstream_binary() {
            Some(bin) => specs.push(Spec { label: "upstream v0.21.5".into(), bin, upstream: true }),
            None => println!("(no ../shared/reference/upstream/flanneld-v0.21.5: upstream not measured)"),
        }
    }
    let mut bed = Bed::new(n, kind, specs.len());
    let mut rows = Vec::new();
    for (j, spec) in specs.iter().enumerate() {
        let i = bed.add_node();
        let want = n;
        let label = &spec.label;
        let started = Instant::now();
        let mut agent = bed.start(spec, i);
        let st = match bed.converge(i, &mut agent, started, want) {
            Ok(st) => st,
            Err(e) if spec.upstream || j > 0 => {
                println!("{label}: {e}");
                agent.stop();
                bed.forget(i, j);
                continue;
            }
            Err(e) => panic!("{label}: {e}"),
        };
        println!(
            "{label}: agent start -> all {want} routes in the kernel: {:.3} s (neighbours {}, fdb {})",
            st.secs.as_secs_f64(),
            st.neigh,
            st.fdb
        );
        println!(
            "{label}: agent CPU so far: {:.2} s; peak RSS {:.1} MB (now {:.1} MB anonymous + {:.1} MB file-backed)",
            st.cpu,
            mb(st.hwm),
            mb(st.anon),
            mb(st.file)
        );
        // Our own writes come back as kernel notifications and wake one more pass,
        // over the converged state: its duration is the cost of a pass that changes nothing.
        std::thread::sleep(Duration::from_secs(3));
        let node: &Node = &bed.c.nodes[i];
        if !spec.upstream {
            let last_pass = node.metric("flannel_reconcile_last_duration_seconds").unwrap_or(0.0);
            println!("{label}: steady-state reconcile pass (no changes, {want} peers): {:.1} ms", last_pass * 1e3);
        }
        let window = o.churn.map(|churn| {
            let w = bed.churn(i, &agent, churn, !spec.upstream);
            let what = if kind == Kind::Etcd { "lease values re-put unchanged" } else { "Node status heartbeats" };
            w.print(label, what);
            w
        });
        if j == 0 && o.idle > 0 {
            let node = &bed.c.nodes[i];
            let passes_before = node.metric("flannel_reconcile_runs_total").unwrap_or(0.0);
            let (cpu, _) = proc_stat(agent.pid);
            std::thread::sleep(Duration::from_secs(o.idle));
            let (cpu2, _) = proc_stat(agent.pid);
            let passes = node.metric("flannel_reconcile_runs_total").unwrap_or(0.0) - passes_before;
            // The periodic safety-net pass (--reconcile-interval, 60 s) may fall inside the window.
            println!(
                "idle {} s: {:.2} CPU s ({:.2}% of one core), {passes} reconcile passes",
                o.idle,
                cpu2 - cpu,
                (cpu2 - cpu) / o.idle as f64 * 100.0
            );
        }
        agent.stop();
        bed.forget(i, j);
        rows.push(Row { label: label.clone(), upstream: spec.upstream, start: st, window });
    }
    let r = reference(n);
    let ours = rows.first().map_or(Duration::ZERO, |r| r.start.secs);
    println!(
        "reference `ip -batch` + `bridge -batch` of the same {} entries: {:.3} s; ratio agent/reference {:.2}",
        3 * n,
        r.as_secs_f64(),
        ours.as_secs_f64() / r.as_secs_f64()
    );
    if rows.len() > 1 || o.churn.is_some() {
        summary(n, what, &rows);
    }
}

const USAGE: &str = "e2e scale [--peers 1000,5000] [--idle 60] [--kube|--kube-only [--stand-in]] [--churn 20 [--duration 40]] \
                     [--upstream] [--also-agent [LABEL=]PATH]...";

fn parse(args: impl Iterator<Item = String>) -> Result<Opts, String> {
    let mut o = Opts {
        peers: vec![1000, 5000],
        idle: 60,
        kube: false,
        kube_only: false,
        churn: None,
        stand_in: false,
        upstream: false,
        also: vec![],
    };
    let (mut idle, mut duration) = (None, 40);
    let mut it = args.peekable();
    while let Some(a) = it.next() {
        let mut num = |what: &str| -> Result<u64, String> {
            it.next().and_then(|v| v.parse().ok()).ok_or_else(|| format!("{what} needs a number"))
        };
        match a.as_str() {
            "--peers" => {
                o.peers = it.next().unwrap_or_default().split(',').filter_map(|p| p.parse().ok()).collect();
            }
            "--idle" => idle = Some(num("--idle")?),
            "--churn" => o.churn = Some(Churn { rate: num("--churn")?.clamp(1, 10_000) as u32, secs: 0 }),
            "--duration" => duration = num("--duration")?.max(1),
            "--kube" => o.kube = true,
            "--kube-only" => (o.kube, o.kube_only) = (true, true),
            "--stand-in" => o.stand_in = true,
            "--upstream" => o.upstream = true,
            "--also-agent" => {
                let v = it.next().ok_or("--also-agent needs [LABEL=]PATH")?;
                let (label, path) = v.split_once('=').unwrap_or((&v, &v));
                o.also.push((label.to_string(), PathBuf::from(path)));
            }
            "--help" | "-h" => {
                println!("usage: {USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if let Some(c) = &mut o.churn {
        c.secs = duration;
    }
    // A churn run measures its own window; the idle minute is asked for separately then.
    o.idle = idle.unwrap_or(if o.churn.is_some() { 0 } else { 60 });
    Ok(o)
}

pub fn run(args: impl Iterator<Item = String>) {
    let o = match parse(args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("e2e scale: {e}\nusage: {USAGE}");
            std::process::exit(2);
        }
    };
    let kube_kind = if o.stand_in || e2e::kube_apiserver::reference_binary("kube-apiserver").is_err() {
        if o.kube && !o.stand_in {
            println!(
                "(no {}: the Kubernetes mode is measured against the e2e stand-in API server)",
                e2e::kube_apiserver::reference_dir().join("kube-apiserver").display()
            );
        }
        Kind::StandIn
    } else {
        Kind::Real
    };
    for &n in &o.peers {
        if !o.kube_only {
            one(n, &o, Kind::Etcd);
        }
        // With --kube the same peers also come as Nodes, in the same run.
        if o.kube {
            one(n, &o, kube_kind);
        }
    }
}
