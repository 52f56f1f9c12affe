//! ADD, DEL, CHECK, STATUS and GC.
//!
//! An attachment's command gets one [`Ctx`], built once from the environment;
//! every command reaches the address store through [`with_store`] (open,
//! lock, work, unlock) and the kernel through one connection per namespace.
//! The kernel side is written against [`Kernel`], so it also runs against the
//! in-memory kernel of the unit tests.

use std::fs::{self, File};
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use flannel_shared::IpNet;
use flannel_shared::firewall::{Mode as MasqMode, PodMasq};
use flannel_shared::netlink::{Idempotent, Netlink, RT_TABLE_MAIN, Route};
use flannel_shared::netns;
use flannel_shared::subnet_env::{SubnetEnv, SubnetEnvError, write_file_atomic};

use crate::conf::{self, Command, Env, PluginConf, RouteSpec};
use crate::dataplane::{self, BridgeSpec};
use crate::error::{CniError, Result, code, io_err};
use crate::ipam::{self, Allocation, IpamError, Locked, Range, Store};
use crate::kernel::{Kernel, sysctl_path};
use crate::log::Log;
use crate::result::{CniResult, Interface, IpConfig, RouteResult};
use crate::state::{self, SavedState};

/// Runs one command. VERSION is answered before there is a configuration.
pub fn run(cmd: Command, env: &Env, conf: &PluginConf, log: &mut Log) -> Result<Option<String>> {
    match cmd {
        Command::Add => add(&Ctx::new(cmd, env, conf)?, log).map(Some),
        Command::Del => del(&Ctx::new(cmd, env, conf)?, log).map(|()| None),
        Command::Check => check(&Ctx::new(cmd, env, conf)?, log).map(|()| None),
        Command::Status => status(conf, log).map(|()| None),
        Command::Gc => gc(conf, log).map(|()| None),
        Command::Version => unreachable!("VERSION is answered by main"),
    }
}

// ---- the invocation ----

/// One ADD, DEL or CHECK: the attachment, where its pod lives, the
/// configuration, and what the attachment's ADD saved.
pub struct Ctx<'a> {
    pub conf: &'a PluginConf,
    pub container_id: &'a str,
    /// `CNI_IFNAME`.
    pub ifname: &'a str,
    /// `CNI_NETNS`: present for ADD and CHECK; DEL may come without it.
    pub netns: Option<&'a Path>,
    /// What this attachment's ADD saved, read for DEL and CHECK.
    pub saved: Option<SavedState>,
}

fn missing_netns() -> CniError {
    CniError::new(code::INVALID_ENV, "CNI_NETNS is required")
}

impl<'a> Ctx<'a> {
    /// Checks what `cmd` needs from the environment (as [`Env::load`] does:
    /// an `Env` built any other way gets the same CNI errors, never a panic)
    /// and reads the saved state.
    pub fn new(cmd: Command, env: &'a Env, conf: &'a PluginConf) -> Result<Ctx<'a>> {
        conf::validate_container_id(&env.container_id)?;
        conf::validate_ifname(&env.ifname)?;
        let netns = env.netns.as_deref().filter(|p| !p.as_os_str().is_empty());
        if netns.is_none() && cmd != Command::Del {
            return Err(missing_netns());
        }
        let saved = match cmd {
            Command::Del | Command::Check => state::load(&state_path(conf, &env.container_id)),
            _ => None,
        };
        Ok(Ctx { conf, container_id: &env.container_id, ifname: &env.ifname, netns, saved })
    }

    /// `CNI_NETNS`, for the commands that cannot do without it.
    pub fn require_netns(&self) -> Result<&'a Path> {
        self.netns.ok_or_else(missing_netns)
    }

    /// DEL: the pod's namespace, if it still exists.
    fn existing_netns(&self) -> Option<File> {
        let ns = netns::open(self.netns?).ok()?;
        netns::is_netns(&ns).then_some(ns)
    }

    fn state_path(&self) -> PathBuf {
        state_path(self.conf, self.container_id)
    }
}

/// The pod's side of ADD: the kernel in its namespace, the namespace itself
/// (the veth peer is created directly in it) and its path (for the result).
pub struct Pod<'a, K> {
    pub kernel: &'a K,
    pub ns: &'a File,
    pub path: &'a Path,
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(|e| io_err("cannot start the async runtime", e))
}

fn connect() -> Result<Netlink> {
    Netlink::connect().map_err(|e| io_err("netlink", e))
}

fn connect_in(ns: &File) -> Result<Netlink> {
    Netlink::connect_in(ns).map_err(|e| io_err("netlink in the pod namespace", e))
}

fn read_subnet_env(conf: &PluginConf) -> Result<SubnetEnv> {
    SubnetEnv::read(&conf.subnet_file).map_err(|e| {
        if e.is_missing() {
            CniError::new(
                code::TRY_AGAIN_LATER,
                format!(
                    "{} does not exist yet: flanneld has not leased a subnet for this node",
                    conf.subnet_file.display()
                ),
            )
        } else {
            CniError::new(code::IO_FAILURE, "cannot use the flannel subnet file").with_details(e.to_string())
        }
    })
}

fn open_netns(path: &Path) -> Result<File> {
    let f = netns::open(path).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            CniError::new(code::UNKNOWN_CONTAINER, format!("network namespace {} does not exist", path.display()))
        } else {
            io_err(format_args!("cannot open network namespace {}", path.display()), e)
        }
    })?;
    if !netns::is_netns(&f) {
        return Err(CniError::new(
            code::INVALID_ENV,
            format!("CNI_NETNS {} is not a network namespace", path.display()),
        ));
    }
    Ok(f)
}

// ---- the address store ----

fn ipam_err(e: IpamError) -> CniError {
    match e {
        IpamError::Exhausted(..) => CniError::new(code::NO_ADDRESSES, e.to_string()),
        IpamError::Taken { .. } => CniError::new(code::NO_ADDRESSES, e.to_string()),
        IpamError::NotInRange { .. } => CniError::new(code::INVALID_CONFIG, e.to_string()),
        IpamError::Io { .. } => CniError::new(code::IO_FAILURE, e.to_string()),
    }
}

/// The address store of one network, open and under host-local's lock.
pub struct Txn<'a> {
    store: &'a Store,
    guard: Locked<'a>,
}

