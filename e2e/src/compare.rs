//! `e2e compare-upstream --upstream-dir DIR`: the differential check against
//! upstream's own flanneld (v0.21.5, from `DIR/flanneld-v0.21.5`). For every case
//! (a net-conf.json, flags, a prepared node) one fresh test-bed cluster runs
//! upstream's agent on node1 and ours on node2, against the same etcd, with the
//! same flags; once both have converged, what each made is read back from its
//! node (VXLAN devices, subnet.env, its lease in etcd, routes/ARP/FDB towards
//! the other, iptables, sysctls, a full-MTU ping between two pods) and
//! normalised (the node's own subnet, addresses and VTEP MAC become
//! placeholders) so the two can be compared row by row.
//!
//! A difference is allowed only when README.md lists it between the markers
//! `<!-- intended-differences -->` and `<!-- /intended-differences -->` as a
//! `| case | property | reason |` row (case `*` = every case); any other makes
//! the command exit 1.

use std::collections::BTreeSet;
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use e2e::cluster::{Cluster, Node, PREFIX, bin_path};
use e2e::{Netns, wait_until};
use flannel_shared::IpNet;
use serde_json::Value;

const UPSTREAM_BIN: &str = "flanneld-v0.21.5";
const START_MARK: &str = "<!-- intended-differences -->";
const END_MARK: &str = "<!-- /intended-differences -->";
/// How long an agent gets to lease, write subnet.env and route to its peer.
const CONVERGE: Duration = Duration::from_secs(20);
/// What is read back must stay the same this long before it is compared.
const STABLE_FOR: Duration = Duration::from_millis(900);
/// A foreign node's reservation (reservation cases): no test-bed node has this address.
const FOREIGN_IP: &str = "192.0.2.99";
/// The VtepMAC every hand-written reservation carries.
const RESERVED_MAC: &str = "0e:00:00:00:00:99";

struct Args {
    upstream_dir: PathBuf,
    readme: PathBuf,
    only: Vec<String>,
}

fn parse_args(mut it: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut upstream_dir = None;
    let mut readme = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"));
    let mut only = Vec::new();
    while let Some(arg) = it.next() {
        let (k, inline) = match arg.split_once('=') {
            Some((k, v)) => (k.to_string(), Some(v.to_string())),
            None => (arg.clone(), None),
        };
        let mut val = |name: &str| inline.clone().or_else(|| it.next()).ok_or(format!("{name} needs a value"));
        match k.as_str() {
            "--upstream-dir" => upstream_dir = Some(PathBuf::from(val("--upstream-dir")?)),
            "--readme" => readme = PathBuf::from(val("--readme")?),
            "--case" => only.extend(val("--case")?.split(',').map(String::from)),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    let upstream_dir = upstream_dir.ok_or("--upstream-dir DIR is required (the folder holding flanneld-v0.21.5)")?;
    Ok(Args { upstream_dir, readme, only })
}

/// `e2e compare-upstream`: runs every case and exits 1 on an unlisted difference.
pub(crate) fn run(args: impl Iterator<Item = String>) {
    let args = match parse_args(args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("e2e compare-upstream: {e}");
            std::process::exit(2);
        }
    };
    // Instead of main.rs's hook (every demo namespace): only this run's, so a
    // failing comparison leaves others' runs alone (release builds abort on panic).
    std::panic::set_hook(Box::new(|info| {
        eprintln!("{info}\ne2e compare-upstream: failed; removing this run's namespaces and processes");
        cleanup_own();
    }));
    let code = with_signal_cleanup(move || match compare(&args) {
        Ok(clean) => i32::from(!clean),
        Err(e) => {
            eprintln!("e2e compare-upstream: {e}");
            2
        }
    });
    std::process::exit(code);
}

/// Runs `work` on a worker thread while the main thread waits for SIGINT/SIGTERM,
/// which remove this run's namespaces and processes (no destructor runs then).
fn with_signal_cleanup(work: impl FnOnce() -> i32 + Send + 'static) -> i32 {
    // SAFETY: plain libc signal-mask calls on a set we own, before any other thread exists.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGINT, libc::SIGTERM, libc::SIGUSR1] {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        let worker = std::thread::spawn(move || {
            // A panic (debug builds unwind) must still wake the main thread.
            let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)).unwrap_or(2);
            libc::kill(libc::getpid(), libc::SIGUSR1);
            code
        });
        let mut sig = 0;
        libc::sigwait(&set, &mut sig);
        if sig == libc::SIGUSR1 {
            return worker.join().unwrap_or(2);
        }
        eprintln!("\ninterrupted: cleaning up");
        cleanup_own();
        130
    }
}

/// The scratch-directory tag of this command's clusters (`/tmp/flt-<tag>-<pid>x<n>`).
const TAG: &str = "demo-cmp";