/// Opens (creating it if needed) the address store at `dir`, takes its lock
/// and runs `f`; the lock is released when `f` returns, whatever it returns.
pub fn with_store<T>(dir: &Path, f: impl FnOnce(&Txn<'_>) -> Result<T>) -> Result<T> {
    let store = Store::open(dir).map_err(ipam_err)?;
    let txn = Txn { store: &store, guard: store.lock().map_err(ipam_err)? };
    f(&txn)
}

/// [`with_store`] for commands that must not create a store: `None` when there is none.
pub fn with_existing_store<T>(dir: &Path, f: impl FnOnce(&Txn<'_>) -> Result<T>) -> Result<Option<T>> {
    if !dir.is_dir() {
        return Ok(None);
    }
    with_store(dir, f).map(Some)
}

impl Txn<'_> {
    pub fn allocate(
        &self,
        range: &Range,
        id: &str,
        ifname: &str,
        requested: Option<IpAddr>,
        reuse: bool,
    ) -> Result<IpAddr> {
        self.store.allocate(&self.guard, range, id, ifname, requested, reuse).map_err(ipam_err)
    }

    pub fn find(&self, id: &str, ifname: &str) -> Result<Vec<IpAddr>> {
        self.store.find(&self.guard, id, ifname).map_err(ipam_err)
    }

    pub fn release(&self, id: &str, ifname: &str) -> Result<Vec<IpAddr>> {
        self.store.release(&self.guard, id, ifname).map_err(ipam_err)
    }

    pub fn release_ip(&self, ip: IpAddr) -> Result<()> {
        self.store.release_ip(&self.guard, ip).map_err(ipam_err)
    }

    pub fn allocations(&self) -> Result<Vec<Allocation>> {
        self.store.allocations(&self.guard).map_err(ipam_err)
    }

    /// After a reboot, frees what the earlier boot reserved (see
    /// [`Store::sweep_earlier_boot`]) and those attachments' saved state, and says so.
    /// A host whose boot id cannot be read keeps every reservation.
    pub fn sweep_earlier_boot(&self, conf: &PluginConf, log: &mut Log) -> Result<()> {
        let boot = match ipam::current_boot_id() {
            Ok(b) => b,
            Err(e) => {
                log.warn(&format!("cannot tell which boot this is, so reservations of earlier boots stay: {e}"));
                return Ok(());
            }
        };
        let Some((old, freed)) = self.store.sweep_earlier_boot(&self.guard, &boot).map_err(ipam_err)? else {
            return Ok(());
        };
        for a in &freed {
            let p = state_path(conf, &a.container_id);
            if state::load(&p).is_some_and(|s| s.name.as_deref().is_none_or(|n| n == conf.name)) {
                let _ = fs::remove_file(p);
            }
        }
        let list: Vec<String> = freed.iter().map(|a| format!("{} ({})", a.ip, a.container_id)).collect();
        log.warn(&format!(
            "host rebooted (boot {old} -> {boot}): freed {} address(es) reserved before the reboot{}{}",
            freed.len(),
            if list.is_empty() { "" } else { ": " },
            list.join(", ")
        ));
        Ok(())
    }
}

// ---- shared helpers ----

/// Whether the plugin masquerades an attachment, and with which backend
/// (`None`: it does not); one rule for ADD, DEL, CHECK and GC. ipMasq is what
/// the attachment's ADD saved, else the configuration's `ipMasq`, else
/// upstream's default: masquerade when flanneld does not (`!FLANNEL_IPMASQ`,
/// read only when needed; no subnet.env means no). The backend likewise: as
/// saved, else as configured, else the host's default. ADD passes no saved
/// state (it is the one saving it); so DEL and GC undo, and CHECK looks for,
/// what the ADD did, even when the configuration changed since.
fn masquerade(
    conf: &PluginConf,
    saved: Option<&SavedState>,
    flannel_ipmasq: impl FnOnce() -> Option<bool>,
) -> Option<MasqMode> {
    decide_masquerade(conf, saved, flannel_ipmasq, MasqMode::host_default)
}

fn decide_masquerade(
    conf: &PluginConf,
    saved: Option<&SavedState>,
    flannel_ipmasq: impl FnOnce() -> Option<bool>,
    host_default: impl FnOnce() -> MasqMode,
) -> Option<MasqMode> {
    let on = saved.and_then(|s| s.ip_masq).or(conf.ip_masq).or_else(|| flannel_ipmasq().map(|m| !m)).unwrap_or(false);
    on.then(|| saved.and_then(SavedState::ip_masq_backend).or(conf.ip_masq_backend).unwrap_or_else(host_default))
}

/// `FLANNEL_IPMASQ`, for the commands that need nothing else of subnet.env.
fn flannel_ipmasq(conf: &PluginConf) -> Option<bool> {
    SubnetEnv::read(&conf.subnet_file).ok().map(|s| s.ipmasq)
}

fn pod_masq<'a>(network: &'a str, container_id: &'a str, ifname: &'a str) -> PodMasq<'a> {
    PodMasq { network, container_id, ifname }
}

fn state_path(conf: &PluginConf, container_id: &str) -> PathBuf {
    state::path(&conf.data_dir, container_id)
}

// ---- ADD ----

/// One address family of the node network as this ADD uses it.
struct Family {
    range: Range,
    network: IpNet,
    /// Gateway form: `10.244.1.1/24`.
    gateway_net: IpNet,
}

fn families(senv: &SubnetEnv) -> Result<Vec<Family>> {
    let mut out = Vec::new();
    for (net, sub) in [(senv.network, senv.subnet), (senv.ipv6_network, senv.ipv6_subnet)] {
        if let (Some(network), Some(subnet)) = (net, sub) {
            let range = Range::from_gateway_form(subnet, out.len()).ok_or_else(|| {
                CniError::new(code::INVALID_CONFIG, format!("node subnet {subnet} is too small to hold pods"))
            })?;
            let gateway_net = IpNet::new(range.gateway, subnet.prefix()).expect("prefix already valid");
            out.push(Family { range, network, gateway_net });
        }
    }
    Ok(out)
}

/// What ADD takes from subnet.env and the configuration before it touches anything.
struct Plan {
    fams: Vec<Family>,
    mtu: u32,
    /// `FLANNEL_IPMASQ`: whether flanneld masquerades itself.
    flannel_ipmasq: bool,
}

impl Plan {
    fn new(conf: &PluginConf, senv: &SubnetEnv) -> Result<Plan> {
        Ok(Plan { fams: families(senv)?, mtu: conf.mtu.unwrap_or(senv.mtu), flannel_ipmasq: senv.ipmasq })
    }

    /// Every requested address has a node subnet of its family.
    fn check_requested(&self, conf: &PluginConf) -> Result<()> {
        for ip in &conf.requested_ips {
            if !self.fams.iter().any(|f| f.range.subnet.is_ipv4() == ip.is_ipv4()) {
                return Err(CniError::new(
                    code::INVALID_CONFIG,
                    format!("requested IP {ip}: the node has no subnet of that family"),
                ));
            }
        }
        Ok(())
    }
}

/// The routes a pod gets, upstream's way: the ipam routes, the cluster network
/// (no explicit gateway: via the pod's gateway), and the default route when
/// `isDefaultGateway`.
fn pod_routes(conf: &PluginConf, fams: &[Family]) -> Vec<RouteSpec> {
    let mut routes: Vec<RouteSpec> = conf.ipam_routes.clone();
    for f in fams {
        if !routes.iter().any(|r| r.dst == f.network.network()) {
            routes.push(RouteSpec { dst: f.network.network(), gw: None });
        }
    }
    if conf.is_default_gateway {
        for f in fams {
            let def = IpNet::default_route(f.network.is_ipv4());
            routes.retain(|r| r.dst != def);
            routes.push(RouteSpec { dst: def, gw: Some(f.range.gateway) });
        }
    }
    routes
}

/// What a failed ADD must undo.
#[derive(Default)]
struct Undo {
    ips: Vec<IpAddr>,
    host_veth: Option<String>,
    /// The pod addresses whose masquerade was being set up, and how.
    masq: Option<(MasqMode, Vec<IpAddr>)>,
    state: Option<PathBuf>,
}

impl Undo {
    async fn run(self, ctx: &Ctx<'_>, host: &impl Kernel, log: &mut Log) {
        if let Some(name) = &self.host_veth
            && let Ok(Some(l)) = host.link_by_name(name).await
            && let Err(e) = host.del_link(l.index).await
        {
            log.error(&format!("rollback: cannot delete {name}: {e}"));
        }
        if let Some((mode, ips)) = &self.masq
            && let Err(e) = pod_masq(&ctx.conf.name, ctx.container_id, ctx.ifname).teardown(*mode, ips)
        {
            log.error(&format!("rollback: {e}"));
        }
        if !self.ips.is_empty() {
            let released = with_store(&ctx.conf.ipam_dir(), |t| self.ips.iter().try_for_each(|ip| t.release_ip(*ip)));
            if let Err(e) = released {
                log.error(&format!("rollback: cannot free {:?}: {e}", self.ips));
            }
        }
        if let Some(p) = self.state {
            let _ = fs::remove_file(p);
        }
    }
}

fn enable_forwarding(host: &impl Kernel, fams: &[Family], log: &mut Log) {
    for f in fams {
        let key = if f.network.is_ipv4() { "net/ipv4/ip_forward" } else { "net/ipv6/conf/all/forwarding" };
        if host.sysctl(key).map(|s| s.trim() == "1").unwrap_or(false) {
            continue;
        }
        if let Err(e) = host.set_sysctl(key, "1") {
            log.warn(&format!("cannot enable forwarding ({}): {e}", sysctl_path(key)));
        }
    }
}

pub fn add(ctx: &Ctx<'_>, log: &mut Log) -> Result<String> {
    let senv = read_subnet_env(ctx.conf)?;
    let plan = Plan::new(ctx.conf, &senv)?;
    let path = ctx.require_netns()?;
    let ns = open_netns(path)?;
    plan.check_requested(ctx.conf)?;
    runtime()?.block_on(async {
        let host = connect()?;
        let pod = connect_in(&ns)?;
        add_with(ctx, &plan, &host, &Pod { kernel: &pod, ns: &ns, path }, log).await
    })
}

/// ADD once the namespaces are open; a failure undoes what was done.
async fn add_with<K: Kernel>(ctx: &Ctx<'_>, plan: &Plan, host: &K, pod: &Pod<'_, K>, log: &mut Log) -> Result<String> {
    if let Some(l) = pod.kernel.link_by_name(ctx.ifname).await? {
        // A DEL's reaper may still be deleting the old interface (it has no
        // addresses left by then): wait for it briefly.
        let global = |a: &flannel_shared::netlink::Address| !dataplane::is_link_local(a.net.addr());
        let reaping =
            l.kind.as_deref() == Some("veth") && !pod.kernel.addresses(Some(l.index)).await?.iter().any(global);
        let mut gone = false;
        if reaping {
            for _ in 0..400 {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                if pod.kernel.link_by_name(ctx.ifname).await?.is_none() {
                    gone = true;
                    break;
                }
            }
        }
        if !gone {
            return Err(CniError::new(
                code::INVALID_ENV,
                format!("interface {} already exists in {}", ctx.ifname, pod.path.display()),
            ));
        }
    }
    let mut undo = Undo::default();
    let res = wire(ctx, plan, host, pod, &mut undo, log).await;
    if res.is_err() {
        undo.run(ctx, host, log).await;
    }
    res
}

async fn wire<K: Kernel>(
    ctx: &Ctx<'_>,
    plan: &Plan,
    host: &K,
    pod: &Pod<'_, K>,
    undo: &mut Undo,
    log: &mut Log,
) -> Result<String> {
    let conf = ctx.conf;
    let fams = &plan.fams;
    // 1. Addresses, under host-local's lock. A saved state means this attachment
    // was ADDed before without a DEL: it gets the same addresses again.
    let readd = ctx.state_path().exists();
    let addrs: Vec<(IpNet, &Family)> = with_store(&conf.ipam_dir(), |t| {
        t.sweep_earlier_boot(conf, log)?;
        let mut addrs = Vec::new();
        for f in fams {
            let want = conf.requested_ips.iter().copied().find(|ip| ip.is_ipv4() == f.range.subnet.is_ipv4());
            let ip = t.allocate(&f.range, ctx.container_id, ctx.ifname, want, readd)?;
            undo.ips.push(ip);
            addrs.push((IpNet::new(ip, f.range.subnet.prefix()).expect("valid prefix"), f));
        }
        Ok(addrs)
    })?;
    log.info(&format!("allocated {:?}", addrs.iter().map(|(a, _)| a.to_string()).collect::<Vec<_>>()));

    // 2. The bridge, the veth pair, the pod side.
    let mtu = plan.mtu;
    let gateways: Vec<IpNet> = if conf.is_gateway { fams.iter().map(|f| f.gateway_net).collect() } else { Vec::new() };
    let spec = BridgeSpec { name: &conf.bridge, gateways: &gateways, mtu, promisc: conf.promisc };
    let bridge = dataplane::ensure_bridge(host, &spec, |m| log.warn(&m)).await?;
    if conf.is_gateway {
        enable_forwarding(host, fams, log);
    }
    let host_name = dataplane::host_veth_name(ctx.container_id, ctx.ifname);
    undo.host_veth = Some(host_name.clone());
    let host_link = dataplane::create_veth(host, &host_name, ctx.ifname, pod.ns, &bridge, mtu, conf.hairpin).await?;

    let route_specs = pod_routes(conf, fams);
    let mut kernel_routes = Vec::new();
    for r in &route_specs {
        let gw = r.gw.or_else(|| {
            conf.is_gateway
                .then(|| fams.iter().find(|f| f.range.subnet.is_ipv4() == r.dst.is_ipv4()).map(|f| f.range.gateway))?
        });
        let route = Route::new(r.dst);
        kernel_routes.push(match gw {
            Some(g) => route.via(g),
            None => route.scope_link(),
        });
    }
    let addr_list: Vec<IpNet> = addrs.iter().map(|(a, _)| *a).collect();
    let pod_link = dataplane::configure_pod(pod.kernel, ctx.ifname, &addr_list, &kernel_routes).await?;

    // 3. Per-pod masquerading when flanneld does not masquerade itself.
    let masq_with = masquerade(conf, None, || Some(plan.flannel_ipmasq));
    if let Some(mode) = masq_with {
        undo.masq = Some((mode, addr_list.iter().map(|a| a.addr()).collect()));
        pod_masq(&conf.name, ctx.container_id, ctx.ifname).setup(mode, &addr_list).map_err(|e| {
            CniError::new(code::IPTABLES_FAILURE, format!("failed to set up ipMasq with {mode}"))
                .with_details(e.to_string())
        })?;
    }

    // 4. State for DEL, then the result.
    let saved = state::Saved {
        cni_version: &conf.cni_version,
        name: &conf.name,
        kind: "bridge",
        bridge: &conf.bridge,
        mtu,
        ip_masq: masq_with.is_some(),
        ip_masq_backend: masq_with.map(|m| m.to_string()),
        is_gateway: conf.is_gateway,
        is_default_gateway: conf.is_default_gateway,
        hairpin_mode: conf.hairpin,
        force_address: conf.force_address,
        promisc_mode: conf.promisc,
        ipam: state::SavedIpam {
            kind: "host-local",
            data_dir: &conf.ipam_data_dir,
            ranges: fams.iter().map(|f| [state::SavedRange { subnet: f.range.subnet }]).collect(),
            routes: route_specs
                .iter()
                .filter(|r| !(conf.is_default_gateway && r.dst.prefix() == 0))
                .map(|r| state::SavedRoute { dst: r.dst, gw: r.gw })
                .collect(),
        },
        flannel: state::FlannelState {
            ifname: Some(ctx.ifname.to_string()),
            host_veth: Some(host_name.clone()),
            ips: addr_list.clone(),
        },
    };
    let spath = ctx.state_path();
    undo.state = Some(spath.clone());
    write_file_atomic(&spath, &state::to_bytes(&saved), false)
        .map_err(|e| io_err(format_args!("cannot save {}", spath.display()), e))?;

    let result = CniResult {
        interfaces: vec![
            Interface {
                name: bridge.name.clone(),
                mac: dataplane::mac_string(&bridge),
                mtu: Some(bridge.mtu),
                sandbox: None,
            },
            Interface {
                name: host_link.name.clone(),
                mac: dataplane::mac_string(&host_link),
                mtu: Some(mtu),
                sandbox: None,
            },
            Interface {
                name: pod_link.name.clone(),
                mac: dataplane::mac_string(&pod_link),
                mtu: Some(mtu),
                sandbox: Some(pod.path.display().to_string()),
            },
        ],
        ips: addrs
            .iter()
            .map(|(a, f)| IpConfig {
                address: *a,
                gateway: conf.is_gateway.then_some(f.range.gateway),
                interface: Some(2),
            })
            .collect(),
        routes: route_specs.iter().map(|r| RouteResult { dst: r.dst, gw: r.gw }).collect(),
        dns: conf.dns.clone(),
    };
    log.info(&format!("ADD done: {host_name} in {}, pod {}", conf.bridge, ctx.ifname));
    Ok(result.to_json(&conf.cni_version))
}