/// Removes the namespaces (killing what runs in them) and scratch directories
/// this process made. Their names carry its pid (`e2e::unique_name`:
/// `demo-<2-letter kind><pid>x<n>`); `e2e down` still finds them after a `kill -9`.
fn cleanup_own() {
    let marker = format!("{}x", std::process::id() % 100_000);
    let mine = |name: &str| {
        name.strip_prefix(crate::NS_PREFIX).and_then(|r| r.get(2..)).is_some_and(|r| r.starts_with(&marker))
    };
    let list = std::process::Command::new("ip").args(["netns", "list"]).output();
    let list = list.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
    for name in list.lines().filter_map(|l| l.split_whitespace().next()).filter(|n| mine(n)) {
        if let Ok(out) = std::process::Command::new("ip").args(["netns", "pids", name]).output() {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
                // SAFETY: kill(2) on processes living in this run's namespaces.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        let _ = std::process::Command::new("ip").args(["netns", "del", name]).status();
    }
    let dir_prefix = format!("flt-{TAG}-{marker}");
    for e in std::fs::read_dir(std::env::temp_dir()).into_iter().flatten().flatten() {
        if e.file_name().to_string_lossy().starts_with(&dir_prefix) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Runs the cases, prints the rows and the summary; `Ok(true)` when every
/// difference is an intended one.
fn compare(args: &Args) -> Result<bool, String> {
    let upstream = args.upstream_dir.join(UPSTREAM_BIN);
    let upstream = std::fs::canonicalize(&upstream).map_err(|e| {
        format!(
            "no {UPSTREAM_BIN} in {} ({e}): the upstream reference binaries live in ../shared/reference/upstream",
            args.upstream_dir.display()
        )
    })?;
    let ours = bin_path("flanneld");
    let readme = std::fs::read_to_string(&args.readme).map_err(|e| format!("{}: {e}", args.readme.display()))?;
    let intended = parse_intended(&readme).map_err(|e| format!("{}: {e}", args.readme.display()))?;
    let all = cases();
    if let Some(bad) = args.only.iter().find(|o| !all.iter().any(|c| c.name == o.as_str())) {
        let names: Vec<&str> = all.iter().map(|c| c.name).collect();
        return Err(format!("no case named {bad}; cases: {}", names.join(", ")));
    }
    let cases: Vec<Case> =
        all.into_iter().filter(|c| args.only.is_empty() || args.only.iter().any(|o| o == c.name)).collect();
    println!("upstream: {}\nours:     {}\n", upstream.display(), ours.display());
    let start = Instant::now();
    let mut rows = Vec::new();
    for case in &cases {
        let t = Instant::now();
        let case_rows = run_case(case, &upstream, &ours)?;
        for r in &case_rows {
            print_row(r, lookup(&intended, &r.case, &r.prop));
        }
        println!("  ({}: {} properties, {:.1} s)\n", case.name, case_rows.len(), t.elapsed().as_secs_f64());
        rows.extend(case_rows);
    }
    Ok(summarise(&rows, &intended, cases.len(), start.elapsed()))
}

fn summarise(rows: &[Row], intended: &[Intended], cases: usize, took: Duration) -> bool {
    let differ: Vec<&Row> = rows.iter().filter(|r| !r.agrees()).collect();
    let unlisted: Vec<&&Row> = differ.iter().filter(|r| lookup(intended, &r.case, &r.prop).is_none()).collect();
    for i in intended {
        if !differ.iter().any(|r| i.matches(&r.case, &r.prop)) {
            println!("note: README lists {} / {} as an intended difference, but it did not differ", i.case, i.prop);
        }
    }
    if !unlisted.is_empty() {
        println!("\nunlisted differences:");
        for r in &unlisted {
            println!("  {} / {}:\n    upstream: {}\n    ours:     {}", r.case, r.prop, r.upstream, r.ours);
        }
    }
    println!(
        "compare-upstream: {cases} cases, {} properties: {} agree, {} differ ({} intended, {} unlisted)",
        rows.len(),
        rows.len() - differ.len(),
        differ.len(),
        differ.len() - unlisted.len(),
        unlisted.len()
    );
    println!("compare-upstream: took {:.1} s", took.as_secs_f64());
    unlisted.is_empty()
}

// ---- the intended differences (README.md) ----

struct Intended {
    case: String,
    prop: String,
    reason: String,
}

impl Intended {
    /// `case` is `*`, one case or a comma-separated list.
    fn matches(&self, case: &str, prop: &str) -> bool {
        self.prop == prop && (self.case == "*" || self.case.split(',').any(|c| c.trim() == case))
    }
}

fn lookup<'a>(list: &'a [Intended], case: &str, prop: &str) -> Option<&'a str> {
    list.iter().find(|i| i.matches(case, prop)).map(|i| i.reason.as_str())
}

/// The `| case | property | reason |` rows between the markers (header and
/// separator rows skipped; backticks are dropped).
fn parse_intended(readme: &str) -> Result<Vec<Intended>, String> {
    let start = readme.find(START_MARK).ok_or(format!("no {START_MARK} marker"))? + START_MARK.len();
    let len = readme[start..].find(END_MARK).ok_or(format!("no {END_MARK} marker after {START_MARK}"))?;
    let mut out = Vec::new();
    for line in readme[start..start + len].lines().map(str::trim).filter(|l| l.starts_with('|')) {
        let cells: Vec<String> =
            line.trim_matches('|').split('|').map(|c| c.replace('`', "").trim().to_string()).collect();
        if cells.len() < 3 || cells[0].starts_with("---") || cells[0].eq_ignore_ascii_case("case") {
            continue;
        }
        let mut it = cells.into_iter();
        let (case, prop) = (it.next().unwrap_or_default(), it.next().unwrap_or_default());
        out.push(Intended { case, prop, reason: it.collect::<Vec<_>>().join(" | ") });
    }
    Ok(out)
}

// ---- rows ----

struct Row {
    case: String,
    prop: String,
    upstream: String,
    ours: String,
}

impl Row {
    /// Equal values, and for a property that must hold (a ping), one that holds.
    fn agrees(&self) -> bool {
        self.upstream == self.ours && (!must_hold(&self.prop) || self.ours.starts_with("ok"))
    }
}

/// The data path must work: both sides failing the same way is no agreement.
fn must_hold(prop: &str) -> bool {
    prop.starts_with("ping ")
}

fn print_row(r: &Row, intended: Option<&str>) {
    let head = format!("{:<22} {:<44}", r.case, r.prop);
    if r.agrees() {
        println!("{head} agree   {}", r.ours);
        return;
    }
    match intended {
        Some(why) => println!("{head} DIFFER  (intended: {why})"),
        None => println!("{head} DIFFER  (unlisted)"),
    }
    println!("{:<24}upstream: {}\n{:<24}ours:     {}", "", r.upstream, "", r.ours);
}

/// The rows of one case: every property either side reported, in the order first seen.
fn rows_of(case: &str, upstream: &Props, ours: &Props) -> Vec<Row> {
    let mut names: Vec<&str> = Vec::new();
    for (k, _) in upstream.0.iter().chain(&ours.0) {
        if !names.contains(&k.as_str()) {
            names.push(k);
        }
    }
    names
        .into_iter()
        .map(|p| Row {
            case: case.to_string(),
            prop: p.to_string(),
            upstream: upstream.get(p).unwrap_or("(absent)").to_string(),
            ours: ours.get(p).unwrap_or("(absent)").to_string(),
        })
        .collect()
}

/// Properties of one node in the order they were read.
#[derive(Default, PartialEq, Clone)]
struct Props(Vec<(String, String)>);

impl Props {
    fn set(&mut self, k: impl Into<String>, v: impl Into<String>) {
        let v = v.into();
        self.0.push((k.into(), if v.is_empty() { "(none)".into() } else { v }));
    }

    fn get(&self, k: &str) -> Option<&str> {
        self.0.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str())
    }
}

// ---- the cases ----

/// What a node gets before the agents start.
#[derive(Clone, Copy, PartialEq)]
enum Prep {
    None,
    /// A second interface holding the default route, so only the flag makes eth0 the uplink.
    DecoyDefaultRoute,
    /// A sysctl written in the node's namespace.
    Sysctl(&'static str, &'static str),
    /// `iptables -P FORWARD DROP` (what Docker does).
    ForwardDrop,
    /// An IPv6 default route via the underlay (dual-stack nodes usually have one).
    V6DefaultRoute,
}

/// Who a reservation (a lease key without an etcd lease) is for.
#[derive(Clone, Copy)]
enum Owner {
    Foreign,
    /// The node with this index (0 = upstream's, 1 = ours).
    Node(usize),
}

struct Case {
    name: &'static str,
    netconf: String,
    /// Flags both agents get; `{ip}` is replaced by the node's address.
    flags: Vec<&'static str>,
    /// The families of the pod network (`EnableIPv4`, `EnableIPv6`); IPv6 also on the underlay.
    ipv4: bool,
    ipv6: bool,
    prep: Prep,
    /// Subnet (`10.244.2.0/24`) and owner of each reservation written before the agents start.
    reservations: Vec<(&'static str, Owner)>,
}

/// net-conf.json for the bed's 10.244.0.0/16 with `top` keys added and `backend` (`"Type":..` and more).
fn netconf(top: &str, backend: &str) -> String {
    format!(r#"{{"Network":"10.244.0.0/16"{top},"Backend":{{{backend}}}}}"#)
}

fn vxlan(backend_extra: &str) -> String {
    netconf("", &format!(r#""Type":"vxlan"{backend_extra}"#))
}

const DUAL_STACK: &str = r#","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56""#;
const VXLAN: &str = r#""Type":"vxlan""#;

fn case(name: &'static str, netconf: String) -> Case {
    Case {
        name,
        netconf,
        flags: vec!["--ip-masq"],
        ipv4: true,
        ipv6: false,
        prep: Prep::None,
        reservations: Vec::new(),
    }
}

impl Case {
    /// The pod network's families, as "is IPv6".
    fn families(&self) -> Vec<bool> {
        [(self.ipv4, false), (self.ipv6, true)].into_iter().filter(|f| f.0).map(|f| f.1).collect()
    }
}

fn cases() -> Vec<Case> {
    let with = |mut c: Case, f: &dyn Fn(&mut Case)| {
        f(&mut c);
        c
    };
    vec![
        case("vxlan-default", vxlan("")),
        case("vxlan-mtu-1400", vxlan(r#","MTU":1400"#)),
        case("vxlan-vni4096-port4789", vxlan(r#","VNI":4096,"Port":4789"#)),
        case("vxlan-gbp", vxlan(r#","GBP":true"#)),
        case("vxlan-learning", vxlan(r#","Learning":true"#)),
        case("vxlan-directrouting", vxlan(r#","DirectRouting":true"#)),
        case(
            "subnetlen-26-min-max",
            netconf(r#","SubnetLen":26,"SubnetMin":"10.244.8.0","SubnetMax":"10.244.9.192""#, VXLAN),
        ),
        case("host-gw", netconf("", r#""Type":"host-gw""#)),
        with(case("iface-regex", vxlan("")), &|c| {
            c.flags.push("--iface-regex=^eth[0-9]{1,3}$");
            c.prep = Prep::DecoyDefaultRoute;
        }),
        with(case("iface-eth0", vxlan("")), &|c| {
            c.flags.push("--iface=eth0");
            c.prep = Prep::DecoyDefaultRoute;
        }),
        with(case("public-ip", vxlan("")), &|c| {
            c.flags.push("--public-ip={ip}");
            c.prep = Prep::DecoyDefaultRoute;
        }),
        with(case("ip-masq-off", vxlan("")), &|c| c.flags.clear()),
        with(case("forward-rules-off", vxlan("")), &|c| c.flags.push("--iptables-forward-rules=false")),
        with(case("forward-policy-drop", vxlan("")), &|c| c.prep = Prep::ForwardDrop),
        with(case("bridge-nf-call-iptables-0", vxlan("")), &|c| {
            c.prep = Prep::Sysctl("net.bridge.bridge-nf-call-iptables", "0");
        }),
        with(case("dual-stack", netconf(DUAL_STACK, VXLAN)), &|c| {
            c.ipv6 = true;
            c.prep = Prep::V6DefaultRoute;
        }),
        with(case("dual-stack-no-v6-default-route", netconf(DUAL_STACK, VXLAN)), &|c| c.ipv6 = true),
        // etcd stays on the underlay's IPv4; the pod network is IPv6 only.
        with(case("ipv6-only", netconf(&format!(r#","EnableIPv4":false{DUAL_STACK}"#), VXLAN)), &|c| {
            c.ipv4 = false;
            c.ipv6 = true;
            c.prep = Prep::V6DefaultRoute;
        }),
        with(
            case("reservation-foreign", netconf(r#","SubnetMin":"10.244.1.0","SubnetMax":"10.244.3.0""#, VXLAN)),
            &|c| {
                c.reservations = vec![("10.244.2.0/24", Owner::Foreign)];
            },
        ),
        with(case("reservation-own", vxlan("")), &|c| {
            c.reservations = vec![("10.244.50.0/24", Owner::Node(0)), ("10.244.60.0/24", Owner::Node(1))];
        }),
    ]
}

/// The VNI and backend type a case's net-conf.json asks for.
fn backend_of(netconf: &str) -> (String, u64) {
    let v: Value = serde_json::from_str(netconf).unwrap_or(Value::Null);
    let ty = v["Backend"]["Type"].as_str().unwrap_or("vxlan").to_string();
    (ty, v["Backend"]["VNI"].as_u64().unwrap_or(1))
}

// ---- running one case ----

/// The side a node's agent belongs to: node1 runs upstream's, node2 ours.
const SIDES: [&str; 2] = ["upstream", "ours"];

fn run_case(case: &Case, upstream: &Path, ours: &Path) -> Result<Vec<Row>, String> {
    let mut c = Cluster::with_prefix(TAG, crate::NS_PREFIX);
    if case.ipv6 {
        c.enable_ipv6();
    }
    c.put_config(&case.netconf);
    for (subnet, owner) in &case.reservations {
        put_reservation(&c, subnet, *owner);
    }
    for _ in SIDES {
        let i = c.add_node();
        prepare(&c.nodes[i], case.prep)?;
    }
    let before: Vec<Baseline> = c.nodes.iter().map(baseline).collect();
    // Declared after the cluster, so dropped (killed) before its namespaces go.
    let mut agents: Vec<Agent> = Vec::new();
    for (i, bin) in [upstream, ours].into_iter().enumerate() {
        if let Some(first) = agents.first_mut() {
            // One after the other, upstream's first: who claims first decides some
            // outcomes (an IPv6-only upstream takes over the lease it finds).
            wait_until(CONVERGE, || !first.running() || c.nodes[0].subnet_env().is_some());
        }
        let n = &c.nodes[i];
        let flags: Vec<String> = case.flags.iter().map(|f| f.replace("{ip}", &n.ip.to_string())).collect();
        agents.push(Agent::spawn(&c, i, bin, &flags, SIDES[i])?);
    }
    converge(&c, &mut agents, case, &before);
    let mut props = snapshot(&c, &mut agents, case, &before);
    if !agents.iter_mut().all(Agent::running) {
        // An agent that did not start made nothing to compare: only how each ended is.
        let only = |p: &Props| Props(p.0.iter().filter(|(k, _)| k == "agent").cloned().collect());
        return Ok(rows_of(case.name, &only(&props[0]), &only(&props[1])));
    }
    let pings = ping_pods(&c, case);
    for (prop, up, ours) in pings {
        props[0].set(prop.clone(), up);
        props[1].set(prop, ours);
    }
    Ok(rows_of(case.name, &props[0], &props[1]))
}

/// A lease key written by hand, without an etcd lease: a reservation.
fn put_reservation(c: &Cluster, subnet: &str, owner: Owner) {
    let ip = match owner {
        Owner::Foreign => FOREIGN_IP.to_string(),
        Owner::Node(i) => Ipv4Addr::new(192, 0, 2, i as u8 + 1).to_string(),
    };
    let value = format!(
        r#"{{"PublicIP":"{ip}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{RESERVED_MAC}"}}}}"#
    );
    let key = format!("{PREFIX}/subnets/{}", subnet.replace('/', "-"));
    c.etcdctl(&["put", &key, &value]);
}

fn prepare(node: &Node, prep: Prep) -> Result<(), String> {
    match prep {
        Prep::None => Ok(()),
        Prep::DecoyDefaultRoute => {
            // Both ends in the node: the peer end is up, so the route's device is usable.
            node.ns.ip(&["link", "add", "decoy0", "type", "veth", "peer", "name", "decoy1"]);
            node.ns.ip(&["addr", "add", &format!("198.51.100.{}/24", node.ip.octets()[3]), "dev", "decoy0"]);
            node.ns.ip(&["link", "set", "decoy0", "up"]);
            node.ns.ip(&["link", "set", "decoy1", "up"]);
            node.ns.ip(&["route", "replace", "default", "via", "198.51.100.254", "dev", "decoy0"]);
            Ok(())
        }
        Prep::Sysctl(key, value) => run_ok(&node.ns, "sysctl", &["-w", &format!("{key}={value}")]).map(drop),
        Prep::ForwardDrop => run_ok(&node.ns, "iptables", &["-P", "FORWARD", "DROP"]).map(drop),
        Prep::V6DefaultRoute => {
            run_ok(&node.ns, "ip", &["-6", "route", "add", "default", "via", "2001:db8::fe"]).map(drop)
        }
    }
}

/// Runs `program` in `ns`; its stdout, or an error with everything it printed.
fn run_ok(ns: &Netns, program: &str, args: &[&str]) -> Result<String, String> {
    let out = ns.command(program).args(args).output().map_err(|e| format!("{program}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{program} {} in {}: {}{}",
            args.join(" "),
            ns.name(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip -j <args>` in `ns`, `[]` when it fails (e.g. the device does not exist).
fn ip_json(ns: &Netns, args: &[&str]) -> Vec<Value> {
    ns.try_ip_json(args).and_then(|v| v.as_array().cloned()).unwrap_or_default()
}

/// A flanneld, ours or upstream's, in a node's namespace; killed on drop.
struct Agent {
    child: Child,
    log: PathBuf,
    exited: Option<ExitStatus>,
}

impl Agent {
    /// Starts `bin` in node `i` with the bed's etcd and subnet file, then `flags`.
    fn spawn(c: &Cluster, i: usize, bin: &Path, flags: &[String], side: &str) -> Result<Agent, String> {
        let node = &c.nodes[i];
        let log = node.dir.join(format!("{side}.log"));
        let out = File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let err = out.try_clone().map_err(|e| format!("{}: {e}", log.display()))?;
        let child = node
            .ns
            .command(bin.to_str().ok_or("non-UTF-8 binary path")?)
            .arg(format!("--etcd-endpoints={}", c.endpoint()))
            .arg(format!("--subnet-file={}", node.subnet_file().display()))
            .args(flags)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("start {}: {e}", bin.display()))?;
        Ok(Agent { child, log, exited: None })
    }

    fn running(&mut self) -> bool {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().ok().flatten();
        }
        self.exited.is_none()
    }

    /// `running`, or how it ended with the last thing it logged.
    fn state(&mut self) -> String {
        if self.running() {
            return "running".into();
        }
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let last = log.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
        format!("exited ({}): {}", self.exited.map(|s| s.to_string()).unwrap_or_default(), strip_log_prefix(last))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A log line without its timestamp/level/source prefix: glog's
/// (`E1203 14:29:47.559 11417 main.go:42] msg`) or tracing's (`2026-12-03T14:29:47Z  ERROR msg`).
fn strip_log_prefix(line: &str) -> &str {
    let glog = line.starts_with(['I', 'W', 'E', 'F']) && line.as_bytes().get(1).is_some_and(u8::is_ascii_digit);
    if glog && let Some(i) = line.find("] ") {
        return &line[i + 2..];
    }
    let mut words = line.splitn(2, ' ');
    let stamp = words.next().unwrap_or_default();
    if stamp.starts_with(|c: char| c.is_ascii_digit()) && stamp.contains('T') {
        let rest = words.next().unwrap_or_default().trim_start();
        return rest.split_once(' ').map_or(rest, |(_level, msg)| msg.trim_start());
    }
    line
}

/// Waits until each agent has written subnet.env and routes to the other's
/// subnet (or has exited), then until what is read back stops changing.
fn converge(c: &Cluster, agents: &mut [Agent], case: &Case, before: &[Baseline]) {
    let exited = |agents: &mut [Agent]| agents.iter_mut().any(|a| !a.running());
    wait_until(CONVERGE, || exited(agents) || (0..2).all(|i| routes_to_peer(c, i, case)));
    if exited(agents) {
        return;
    }
    let deadline = Instant::now() + CONVERGE;
    let mut last = snapshot(c, agents, case, before);
    let mut since = Instant::now();
    while since.elapsed() < STABLE_FOR && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(300));
        let now = snapshot(c, agents, case, before);
        if now != last {
            last = now;
            since = Instant::now();
        }
    }
}

fn routes_to_peer(c: &Cluster, i: usize, case: &Case) -> bool {
    let (me, peer) = (&c.nodes[i], &c.nodes[1 - i]);
    let has = |v6: bool, dst: Option<String>| {
        let Some(dst) = dst else { return false };
        let fam = if v6 { "-6" } else { "-4" };
        !ip_json(&me.ns, &[fam, "route", "show", "exact", &dst]).is_empty()
    };
    (!case.ipv4 || has(false, peer.subnet())) && (!case.ipv6 || has(true, peer.subnet6()))
}

// ---- reading back what an agent made ----

/// What the bed itself put in a node (routes, links), so only the agent's work is compared.
struct Baseline {
    routes: BTreeSet<String>,
    links: BTreeSet<String>,
}

fn baseline(n: &Node) -> Baseline {
    Baseline {
        routes: raw_routes(&n.ns).into_iter().collect(),
        links: ip_json(&n.ns, &["link", "show"])
            .iter()
            .filter_map(|l| l["ifname"].as_str().map(String::from))
            .collect(),
    }
}

/// Both families' main-table routes, rendered (with their protocol).
fn raw_routes(ns: &Netns) -> Vec<String> {
    let mut out = Vec::new();
    for fam in ["-4", "-6"] {
        for r in ip_json(ns, &[fam, "route", "show", "table", "main"]) {
            out.push(render_route(&r, true));
        }
    }
    out
}

/// `[type] dst via gw dev d flags... metric m scope s src p [proto P]`.
fn render_route(r: &Value, with_proto: bool) -> String {
    let mut s = Vec::new();
    let str_of = |v: &Value| v.as_str().map(String::from).unwrap_or_else(|| v.to_string());
    if let Some(t) = r.get("type") {
        s.push(str_of(t));
    }
    s.push(r.get("dst").map(str_of).unwrap_or_default());
    for (key, word) in
        [("gateway", "via"), ("dev", "dev"), ("metric", "metric"), ("scope", "scope"), ("prefsrc", "src")]
    {
        if let Some(v) = r.get(key) {
            s.push(format!("{word} {}", str_of(v)));
        }
    }
    for f in r["flags"].as_array().into_iter().flatten() {
        s.push(str_of(f));
    }
    let known = ["type", "dst", "gateway", "dev", "metric", "scope", "prefsrc", "flags", "protocol", "pref"];
    for (k, v) in r.as_object().into_iter().flatten().filter(|(k, _)| !known.contains(&k.as_str())) {
        s.push(format!("{k} {}", str_of(v)));
    }
    if with_proto {
        s.push(format!("proto {}", r.get("protocol").map(str_of).unwrap_or_else(|| "boot".into())));
    }
    s.join(" ")
}

/// Addresses, subnets and MACs of one node and its peer, for placeholders.
#[derive(Default)]
struct Facts {
    ip: Option<Ipv4Addr>,
    ip6: Option<Ipv6Addr>,
    subnet: Option<IpNet>,
    subnet6: Option<IpNet>,
    /// The lease key this node holds and its value and etcd lease id.
    lease: Option<EtcdKv>,
    /// MACs of `flannel.<VNI>` and `flannel-v6.<VNI>`, where they exist.
    macs: [Option<String>; 2],
}

#[derive(Clone, PartialEq)]
struct EtcdKv {
    key: String,
    value: String,
    lease: i64,
}

/// Every key under `<prefix>/subnets/` with its value and etcd lease id (`etcdctl -w fields`).
fn etcd_subnets(c: &Cluster) -> Vec<EtcdKv> {
    let out = c.etcdctl(&["get", "--prefix", &format!("{PREFIX}/subnets/"), "-w", "fields"]);
    let mut kvs = Vec::new();
    let mut cur: Option<EtcdKv> = None;
    for line in out.lines() {
        let Some((k, v)) = line.split_once(" : ") else { continue };
        // Go's %q of plain ASCII JSON is a valid JSON string.
        let text = || serde_json::from_str::<String>(v.trim()).unwrap_or_default();
        match k.trim().trim_matches('"') {
            "Key" => {
                kvs.extend(cur.take());
                cur = Some(EtcdKv { key: text(), value: String::new(), lease: 0 });
            }
            "Value" => cur.iter_mut().for_each(|c| c.value = text()),
            "Lease" => cur.iter_mut().for_each(|c| c.lease = v.trim().parse().unwrap_or(0)),
            _ => {}
        }
    }
    kvs.extend(cur);
    kvs
}

/// `subnets/10.244.1.0-24&fd00::-64` -> the two subnets.
fn key_subnets(key: &str) -> (Option<IpNet>, Option<IpNet>) {
    let tail = key.rsplit('/').next().unwrap_or_default();
    let mut parts = tail.split('&').map(|p| p.replacen('-', "/", 1).parse::<IpNet>().ok());
    (parts.next().flatten(), parts.next().flatten())
}

fn env_net(env: &str, key: &str) -> Option<IpNet> {
    let v = env.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix('='))?;
    Some(v.parse::<IpNet>().ok()?.network())
}

/// This node's facts: its lease is the key for its subnet.env's subnet, else one with its PublicIP.
fn facts(c: &Cluster, i: usize, kvs: &[EtcdKv], vni: u64) -> Facts {
    let n = &c.nodes[i];
    let env = n.subnet_env().unwrap_or_default();
    let (env_subnet, env_subnet6) = (env_net(&env, "FLANNEL_SUBNET"), env_net(&env, "FLANNEL_IPV6_SUBNET"));
    let by_subnet = kvs.iter().find(|kv| {
        let (s4, s6) = key_subnets(&kv.key);
        (env_subnet.is_some() && s4 == env_subnet)
            || (env_subnet.is_none() && env_subnet6.is_some() && s6 == env_subnet6)
    });
    let by_ip = kvs
        .iter()
        .find(|kv| serde_json::from_str::<Value>(&kv.value).is_ok_and(|v| v["PublicIP"] == n.ip.to_string().as_str()));
    let lease = by_subnet.or(by_ip).cloned();
    let (subnet, subnet6) = match &lease {
        Some(kv) => key_subnets(&kv.key),
        None => (env_subnet, env_subnet6),
    };
    // An IPv6-only lease's key says `0.0.0.0-0`: no IPv4 subnet (and no placeholder for every address).
    let subnet = subnet.filter(|s| s.prefix() > 0);
    let macs =
        vxlan_devs(vni).map(|d| Some(ip_json(&n.ns, &["link", "show", &d]).first()?["address"].as_str()?.to_string()));
    Facts { ip: Some(n.ip), ip6: n.ip6, subnet, subnet6, lease, macs }
}

fn vxlan_devs(vni: u64) -> [String; 2] {
    [format!("flannel.{vni}"), format!("flannel-v6.{vni}")]
}

/// Replaces a node's own and its peer's addresses, subnets and MACs with placeholders.
struct Norm {
    nets: Vec<(IpNet, String)>,
    addrs: Vec<(IpAddr, String)>,
    macs: Vec<(String, String)>,
}

impl Norm {
    fn new(me: &Facts, peer: &Facts, reserved: &[(&str, Owner)]) -> Norm {
        let mut n = Norm { nets: Vec::new(), addrs: Vec::new(), macs: Vec::new() };
        for (f, who) in [(me, ""), (peer, "peer-")] {
            n.nets.extend(f.subnet.map(|s| (s, format!("<{who}subnet>"))));
            n.nets.extend(f.subnet6.map(|s| (s, format!("<{who}subnet6>"))));
            n.addrs.extend(f.ip.map(|a| (IpAddr::V4(a), format!("<{who}node-ip>"))));
            n.addrs.extend(f.ip6.map(|a| (IpAddr::V6(a), format!("<{who}node-ip6>"))));
            for (m, fam) in f.macs.iter().zip(["", "6"]) {
                n.macs.extend(m.as_ref().map(|m| (m.to_lowercase(), format!("<{who}vtep{fam}-mac>"))));
            }
        }
        for (s, owner) in reserved {
            if let (Owner::Foreign, Ok(net)) = (owner, s.parse::<IpNet>()) {
                n.nets.push((net, "<reserved-subnet>".into()));
            }
        }
        if let Ok(a) = FOREIGN_IP.parse() {
            n.addrs.push((a, "<reserved-ip>".into()));
        }
        n.macs.push((RESERVED_MAC.into(), "<reserved-mac>".into()));
        n
    }

    /// `s` with every address-like token (runs of hex digits, `.`, `:`, `/`) mapped.
    fn text(&self, s: &str) -> String {
        let is_tok = |c: char| c.is_ascii_hexdigit() || matches!(c, '.' | ':' | '/');
        let mut out = String::new();
        let mut rest = s;
        while let Some(start) = rest.find(is_tok) {
            out.push_str(&rest[..start]);
            let tail = &rest[start..];
            let len = tail.find(|c: char| !is_tok(c)).unwrap_or(tail.len());
            let tok = &tail[..len];
            // A token may end in punctuation that belongs to the text around it
            // (but `fd00::` ends in its own).
            let core = tok.trim_end_matches(['.', ':', '/']);
            match self.token(tok).map(|t| (t, "")).or_else(|| self.token(core).map(|t| (t, &tok[core.len()..]))) {
                Some((t, rest)) => {
                    out.push_str(&t);
                    out.push_str(rest);
                }
                None => out.push_str(tok),
            }
            rest = &tail[len..];
        }
        out.push_str(rest);
        out
    }

    fn token(&self, t: &str) -> Option<String> {
        if let Some((a, p)) = t.split_once('/') {
            let addr: IpAddr = a.parse().ok()?;
            let prefix: u8 = p.parse().ok()?;
            if let Some((_, label)) = self.nets.iter().find(|(n, _)| n.addr() == addr && n.prefix() == prefix) {
                return Some(label.clone());
            }
            return Some(format!("{}/{prefix}", self.addr(addr)?));
        }
        if let Ok(addr) = t.parse::<IpAddr>() {
            return self.addr(addr);
        }
        self.macs.iter().find(|(m, _)| *m == t.to_lowercase()).map(|(_, l)| l.clone())
    }

    /// An address: a node's own label, else its position in a labelled subnet (`<subnet>.1`).
    fn addr(&self, a: IpAddr) -> Option<String> {
        if let Some((_, l)) = self.addrs.iter().find(|(x, _)| *x == a) {
            return Some(l.clone());
        }
        let (net, label) = self.nets.iter().find(|(n, _)| n.contains(a))?;
        let off = net.offset_of(a)?;
        Some(if a.is_ipv4() { format!("{label}.{off}") } else { format!("{label}::{off:x}") })
    }
}

/// Everything both agents made, one [`Props`] per node (upstream's first).
fn snapshot(c: &Cluster, agents: &mut [Agent], case: &Case, before: &[Baseline]) -> Vec<Props> {
    let (backend, vni) = backend_of(&case.netconf);
    let kvs = etcd_subnets(c);
    let f: Vec<Facts> = (0..2).map(|i| facts(c, i, &kvs, vni)).collect();
    (0..2)
        .map(|i| {
            let norm = Norm::new(&f[i], &f[1 - i], &case.reservations);
            let mut p = Props::default();
            p.set("agent", norm.text(&agents[i].state()));
            let node = &c.nodes[i];
            subnet_env_props(&mut p, node, &f[i], &norm);
            lease_props(&mut p, c, &f[i], &norm, &backend);
            range_props(&mut p, &case.netconf, &f[i]);
            reservation_props(&mut p, &case.reservations, i, &f[i]);
            device_props(&mut p, node, vni, &norm, &before[i]);
            mtu_fit_props(&mut p, node, vni);
            route_props(&mut p, node, &norm, &before[i]);
            neighbour_props(&mut p, node, vni, &norm);
            firewall_props(&mut p, node, &case.families(), &norm);
            sysctl_props(&mut p, node, vni);
            p
        })
        .collect()
}

fn subnet_env_props(p: &mut Props, node: &Node, f: &Facts, norm: &Norm) {
    let Some(env) = node.subnet_env() else {
        p.set("subnet.env", "(not written)");
        return;
    };
    let keys: Vec<&str> = env.lines().filter_map(|l| l.split_once('=').map(|x| x.0)).collect();
    p.set("subnet.env keys", keys.join(" "));
    for line in env.lines() {
        let Some((k, v)) = line.split_once('=') else { continue };
        p.set(format!("subnet.env {k}"), norm.text(v));
    }
    // The gateway form of the leased subnet, as the CNI plugin expects.
    let gw = |net: Option<IpNet>| net.and_then(|n| n.nth(1)).map(|a| format!("{a}/{}", n_prefix(net)));
    let want = [("FLANNEL_SUBNET", gw(f.subnet)), ("FLANNEL_IPV6_SUBNET", gw(f.subnet6))];
    for (k, w) in want.into_iter().filter_map(|(k, w)| Some((k, w?))) {
        let got = env.lines().find_map(|l| l.strip_prefix(k)?.strip_prefix('='));
        p.set(format!("subnet.env {k} is the lease's .1"), if got == Some(w.as_str()) { "yes" } else { "no" });
    }
}

fn n_prefix(n: Option<IpNet>) -> u8 {
    n.map(|n| n.prefix()).unwrap_or(0)
}

fn lease_props(p: &mut Props, c: &Cluster, f: &Facts, norm: &Norm, backend: &str) {
    let Some(kv) = &f.lease else {
        p.set("lease", "(none found)");
        return;
    };
    let tail = kv.key.strip_prefix(&format!("{PREFIX}/subnets/")).unwrap_or(&kv.key);
    // The key's address parts as placeholders; its prefix lengths and separators as written.
    let key: Vec<String> = tail
        .split('&')
        .map(|part| match part.split_once('-') {
            Some((a, len)) => format!("{}-{len}", norm.token(&format!("{a}/{len}")).unwrap_or_else(|| a.to_string())),
            None => part.to_string(),
        })
        .collect();
    p.set("lease key", format!("subnets/{}", key.join("&")));
    let v: Value = serde_json::from_str(&kv.value).unwrap_or(Value::Null);
    let keys: Vec<&String> = v.as_object().map(|o| o.keys().collect()).unwrap_or_default();
    p.set("lease JSON keys", keys.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(" "));
    for k in ["PublicIP", "PublicIPv6", "BackendType", "BackendData", "BackendV6Data"] {
        p.set(format!("lease {k}"), v.get(k).map(|x| norm.text(&x.to_string())).unwrap_or("(absent)".into()));
    }
    if v["BackendType"] != backend {
        p.set("lease BackendType matches net-conf", "no");
    }
    p.set("lease etcd TTL", etcd_ttl(c, kv.lease));
}

/// The granted TTL of an etcd lease (`none`: the key is not bound to one).
fn etcd_ttl(c: &Cluster, id: i64) -> String {
    if id == 0 {
        return "none".into();
    }
    let out = c.etcdctl(&["lease", "timetolive", &format!("{id:x}")]);
    out.split("TTL(").nth(1).and_then(|s| s.split(')').next()).unwrap_or(out.trim()).to_string()
}

/// Whether the leased subnet lies between SubnetMin and SubnetMax (when configured).
fn range_props(p: &mut Props, netconf: &str, f: &Facts) {
    let v: Value = serde_json::from_str(netconf).unwrap_or(Value::Null);
    let bound = |k: &str| v[k].as_str().and_then(|s| s.parse::<Ipv4Addr>().ok());
    let (Some(min), Some(max)) = (bound("SubnetMin"), bound("SubnetMax")) else { return };
    let verdict = match f.subnet.map(|s| s.addr()) {
        Some(IpAddr::V4(a)) if (min..=max).contains(&a) => "inside",
        Some(_) => "outside",
        None => "no subnet",
    };
    p.set("subnet within SubnetMin..SubnetMax", verdict);
}

fn reservation_props(p: &mut Props, reserved: &[(&str, Owner)], i: usize, f: &Facts) {
    for (s, owner) in reserved {
        let net = s.parse::<IpNet>().ok();
        let holds = net.is_some() && f.subnet == net;
        match owner {
            Owner::Foreign => p.set("took a foreign reservation", if holds { "yes" } else { "no" }),
            Owner::Node(n) if *n == i => p.set("uses its own reservation", if holds { "yes" } else { "no" }),
            Owner::Node(_) => p.set("took the other node's reservation", if holds { "yes" } else { "no" }),
        }
    }
}

fn device_props(p: &mut Props, node: &Node, vni: u64, norm: &Norm, before: &Baseline) {
    let links = ip_json(&node.ns, &["link", "show"]);
    let made: Vec<&str> =
        links.iter().filter_map(|l| l["ifname"].as_str()).filter(|n| !before.links.contains(*n)).collect();
    p.set("links created", made.join(" "));
    for dev in vxlan_devs(vni) {
        let Some(link) = ip_json(&node.ns, &["-d", "link", "show", &dev]).into_iter().next() else {
            p.set(dev.to_string(), "absent");
            continue;
        };
        p.set(dev.to_string(), "present");
        let mut flat = Vec::new();
        flatten("", &link, &mut flat);
        for (k, v) in flat {
            if KERNEL_DEFAULTS.contains(&k.as_str()) {
                continue;
            }
            p.set(format!("{dev} {k}"), norm.text(&v));
        }
        // The kernel defaults txqlen to 1000 but `ip -j` leaves out a zero.
        if link.get("txqlen").is_none() {
            p.set(format!("{dev} txqlen"), "0");
        }
        let mac = link["address"].as_str().unwrap_or_default();
        p.set(format!("{dev} MAC"), mac_kind(mac));
        let addrs: Vec<String> = ip_json(&node.ns, &["addr", "show", "dev", &dev])
            .iter()
            .flat_map(|l| l["addr_info"].as_array().cloned().unwrap_or_default())
            .map(|a| render_addr(&a, norm))
            .collect();
        p.set(format!("{dev} addresses"), addrs.join(", "));
    }
}

/// Link attributes left out: per-instance values (the index; the MAC, whose
/// kind is shown and which the lease's VtepMAC is checked against) and what the
/// kernel sets alike for every device neither agent asks about.
const KERNEL_DEFAULTS: &[&str] = &[
    "ifindex",
    "address",
    "ifname",
    "broadcast",
    "allmulti",
    "promiscuity",
    "group",
    "link_type",
    "linkmode",
    "min_mtu",
    "max_mtu",
    "num_tx_queues",
    "num_rx_queues",
    "gso_max_size",
    "gso_max_segs",
    "tso_max_size",
    "tso_max_segs",
    "gro_max_size",
];

/// Whether a pod with FLANNEL_MTU fits through every flannel device: a
/// bigger pod MTU fails full-size packets with "message too long".
fn mtu_fit_props(p: &mut Props, node: &Node, vni: u64) {
    let env = node.subnet_env().unwrap_or_default();
    let Some(mtu) = env.lines().find_map(|l| l.strip_prefix("FLANNEL_MTU=")?.parse::<u64>().ok()) else { return };
    let too_small: Vec<String> = vxlan_devs(vni)
        .iter()
        .filter_map(|d| {
            let dev_mtu = ip_json(&node.ns, &["link", "show", d]).first()?["mtu"].as_u64()?;
            (dev_mtu < mtu).then(|| format!("{d} has MTU {dev_mtu}"))
        })
        .collect();
    let verdict = if too_small.is_empty() { "yes".to_string() } else { format!("no: {}", too_small.join(", ")) };
    p.set("FLANNEL_MTU fits the VXLAN devices", verdict);
}

fn mac_kind(mac: &str) -> &'static str {
    match u8::from_str_radix(mac.get(..2).unwrap_or("01"), 16) {
        Ok(b) if b & 1 == 0 && b & 2 == 2 => "locally administered unicast",
        Ok(b) if b & 1 == 0 => "universal unicast",
        _ => "multicast or invalid",
    }
}

/// `addr/len scope s` plus its flags; a link-local address is kernel-made from the MAC.
fn render_addr(a: &Value, norm: &Norm) -> String {
    let local = a["local"].as_str().unwrap_or_default();
    let shown = if local.starts_with("fe80:") { "<link-local>".to_string() } else { norm.text(local) };
    let mut s = format!("{shown}/{} scope {}", a["prefixlen"], a["scope"].as_str().unwrap_or("?"));
    // `tentative` is duplicate address detection still running: a moment, not a setting.
    for (k, v) in a.as_object().into_iter().flatten().filter(|(k, _)| *k != "tentative") {
        if v == &Value::Bool(true) {
            s.push_str(&format!(" {k}"));
        }
    }
    s
}

/// Flattens `ip -j` JSON into `path value` pairs (`linkinfo.info_data.port 8472`); arrays joined.
fn flatten(path: &str, v: &Value, out: &mut Vec<(String, String)>) {
    match v {
        Value::Object(o) => {
            for (k, x) in o {
                let p = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                flatten(&p, x, out);
            }
        }
        Value::Array(a) => {
            let items: Vec<String> = a.iter().map(|x| x.as_str().map(String::from).unwrap_or(x.to_string())).collect();
            out.push((path.to_string(), items.join(",")));
        }
        Value::String(s) => out.push((path.to_string(), s.clone())),
        other => out.push((path.to_string(), other.to_string())),
    }
}

/// Routes the agent added, normalised, without and with their protocol (ours marks its own).
fn route_props(p: &mut Props, node: &Node, norm: &Norm, before: &Baseline) {
    for (fam, name) in [("-4", "v4"), ("-6", "v6")] {
        let mut routes = Vec::new();
        let mut protos = BTreeSet::new();
        for r in ip_json(&node.ns, &[fam, "route", "show", "table", "main"]) {
            if before.routes.contains(&render_route(&r, true)) {
                continue;
            }
            routes.push(norm.text(&render_route(&r, false)));
            if r.get("protocol").and_then(Value::as_str) != Some("kernel") {
                protos.insert(
                    r.get("protocol").map(|x| x.as_str().unwrap_or_default().to_string()).unwrap_or("boot".into()),
                );
            }
        }
        routes.sort();
        p.set(format!("routes {name}"), routes.join("; "));
        p.set(format!("routes {name} protocol"), protos.into_iter().collect::<Vec<_>>().join(" "));
    }
}

fn neighbour_props(p: &mut Props, node: &Node, vni: u64, norm: &Norm) {
    for (dev, fam) in vxlan_devs(vni).iter().zip(["-4", "-6"]) {
        let mut neigh: Vec<String> = ip_json(&node.ns, &[fam, "neigh", "show", "dev", dev])
            .iter()
            .map(|n| {
                let state =
                    n["state"].as_array().map(|s| s.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(","));
                norm.text(&format!(
                    "{} lladdr {} {}",
                    n["dst"].as_str().unwrap_or("?"),
                    n["lladdr"].as_str().unwrap_or("-"),
                    state.unwrap_or_default()
                ))
            })
            .collect();
        neigh.sort();
        let fdb_out = node.ns.command("bridge").args(["-j", "fdb", "show", "dev", dev]).output();
        let fdb: Vec<Value> = fdb_out
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| serde_json::from_slice::<Value>(&o.stdout).ok())
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default();
        let mut fdb: Vec<String> = fdb
            .iter()
            .map(|e| {
                let flags =
                    e["flags"].as_array().map(|s| s.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(","));
                norm.text(&format!(
                    "{} dst {} {} {}",
                    e["mac"].as_str().unwrap_or("?"),
                    e["dst"].as_str().unwrap_or("-"),
                    flags.unwrap_or_default(),
                    e["state"].as_str().unwrap_or("")
                ))
            })
            .collect();
        fdb.sort();
        if neigh.is_empty() && fdb.is_empty() && ip_json(&node.ns, &["link", "show", dev]).is_empty() {
            continue;
        }
        p.set(format!("neighbours {dev}"), neigh.join("; "));
        p.set(format!("fdb {dev}"), fdb.join("; "));
    }
}

/// iptables-save of nat and filter, chain by chain; built-in chains only when
/// they hold rules or a policy other than ACCEPT (the bed writes none).
fn firewall_props(p: &mut Props, node: &Node, families: &[bool], norm: &Norm) {
    // Both tools for an IPv6-only network too: the IPv4 side must then stay empty.
    let tools: &[&str] = if families.contains(&true) { &["iptables", "ip6tables"] } else { &["iptables"] };
    for tool in tools {
        for table in ["nat", "filter"] {
            let save = run_ok(&node.ns, &format!("{tool}-save"), &["-t", table]).unwrap_or_default();
            for (chain, policy, rules) in parse_save(&save) {
                let builtin = policy != "-";
                if builtin && rules.is_empty() && policy == "ACCEPT" {
                    continue;
                }
                let mut v = Vec::new();
                if builtin {
                    v.push(format!("policy {policy}"));
                }
                v.extend(rules.iter().map(|r| norm.text(r)));
                p.set(format!("{tool} {table} {chain}"), v.join(" | "));
            }
        }
    }
    // Which flavour holds flannel's chains: the agent must write where kube-proxy does.
    let mut holders = Vec::new();
    for tool in tools {
        for flavour in ["nft", "legacy"] {
            let save = run_ok(&node.ns, &format!("{tool}-{flavour}-save"), &[]).unwrap_or_default();
            if save.contains("FLANNEL-") {
                holders.push(format!("{tool}-{flavour}"));
            }
        }
    }
    p.set("iptables flavour holding FLANNEL-*", if holders.is_empty() { "none".into() } else { holders.join(" ") });

    let tables = run_ok(&node.ns, "nft", &["list", "tables"]).unwrap_or_default();
    let mut tables: Vec<&str> = tables.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    tables.sort();
    p.set("nft tables", tables.join(", "));
}

/// (chain, policy or `-`, rules without `-A <chain> `) in the order iptables-save lists them.
fn parse_save(save: &str) -> Vec<(String, String, Vec<String>)> {
    let mut chains: Vec<(String, String, Vec<String>)> = Vec::new();
    for line in save.lines() {
        if let Some(decl) = line.strip_prefix(':') {
            let mut w = decl.split_whitespace();
            chains.push((w.next().unwrap_or("").into(), w.next().unwrap_or("-").into(), Vec::new()));
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let (chain, rest) = rule.split_once(' ').unwrap_or((rule, ""));
            if let Some(c) = chains.iter_mut().find(|c| c.0 == chain) {
                c.2.push(rest.to_string());
            }
        }
    }
    chains
}

fn sysctl_props(p: &mut Props, node: &Node, vni: u64) {
    let mut files = vec![
        "net/ipv4/ip_forward".to_string(),
        "net/ipv6/conf/all/forwarding".into(),
        "net/ipv4/conf/all/rp_filter".into(),
        "net/bridge/bridge-nf-call-iptables".into(),
        "net/bridge/bridge-nf-call-ip6tables".into(),
    ];
    for dev in vxlan_devs(vni) {
        if !ip_json(&node.ns, &["link", "show", &dev]).is_empty() {
            files.push(format!("net/ipv6/conf/{dev}/accept_ra"));
            files.push(format!("net/ipv4/conf/{dev}/rp_filter"));
        }
    }
    // One shell for all: /proc/sys/net shows the namespace of the process reading it.
    let script = r#"for f; do printf '%s=%s\n' "$f" "$(cat /proc/sys/$f 2>/dev/null || echo absent)"; done"#;
    let mut args = vec!["-c", script, "sh"];
    args.extend(files.iter().map(String::as_str));
    for line in run_ok(&node.ns, "sh", &args).unwrap_or_default().lines() {
        if let Some((k, v)) = line.split_once('=') {
            p.set(format!("sysctl {}", k.replace('/', ".")), v);
        }
    }
}

// ---- the data path ----

/// A pod on each node (a namespace on a veth, gateway `.1` of the node's
/// subnets, MTU FLANNEL_MTU, as the CNI plugin would make it), forwarding on as
/// the kubelet requires, then a ping with DF from each pod to the other at the
/// full MTU both pods take (the smaller FLANNEL_MTU: a bigger packet could not
/// enter the other pod, and a differing MTU has its own row), for each family
/// of the case. Returns (property, from upstream's pod, from ours).
fn ping_pods(c: &Cluster, case: &Case) -> Vec<(String, String, String)> {
    let pods: Vec<Result<Pod, String>> = c.nodes.iter().map(Pod::wire).collect();
    let mut out = Vec::new();
    for v6 in case.families() {
        let prop = format!("ping {} pod->pod, DF, full MTU", if v6 { "v6" } else { "v4" });
        let result = |from: usize| match (&pods[from], &pods[1 - from]) {
            (Ok(a), Ok(b)) => a.ping(b, v6, a.mtu.min(b.mtu)),
            (Err(e), _) | (_, Err(e)) => format!("no pod: {e}"),
        };
        out.push((prop, result(0), result(1)));
    }
    out
}

struct Pod {
    ns: Netns,
    /// The pod's IPv4 and IPv6 address, for the families subnet.env has.
    ips: [Option<IpAddr>; 2],
    mtu: u32,
}

impl Pod {
    fn wire(node: &Node) -> Result<Pod, String> {
        let env = node.subnet_env().ok_or("no subnet.env")?;
        let get = |k: &str| env.lines().find_map(|l| l.strip_prefix(k)?.strip_prefix('=')).map(str::to_string);
        let mtu: u32 = get("FLANNEL_MTU").ok_or("no FLANNEL_MTU")?.parse().map_err(|e| format!("FLANNEL_MTU: {e}"))?;
        let ns = Netns::new(&format!("{}cp", crate::NS_PREFIX));
        let m = mtu.to_string();
        let veth = ["link", "add", "cmp0", "mtu", &m, "type", "veth", "peer", "name", "eth0", "mtu", &m];
        node.ns.ip(&[&veth[..], &["netns", ns.name()]].concat());
        node.ns.ip(&["link", "set", "cmp0", "up"]);
        ns.ip(&["link", "set", "eth0", "up"]);
        let mut ips = [None, None];
        for (slot, key) in ips.iter_mut().zip(["FLANNEL_SUBNET", "FLANNEL_IPV6_SUBNET"]) {
            if let Some(gw) = get(key) {
                let gw: IpNet = gw.parse().map_err(|e| format!("{key}: {e}"))?;
                *slot = Some(Self::address(node, &ns, gw)?);
            }
        }
        // The agents' own forwarding settings were read above; a kubelet node has both on.
        run_ok(&node.ns, "sysctl", &["-w", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"])?;
        Ok(Pod { ns, ips, mtu })
    }

    /// Gateway `gw` on the node's end, `.2` with a default route via it in the pod; the pod's address.
    fn address(node: &Node, ns: &Netns, gw: IpNet) -> Result<IpAddr, String> {
        let ip = gw.network().nth(2).ok_or(format!("{gw}: subnet too small"))?;
        let fam = if gw.is_ipv4() { "-4" } else { "-6" };
        // Addresses from IPAM need no duplicate address detection (as the CNI plugin adds them).
        node.ns.ip(&[fam, "addr", "add", &gw.to_string(), "dev", "cmp0", "nodad"]);
        ns.ip(&[fam, "addr", "add", &format!("{ip}/{}", gw.prefix()), "dev", "eth0", "nodad"]);
        ns.ip(&[fam, "route", "add", "default", "via", &gw.addr().to_string()]);
        Ok(ip)
    }

    /// `ok (ttl N)` when a ping of `mtu` bytes with DF set is answered, else `lost`.
    fn ping(&self, to: &Pod, v6: bool, mtu: u32) -> String {
        let hdr = if v6 { 48 } else { 28 };
        let Some(dst) = to.ips[usize::from(v6)] else { return "no address".into() };
        let size = mtu.saturating_sub(hdr).to_string();
        let out = self.ns.run("ping", &["-c", "3", "-i", "0.2", "-W", "2", "-M", "do", "-s", &size, &dst.to_string()]);
        let text = String::from_utf8_lossy(&out.stdout);
        match text.split_whitespace().find_map(|w| w.strip_prefix("ttl=").or_else(|| w.strip_prefix("hlim="))) {
            Some(ttl) => format!("ok (ttl {ttl})"),
            None => "lost".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intended_rows_between_the_markers() {
        let readme = "| a | b | not in the list |\n<!-- intended-differences -->\n| case | property | reason |\n\
                      | --- | --- | --- |\n| `*` | `routes v4 protocol` | ours marks its routes |\n\
                      | host-gw | lease BackendData | a | b |\n| `x`, `y` | p | both |\n<!-- /intended-differences -->\n";
        let list = parse_intended(readme).unwrap();
        assert_eq!(list.len(), 3);
        assert_eq!(lookup(&list, "y", "p"), Some("both"));
        assert_eq!(lookup(&list, "z", "p"), None);
        assert_eq!(lookup(&list, "vxlan-gbp", "routes v4 protocol"), Some("ours marks its routes"));
        assert_eq!(lookup(&list, "host-gw", "lease BackendData"), Some("a | b"));
        assert_eq!(lookup(&list, "vxlan-default", "lease BackendData"), None);
        assert!(parse_intended("no markers").is_err());
    }

    fn facts(ip: [u8; 4], subnet: &str, subnet6: &str, mac: &str) -> Facts {
        Facts {
            ip: Some(Ipv4Addr::from(ip)),
            ip6: None,
            subnet: subnet.parse().ok(),
            subnet6: subnet6.parse().ok(),
            lease: None,
            macs: [Some(mac.into()), None],
        }
    }

    #[test]
    fn norm_maps_own_and_peer_addresses() {
        let me = facts([192, 0, 2, 1], "10.244.8.64/26", "fd00:10:244:5::/64", "0a:00:00:00:00:01");
        let peer = facts([192, 0, 2, 2], "10.244.8.128/26", "fd00:10:244:9::/64", "0A:00:00:00:00:02");
        let n = Norm::new(&me, &peer, &[]);
        assert_eq!(
            n.text("10.244.8.128/26 via 10.244.8.128 dev flannel.1 onlink"),
            "<peer-subnet> via <peer-subnet>.0 dev flannel.1 onlink"
        );
        assert_eq!(n.text("FLANNEL_SUBNET=10.244.8.65/26"), "FLANNEL_SUBNET=<subnet>.1/26");
        assert_eq!(n.text("fd00:10:244:9:: lladdr 0a:00:00:00:00:02"), "<peer-subnet6>::0 lladdr <peer-vtep-mac>");
        assert_eq!(
            n.text(r#"{"PublicIP":"192.0.2.1","x":"10.244.0.0/16"}"#),
            r#"{"PublicIP":"<node-ip>","x":"10.244.0.0/16"}"#
        );
        assert_eq!(n.text("dst 192.0.2.2."), "dst <peer-node-ip>.");
    }

    #[test]
    fn iptables_save_chain_by_chain() {
        let save = "*nat\n:POSTROUTING ACCEPT [0:0]\n:FLANNEL-POSTRTG - [0:0]\n\
                    -A POSTROUTING -j FLANNEL-POSTRTG\n-A FLANNEL-POSTRTG -j RETURN\nCOMMIT\n";
        let chains = parse_save(save);
        assert_eq!(chains[0], ("POSTROUTING".into(), "ACCEPT".into(), vec!["-j FLANNEL-POSTRTG".to_string()]));
        assert_eq!(chains[1], ("FLANNEL-POSTRTG".into(), "-".into(), vec!["-j RETURN".to_string()]));
    }

    #[test]
    fn log_prefixes_go() {
        assert_eq!(strip_log_prefix("E1203 14:29:47.5 11417 main.go:1] Failed to find"), "Failed to find");
        assert_eq!(strip_log_prefix("2026-12-03T14:29:47.518871Z ERROR no uplink: eth9"), "no uplink: eth9");
        assert_eq!(strip_log_prefix("2026-12-03T14:29:47.518871Z  INFO ready"), "ready");
        assert_eq!(strip_log_prefix("flanneld: bad flag"), "flanneld: bad flag");
    }

    #[test]
    fn a_ping_must_succeed_to_agree() {
        let row =
            |u: &str, o: &str| Row { case: "c".into(), prop: "ping v4 x".into(), upstream: u.into(), ours: o.into() };
        assert!(row("ok (ttl 62)", "ok (ttl 62)").agrees());
        assert!(!row("lost", "lost").agrees());
    }
}