// ---- DEL ----

pub fn del(ctx: &Ctx<'_>, log: &mut Log) -> Result<()> {
    let ns = ctx.existing_netns();
    let sync = std::env::var_os("FLANNEL_CNI_SYNC_DEL").is_some();
    let (left, released) = runtime()?.block_on(async {
        let host = connect()?;
        let pod = ns.as_ref().map(connect_in).transpose()?;
        let (reap, released) = del_with(ctx, &host, pod.as_ref(), log).await?;
        if sync {
            reap.delete(&host, pod.as_ref()).await?;
            return Ok((None, released));
        }
        Ok::<_, CniError>((Some(reap), released))
    })?;
    // The runtime and its connections are gone: the process is single-threaded again.
    if let Some(reap) = left {
        reap.detach(ns, log)?;
    }
    log.info(&format!("DEL done: released {released:?}"));
    Ok(())
}

/// DEL but the veth itself: the pod's addresses first and synchronously
/// (cheap), so a freed address is never live on two pods, then the IPs, the
/// masquerade and the saved state. Deleting the veth costs the kernel 20-30
/// ms of RCU grace periods; the returned [`Reap`] does that after. Also
/// returns the freed IPs.
async fn del_with<K: Kernel>(ctx: &Ctx<'_>, host: &K, pod: Option<&K>, log: &mut Log) -> Result<(Reap, Vec<IpAddr>)> {
    let conf = ctx.conf;
    let saved = ctx.saved.as_ref();
    let ifname = saved.and_then(SavedState::ifname).unwrap_or(ctx.ifname).to_string();
    let host_name = dataplane::host_veth_name(ctx.container_id, &ifname);
    let mut reap = Reap::default();
    if let Some(pod) = pod
        && let Some(l) = pod.link_by_name(&ifname).await?
    {
        for a in pod.addresses(Some(l.index)).await? {
            pod.del_address(l.index, a.net).await.ignore_not_found()?;
        }
        reap.pod = Some(ifname.clone());
    }
    if host.link_by_name(&host_name).await?.is_some() {
        reap.host = Some(host_name);
    }

    // Addresses: by container ID + ifname, whether or not the state survived.
    let name = saved.and_then(|s| s.name.clone()).unwrap_or_else(|| conf.name.clone());
    let ipam_dir = saved.and_then(SavedState::ipam_data_dir).unwrap_or(&conf.ipam_data_dir).join(&name);
    let released = with_existing_store(&ipam_dir, |t| t.release(ctx.container_id, &ifname))?.unwrap_or_default();
    if let Some(mode) = masquerade(conf, saved, || flannel_ipmasq(conf)) {
        let mut ips = saved.map(SavedState::ips).unwrap_or_default();
        let known = ips.clone();
        ips.extend(released.iter().copied().filter(|ip| !known.contains(ip)));
        if let Err(e) = pod_masq(&name, ctx.container_id, &ifname).teardown(mode, &ips) {
            log.warn(&e.to_string());
        }
    }
    let spath = ctx.state_path();
    match fs::remove_file(&spath) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(format_args!("cannot remove {}", spath.display()), e)),
    }
    remove_state_temps(&spath);
    Ok((reap, released))
}

/// Removes temp files an ADD killed while saving this attachment's state left
/// beside it (`.<id>.tmp.<pid>`, see `write_file_atomic`): named after the
/// container, they are this attachment's, and its ADD is over once DEL runs.
fn remove_state_temps(spath: &Path) {
    let (Some(dir), Some(name)) = (spath.parent(), spath.file_name()) else { return };
    let prefix = format!(".{}.tmp.", name.to_string_lossy());
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_name().to_string_lossy().starts_with(&prefix) {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// Links a DEL still has to delete: either end removes the pair.
#[derive(Debug, Default, PartialEq, Eq)]
struct Reap {
    /// Host end of the veth, by name.
    host: Option<String>,
    /// The pod end, by name, when the pod namespace still had it.
    pod: Option<String>,
}

impl Reap {
    /// Deletes the pair with the command's own connections.
    async fn delete<K: Kernel>(&self, host: &K, pod: Option<&K>) -> Result<()> {
        if self.delete_host_end(host).await? {
            return Ok(());
        }
        match pod {
            Some(pod) => self.delete_pod_end(pod).await,
            None => Ok(()),
        }
    }

    /// Prefers the host end (no namespace hop); true when that removed the pair.
    async fn delete_host_end(&self, host: &impl Kernel) -> Result<bool> {
        let Some(name) = &self.host else { return Ok(false) };
        if let Some(l) = host.link_by_name(name).await? {
            match host.del_link(l.index).await {
                Ok(()) => return Ok(true),
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(false)
    }

    async fn delete_pod_end(&self, pod: &impl Kernel) -> Result<()> {
        let Some(ifname) = &self.pod else { return Ok(()) };
        if let Some(l) = pod.link_by_name(ifname).await? {
            pod.del_link(l.index).await.ignore_not_found()?;
        }
        Ok(())
    }

    /// Deletes the pair with connections of its own, each opened only when needed.
    async fn delete_connecting(&self, ns: Option<&File>) -> Result<()> {
        if self.host.is_some() && self.delete_host_end(&connect()?).await? {
            return Ok(());
        }
        if let (Some(_), Some(ns)) = (&self.pod, ns) {
            self.delete_pod_end(&connect_in(ns)?).await?;
        }
        Ok(())
    }

    /// Deletes the links in a detached child, so DEL returns without waiting
    /// for the kernel's teardown. Must be called with no other thread running
    /// (the child is a plain fork).
    fn detach(self, ns: Option<File>, log: &mut Log) -> Result<()> {
        if self.host.is_none() && self.pod.is_none() {
            return Ok(());
        }
        // SAFETY: single-threaded here (the runtime and the namespace threads are
        // gone), so the child may run ordinary code; it never returns into main.
        match unsafe { libc::fork() } {
            -1 => {
                log.warn("fork failed; deleting the veth synchronously");
                runtime()?.block_on(self.delete_connecting(ns.as_ref()))
            }
            0 => {
                // Child: leave the runtime's pipes (it waits for stdout to close),
                // do the work, exit without running the parent's cleanups.
                unsafe {
                    libc::setsid();
                    let devnull = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
                    if devnull >= 0 {
                        libc::dup2(devnull, 0);
                        libc::dup2(devnull, 1);
                        libc::dup2(devnull, 2);
                    }
                }
                let ok = runtime().map(|rt| rt.block_on(self.delete_connecting(ns.as_ref())).is_ok()).unwrap_or(false);
                unsafe { libc::_exit(if ok { 0 } else { 1 }) }
            }
            _ => Ok(()),
        }
    }
}

// ---- CHECK ----

pub fn check(ctx: &Ctx<'_>, log: &mut Log) -> Result<()> {
    let conf = ctx.conf;
    if !conf.version_at_least("0.4.0") {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!("CHECK needs cniVersion 0.4.0 or later, got {}", conf.cni_version),
        ));
    }
    let prev =
        conf.prev_result.as_ref().ok_or_else(|| CniError::new(code::INVALID_CONFIG, "CHECK needs prevResult"))?;
    let prev = CniResult::from_json(prev).map_err(|e| CniError::new(code::DECODE_FAILURE, e))?;
    let path = ctx.require_netns()?;
    let ns = open_netns(path)?;
    let mut drift: Vec<String> = Vec::new();

    check_store(ctx, &prev, &mut drift, log)?;
    runtime()?.block_on(async {
        let host = connect()?;
        let pod = connect_in(&ns)?;
        check_kernel(ctx, &prev, &host, &pod, &mut drift).await
    })?;

    // ipMasq: the bridge plugin's per-pod chain and its jump.
    let pod_ips = pod_ips(&prev);
    if let Some(mode) = masquerade(conf, ctx.saved.as_ref(), || flannel_ipmasq(conf)) {
        let addrs: Vec<IpNet> = pod_ips.iter().map(|ip| ip.address).collect();
        drift.extend(pod_masq(&conf.name, ctx.container_id, ctx.ifname).missing(mode, &addrs));
    }

    if drift.is_empty() {
        Ok(())
    } else {
        Err(CniError::new(code::CHECK_FAILED, format!("attachment {} has drifted", ctx.container_id))
            .with_details(drift.join("; ")))
    }
}

/// CHECK's store half: each address of the result is still recorded for this attachment.
fn check_store(ctx: &Ctx<'_>, prev: &CniResult, drift: &mut Vec<String>, log: &mut Log) -> Result<()> {
    let store_dir = ctx.conf.ipam_dir();
    let held = with_existing_store(&store_dir, |t| {
        t.sweep_earlier_boot(ctx.conf, log)?;
        t.find(ctx.container_id, ctx.ifname)
    })?;
    let Some(held) = held else {
        drift.push(format!("IPAM store {} is missing", store_dir.display()));
        return Ok(());
    };
    for ip in pod_ips(prev) {
        if !held.contains(&ip.address.addr()) {
            drift.push(format!("{} is not reserved for this container in {}", ip.address.addr(), store_dir.display()));
        }
    }
    Ok(())
}

/// The addresses of the previous result that belong to the pod's interface.
fn pod_ips(prev: &CniResult) -> Vec<&IpConfig> {
    prev.ips
        .iter()
        .filter(|ip| ip.interface.and_then(|i| prev.interfaces.get(i)).is_none_or(|i| i.sandbox.is_some()))
        .collect()
}

/// CHECK's kernel half: the pod interface, its addresses and routes; the
/// host veth's bridge membership and the gateway addresses.
async fn check_kernel<K: Kernel>(
    ctx: &Ctx<'_>,
    prev: &CniResult,
    host: &K,
    pod: &K,
    drift: &mut Vec<String>,
) -> Result<()> {
    let (conf, ifname) = (ctx.conf, ctx.ifname);
    let pod_ips = pod_ips(prev);
    // Pod side.
    match pod.link_by_name(ifname).await? {
        None => drift.push(format!("{ifname} is missing from the pod")),
        Some(link) => {
            if !link.up {
                drift.push(format!("{ifname} is down"));
            }
            if let Some(want) = prev.interfaces.iter().find(|i| i.name == ifname && i.sandbox.is_some())
                && !want.mac.is_empty()
                && !want.mac.eq_ignore_ascii_case(&dataplane::mac_string(&link))
            {
                drift.push(format!("{ifname} has MAC {}, expected {}", dataplane::mac_string(&link), want.mac));
            }
            let have = pod.addresses(Some(link.index)).await?;
            for ip in &pod_ips {
                if !have.iter().any(|a| a.net == ip.address) {
                    drift.push(format!("{ifname} lacks address {}", ip.address));
                }
            }
            let mut routes = pod.routes(true, Some(RT_TABLE_MAIN)).await?;
            routes.extend(pod.routes(false, Some(RT_TABLE_MAIN)).await?);
            for r in &prev.routes {
                let gw = r.gw.or_else(|| {
                    pod_ips.iter().find(|ip| ip.address.is_ipv4() == r.dst.is_ipv4()).and_then(|ip| ip.gateway)
                });
                let found = routes
                    .iter()
                    .any(|k| k.dst == r.dst && k.oif == Some(link.index) && (gw.is_none() || k.gateway == gw));
                if !found {
                    drift.push(format!(
                        "route {}{} is missing from the pod",
                        r.dst,
                        gw.map(|g| format!(" via {g}")).unwrap_or_default()
                    ));
                }
            }
        }
    }

    // Host side: the veth is still a port of the bridge, the bridge still has its gateway.
    match host.link_by_name(&conf.bridge).await? {
        None => drift.push(format!("bridge {} is missing", conf.bridge)),
        Some(br) => {
            let host_name = prev
                .interfaces
                .iter()
                .find(|i| i.sandbox.is_none() && i.name != conf.bridge)
                .map(|i| i.name.clone())
                .unwrap_or_else(|| dataplane::host_veth_name(ctx.container_id, ifname));
            match host.link_by_name(&host_name).await? {
                None => drift.push(format!("host veth {host_name} is missing")),
                Some(v) => {
                    if v.master != Some(br.index) {
                        drift.push(format!("{host_name} is not a port of {}", conf.bridge));
                    }
                    if !v.up {
                        drift.push(format!("{host_name} is down"));
                    }
                }
            }
            let have = host.addresses(Some(br.index)).await?;
            for ip in &pod_ips {
                if let Some(gw) = ip.gateway
                    && !have.iter().any(|a| a.net.addr() == gw)
                {
                    drift.push(format!("{} lacks gateway address {gw}", conf.bridge));
                }
            }
        }
    }
    Ok(())
}

// ---- STATUS ----

pub fn status(conf: &PluginConf, log: &mut Log) -> Result<()> {
    with_existing_store(&conf.ipam_dir(), |t| t.sweep_earlier_boot(conf, log))?;
    SubnetEnv::read(&conf.subnet_file).map(|_| ()).map_err(|e: SubnetEnvError| {
        let msg = if e.is_missing() {
            format!(
                "{} does not exist: flanneld is not running or has not leased a subnet yet",
                conf.subnet_file.display()
            )
        } else {
            format!("{} is unusable", conf.subnet_file.display())
        };
        CniError::new(code::NOT_AVAILABLE, msg).with_details(e.to_string())
    })
}

// ---- GC ----

pub fn gc(conf: &PluginConf, log: &mut Log) -> Result<()> {
    let valid = conf.valid_attachments.as_ref().ok_or_else(|| {
        CniError::new(code::INVALID_CONFIG, "GC needs cni.dev/valid-attachments (refusing to free every address)")
    })?;
    let is_valid =
        |id: &str, ifname: &str| valid.iter().any(|(v_id, v_if)| v_id == id && (ifname.is_empty() || v_if == ifname));
    let mut freed = Vec::new();
    let senv_ipmasq = std::cell::OnceCell::new();
    with_existing_store(&conf.ipam_dir(), |t| {
        for a in t.allocations()? {
            if is_valid(&a.container_id, &a.ifname) {
                continue;
            }
            t.release_ip(a.ip)?;
            let saved = state::load(&state_path(conf, &a.container_id));
            let ipmasq = || *senv_ipmasq.get_or_init(|| flannel_ipmasq(conf));
            if let Some(mode) = masquerade(conf, saved.as_ref(), ipmasq)
                && let Err(e) = pod_masq(&conf.name, &a.container_id, &a.ifname).teardown(mode, &[a.ip])
            {
                log.warn(&e.to_string());
            }
            freed.push(format!("{} ({})", a.ip, a.container_id));
        }
        Ok(())
    })?;
    // Saved state of attachments that no longer exist, for this network only.
    if let Ok(entries) = fs::read_dir(&conf.data_dir) {
        for e in entries.flatten() {
            let id = e.file_name().to_string_lossy().to_string();
            if valid.iter().any(|(v, _)| *v == id) {
                continue;
            }
            if let Some(s) = state::load(&e.path())
                && s.name.as_deref() == Some(conf.name.as_str())
            {
                let _ = fs::remove_file(e.path());
            }
        }
    }
    if !freed.is_empty() {
        log.warn(&format!("GC freed {}", freed.join(", ")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;
    use crate::kernel::fake::{self, FakeKernel};

    /// A scratch directory holding subnet.env, the store and the state.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(tag: &str) -> Scratch {
            let p = std::env::temp_dir().join(format!("flannel-cmd-{tag}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&p);
            fs::create_dir_all(&p).unwrap();
            Scratch(p)
        }

        fn subnet_env(&self, text: &str) -> &Self {
            fs::write(self.0.join("subnet.env"), text).unwrap();
            self
        }

        /// Upstream's conflist entry pointed at this directory, with `delegate` merged in.
        fn conf(&self, version: &str, delegate: Value) -> PluginConf {
            let mut d = json!({"hairpinMode": true, "isDefaultGateway": true, "ipMasq": false});
            d.as_object_mut().unwrap().extend(delegate.as_object().unwrap().clone());
            let c = json!({
                "cniVersion": version, "name": "cbr0", "type": "flannel",
                "subnetFile": self.0.join("subnet.env"), "dataDir": self.0.join("state"),
                "ipam": {"dataDir": self.0.join("ipam")}, "delegate": d,
            });
            PluginConf::parse(c.to_string().as_bytes(), &env("c1", Some("/x")), |_| {}).unwrap()
        }

        fn reserved(&self) -> Vec<String> {
            let mut v: Vec<String> = fs::read_dir(self.0.join("ipam/cbr0"))
                .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
                .unwrap_or_default();
            v.retain(|n| n.parse::<IpAddr>().is_ok());
            v.sort();
            v
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    const V4: &str =
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n";

    fn env(id: &str, netns: Option<&str>) -> Env {
        Env { container_id: id.into(), netns: netns.map(PathBuf::from), ifname: "eth0".into(), args: vec![] }
    }

    fn block_on<T>(f: impl Future<Output = T>) -> T {
        runtime().unwrap().block_on(f)
    }

    /// ADD against the fake kernel, from the point where the pod namespace is open.
    fn fake_add(ctx: &Ctx<'_>, host: &FakeKernel, pod: &FakeKernel) -> Result<Value> {
        let plan = Plan::new(ctx.conf, &read_subnet_env(ctx.conf)?)?;
        plan.check_requested(ctx.conf)?;
        // The fake ignores the namespace file; any open file does.
        let ns = File::open(&ctx.conf.subnet_file).unwrap();
        let path = ctx.require_netns()?;
        let out = block_on(add_with(ctx, &plan, host, &Pod { kernel: pod, ns: &ns, path }, &mut Log::default()))?;
        Ok(serde_json::from_str(&out).unwrap())
    }

    #[test]
    fn the_context_refuses_a_bad_environment_with_cni_codes() {
        let s = Scratch::new("ctx");
        let conf = s.conf("1.0.0", json!({}));
        let code_of = |cmd, env: &Env| Ctx::new(cmd, env, &conf).err().map(|e| e.code);
        // No CNI_NETNS: ADD and CHECK refuse (code 4), DEL goes ahead.
        for cmd in [Command::Add, Command::Check] {
            assert_eq!(code_of(cmd, &env("c1", None)), Some(code::INVALID_ENV), "{cmd:?}");
            assert_eq!(code_of(cmd, &env("c1", Some(""))), Some(code::INVALID_ENV), "{cmd:?}");
        }
        let del_env = env("c1", None);
        let ctx = Ctx::new(Command::Del, &del_env, &conf).unwrap();
        assert_eq!(ctx.netns, None);
        assert_eq!(ctx.require_netns().unwrap_err().code, code::INVALID_ENV);
        // A container ID that would leave the state directory, an ifname the kernel refuses.
        assert_eq!(code_of(Command::Del, &env("../etc", None)), Some(code::INVALID_ENV));
        assert_eq!(code_of(Command::Add, &env("", Some("/x"))), Some(code::INVALID_ENV));
        let mut long = env("c1", Some("/x"));
        long.ifname = "a-very-long-ifname".into();
        assert_eq!(code_of(Command::Add, &long), Some(code::INVALID_ENV));
        // The same from the real environment reader.
        let get = |vars: &'static [(&'static str, &'static str)]| {
            move |k: &str| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
        };
        let no_netns = get(&[("CNI_CONTAINERID", "c1"), ("CNI_IFNAME", "eth0")]);
        assert_eq!(Env::load(Command::Add, no_netns).unwrap_err().code, code::INVALID_ENV);
        assert_eq!(Env::load(Command::Check, no_netns).unwrap_err().code, code::INVALID_ENV);
        let e = Env::load(Command::Del, no_netns).unwrap();
        assert!(Ctx::new(Command::Del, &e, &conf).is_ok());
        let bad_args = get(&[("CNI_CONTAINERID", "c1"), ("CNI_IFNAME", "eth0"), ("CNI_ARGS", "IP")]);
        assert_eq!(Env::load(Command::Del, bad_args).unwrap_err().code, code::INVALID_ENV);

        // The netns itself, when ADD opens it: missing is 3, not a namespace is 4.
        s.subnet_env(V4);
        let missing = env("c1", Some("/nonexistent/netns"));
        let e = add(&Ctx::new(Command::Add, &missing, &conf).unwrap(), &mut Log::default()).unwrap_err();
        assert_eq!(e.code, code::UNKNOWN_CONTAINER, "{e}");
        let file = env("c1", Some(s.0.join("subnet.env").to_str().unwrap()));
        let e = add(&Ctx::new(Command::Add, &file, &conf).unwrap(), &mut Log::default()).unwrap_err();
        assert_eq!((e.code, e.msg.contains("is not a network namespace")), (code::INVALID_ENV, true), "{e}");
        // ... but subnet.env is judged first, as before.
        fs::remove_file(s.0.join("subnet.env")).unwrap();
        let e = add(&Ctx::new(Command::Add, &missing, &conf).unwrap(), &mut Log::default()).unwrap_err();
        assert_eq!(e.code, code::TRY_AGAIN_LATER, "{e}");
    }

    /// ipMasq and its backend: saved state, then configuration, then
    /// `!FLANNEL_IPMASQ`, then off; subnet.env and the host default consulted
    /// only when needed.
    #[test]
    fn one_masquerade_rule_for_every_command() {
        use MasqMode::{Iptables, Nftables};
        let s = Scratch::new("masq");
        let conf_with = |delegate: Value| s.conf("1.0.0", delegate);
        let saved = |text: &str| serde_json::from_str::<SavedState>(text).unwrap();
        let none = json!({"ipMasq": null});
        let (on, off) = (json!({"ipMasq": true}), json!({"ipMasq": false}));
        let (ours, upstreams) = (saved(r#"{"ipMasq":true,"ipMasqBackend":"nftables"}"#), saved(r#"{"ipMasq":false}"#));
        let silent = saved(r#"{"name":"cbr0"}"#);
        // (configuration, saved state, FLANNEL_IPMASQ) -> decision
        type Row<'a> = (Value, Option<&'a SavedState>, Option<bool>, Option<MasqMode>);
        let table: Vec<Row> = vec![
            // Upstream's default: the plugin masquerades exactly when flanneld does not.
            (none.clone(), None, Some(true), None),
            (none.clone(), None, Some(false), Some(Iptables)),
            (none.clone(), None, None, None),
            // The configuration beats subnet.env.
            (on.clone(), None, Some(true), Some(Iptables)),
            (off.clone(), None, Some(false), None),
            (json!({"ipMasq": true, "ipMasqBackend": "nftables"}), None, None, Some(Nftables)),
            // The saved state beats both, backend included.
            (off.clone(), Some(&ours), Some(true), Some(Nftables)),
            (json!({"ipMasq": false, "ipMasqBackend": "iptables"}), Some(&ours), None, Some(Nftables)),
            (on.clone(), Some(&upstreams), Some(false), None),
            // A saved state that does not say falls through.
            (on.clone(), Some(&silent), Some(true), Some(Iptables)),
            (none.clone(), Some(&silent), Some(false), Some(Iptables)),
            (json!({"ipMasq": null, "ipMasqBackend": "nftables"}), Some(&silent), Some(false), Some(Nftables)),
        ];
        for (i, (delegate, saved, senv, want)) in table.into_iter().enumerate() {
            let conf = conf_with(delegate);
            let (read_senv, asked_default) = (std::cell::Cell::new(0), std::cell::Cell::new(0));
            let got = decide_masquerade(
                &conf,
                saved,
                || {
                    read_senv.set(read_senv.get() + 1);
                    senv
                },
                || {
                    asked_default.set(asked_default.get() + 1);
                    Iptables
                },
            );
            assert_eq!(got, want, "row {i}");
            let decided_before_senv = saved.and_then(|s| s.ip_masq).or(conf.ip_masq).is_some();
            assert_eq!(read_senv.get(), usize::from(!decided_before_senv), "row {i}: subnet.env read");
            let backend_named = saved.and_then(SavedState::ip_masq_backend).or(conf.ip_masq_backend).is_some();
            assert_eq!(asked_default.get(), usize::from(want.is_some() && !backend_named), "row {i}: host default");
        }
    }

    #[test]
    fn the_context_carries_the_saved_state_for_del_and_check() {
        let s = Scratch::new("saved");
        let conf = s.conf("1.0.0", json!({}));
        let state = s.0.join("state/c1");
        fs::create_dir_all(state.parent().unwrap()).unwrap();
        fs::write(&state, r#"{"name":"cbr0","ipMasq":true,"flannel":{"ifname":"net1","ips":["10.244.1.7/24"]}}"#)
            .unwrap();
        let e = env("c1", Some("/x"));
        for cmd in [Command::Del, Command::Check] {
            let ctx = Ctx::new(cmd, &e, &conf).unwrap();
            let saved = ctx.saved.as_ref().expect("saved state");
            assert_eq!((saved.ifname(), saved.ip_masq), (Some("net1"), Some(true)), "{cmd:?}");
        }
        assert!(Ctx::new(Command::Add, &e, &conf).unwrap().saved.is_none());
        assert!(Ctx::new(Command::Del, &env("c2", None), &conf).unwrap().saved.is_none());
    }

    /// ADD, CHECK and DEL of one pod, all against the fake kernel: what each
    /// leaves in the kernel, the store and the state directory, and the result.
    #[test]
    fn add_check_del_against_the_fake_kernel() {
        let s = Scratch::new("flow");
        s.subnet_env(V4);
        let conf = s.conf("1.0.0", json!({}));
        let (host, pod) = fake::pair();
        let e = env("c1", Some("/run/netns/p1"));
        let ctx = Ctx::new(Command::Add, &e, &conf).unwrap();
        let res = fake_add(&ctx, &host, &pod).unwrap();

        let veth = dataplane::host_veth_name("c1", "eth0");
        let (bridge, host_end) = host.with(|n| (n.link("cni0").cloned().unwrap(), n.link(&veth).cloned().unwrap()));
        assert_eq!((bridge.up, bridge.mtu, bridge.mac), (true, 1450, Some([0x0a, 0x58, 10, 244, 1, 1])));
        assert_eq!(host.with(|n| n.addresses_of("cni0")), ["10.244.1.1/24"]);
        assert_eq!(host.sysctl("net/ipv4/ip_forward").unwrap(), "1");
        assert_eq!((host_end.master, host_end.up, host_end.hairpin), (Some(bridge.index), true, Some(true)));
        let eth0 = pod.with(|n| n.link("eth0").cloned().unwrap());
        assert!(eth0.up && pod.with(|n| n.link("lo").unwrap().up));
        assert_eq!(pod.with(|n| n.addresses_of("eth0")), ["10.244.1.2/24"]);
        assert_eq!(
            pod.with(|n| n.route_lines()),
            ["0.0.0.0/0 via 10.244.1.1 dev eth0", "10.244.0.0/16 via 10.244.1.1 dev eth0"]
        );
        assert_eq!(s.reserved(), ["10.244.1.2"]);
        assert_eq!(fs::read_to_string(s.0.join("ipam/cbr0/10.244.1.2")).unwrap(), "c1\r\neth0");
        let saved = state::load(&s.0.join("state/c1")).expect("state saved");
        assert_eq!(
            (saved.ifname(), saved.ip_masq, saved.ips()),
            (Some("eth0"), Some(false), vec!["10.244.1.2".parse::<IpAddr>().unwrap()])
        );

        // The result: bridge, host veth, pod interface in its sandbox, the address on it.
        assert_eq!(res["cniVersion"], "1.0.0");
        let names: Vec<&str> =
            res["interfaces"].as_array().unwrap().iter().map(|i| i["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["cni0", veth.as_str(), "eth0"]);
        assert_eq!(res["interfaces"][0]["mac"], "0a:58:0a:f4:01:01");
        assert_eq!(res["interfaces"][2]["sandbox"], "/run/netns/p1");
        assert_eq!(res["interfaces"][2]["mac"], dataplane::mac_string(&eth0));
        assert_eq!(res["ips"], json!([{"address": "10.244.1.2/24", "gateway": "10.244.1.1", "interface": 2}]));
        assert_eq!(res["routes"], json!([{"dst": "10.244.0.0/16"}, {"dst": "0.0.0.0/0", "gw": "10.244.1.1"}]));

        // The same interface name again in that pod: refused, nothing reserved.
        let e2 = env("c2", Some("/run/netns/p1"));
        let err = fake_add(&Ctx::new(Command::Add, &e2, &conf).unwrap(), &host, &pod).unwrap_err();
        assert_eq!(err.code, code::INVALID_ENV, "{err}");
        assert_eq!(s.reserved(), ["10.244.1.2"]);

        // CHECK with that result finds nothing wrong, then a missing route.
        let mut check_conf = conf.clone();
        check_conf.prev_result = Some(res.clone());
        let ctx = Ctx::new(Command::Check, &e, &check_conf).unwrap();
        let prev = CniResult::from_json(check_conf.prev_result.as_ref().unwrap()).unwrap();
        let mut drift = Vec::new();
        check_store(&ctx, &prev, &mut drift, &mut Log::default()).unwrap();
        block_on(check_kernel(&ctx, &prev, &host, &pod, &mut drift)).unwrap();
        assert!(drift.is_empty(), "{drift:?}");
        pod.tamper(|n| n.routes.retain(|r| r.dst.prefix() != 0));
        host.tamper(|n| n.links.iter_mut().filter(|l| l.name == veth).for_each(|l| l.master = None));
        block_on(check_kernel(&ctx, &prev, &host, &pod, &mut drift)).unwrap();
        assert_eq!(
            drift,
            [
                "route 0.0.0.0/0 via 10.244.1.1 is missing from the pod".to_string(),
                format!("{veth} is not a port of cni0"),
            ]
        );

        // DEL: the pod's addresses, the reservation and the state go at once;
        // the veth is left to the reaper, which takes both ends.
        let ctx = Ctx::new(Command::Del, &e, &conf).unwrap();
        let (reap, released) = block_on(del_with(&ctx, &host, Some(&pod), &mut Log::default())).unwrap();
        assert_eq!(released, ["10.244.1.2".parse::<IpAddr>().unwrap()]);
        assert_eq!(reap, Reap { host: Some(veth.clone()), pod: Some("eth0".into()) });
        assert!(pod.with(|n| n.addresses_of("eth0")).is_empty());
        assert!(s.reserved().is_empty() && !s.0.join("state/c1").exists());
        block_on(reap.delete(&host, Some(&pod))).unwrap();
        assert!(host.with(|n| n.link(&veth).is_none()) && pod.with(|n| n.link("eth0").is_none()));
        assert!(host.with(|n| n.link("cni0").is_some()), "the bridge stays");

        // DEL again, state and pod gone: nothing to do, no error.
        let ctx = Ctx::new(Command::Del, &e, &conf).unwrap();
        let (reap, released) = block_on(del_with(&ctx, &host, None, &mut Log::default())).unwrap();
        assert_eq!((reap, released), (Reap::default(), vec![]));
    }

    /// A failure late in ADD (a route whose gateway is not on-link) undoes
    /// the veth, the reservation and the state.
    #[test]
    fn a_failed_add_rolls_back_against_the_fake_kernel() {
        let s = Scratch::new("undo");
        s.subnet_env(V4);
        let mut conf = s.conf("0.3.1", json!({}));
        conf.ipam_routes =
            vec![RouteSpec { dst: "192.0.2.0/24".parse().unwrap(), gw: Some("198.51.100.1".parse().unwrap()) }];
        let (host, pod) = fake::pair();
        let e = env("c1", Some("/run/netns/p1"));
        let err = fake_add(&Ctx::new(Command::Add, &e, &conf).unwrap(), &host, &pod).unwrap_err();
        assert_eq!(err.code, code::KERNEL_FAILURE, "{err}");
        assert!(host.with(|n| n.links.iter().all(|l| l.kind.as_deref() != Some("veth"))));
        assert!(pod.with(|n| n.link("eth0").is_none()));
        assert!(s.reserved().is_empty());
        assert!(!s.0.join("state/c1").exists());
    }

    #[test]
    fn dual_stack_add_against_the_fake_kernel() {
        let s = Scratch::new("dual");
        s.subnet_env(&format!("{V4}FLANNEL_IPV6_NETWORK=fd00:10::/56\nFLANNEL_IPV6_SUBNET=fd00:10:0:1::1/64\n"));
        let conf = s.conf("1.1.0", json!({}));
        let (host, pod) = fake::pair();
        let e = env("c1", Some("/run/netns/p1"));
        let res = fake_add(&Ctx::new(Command::Add, &e, &conf).unwrap(), &host, &pod).unwrap();
        assert_eq!(pod.with(|n| n.addresses_of("eth0")), ["10.244.1.2/24", "fd00:10:0:1::2/64"]);
        assert_eq!(host.with(|n| n.addresses_of("cni0")), ["10.244.1.1/24", "fd00:10:0:1::1/64"]);
        assert_eq!(host.sysctl("net/ipv6/conf/all/forwarding").unwrap(), "1");
        assert_eq!(host.sysctl("net/ipv6/conf/cni0/accept_dad").unwrap(), "0");
        assert_eq!(res["ips"][1]["gateway"], "fd00:10:0:1::1");
        assert_eq!(res["interfaces"][2]["mtu"], 1450);
        assert!(res["routes"].as_array().unwrap().contains(&json!({"dst": "::/0", "gw": "fd00:10:0:1::1"})), "{res}");
    }
}
