//! ADD, DEL, CHECK, STATUS and GC.

use std::fs::{self, File};
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use flannel_shared::IpNet;
use flannel_shared::firewall::{Mode as MasqMode, PodMasq};
use flannel_shared::netlink::{Idempotent, Netlink, Route};
use flannel_shared::netns;
use flannel_shared::subnet_env::{SubnetEnv, SubnetEnvError, write_file_atomic};

use crate::conf::{Env, PluginConf, RouteSpec};
use crate::dataplane::{self, BridgeSpec};
use crate::error::{CniError, Result, code, io_err};
use crate::ipam::{self, IpamError, Locked, Range, Store};
use crate::log::Log;
use crate::result::{CniResult, Interface, IpConfig, RouteResult};
use crate::state;

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(|e| io_err("cannot start the async runtime", e))
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

fn ipam_err(e: IpamError) -> CniError {
    match e {
        IpamError::Exhausted(..) => CniError::new(code::NO_ADDRESSES, e.to_string()),
        IpamError::Taken { .. } => CniError::new(code::NO_ADDRESSES, e.to_string()),
        IpamError::NotInRange { .. } => CniError::new(code::INVALID_CONFIG, e.to_string()),
        IpamError::Io { .. } => CniError::new(code::IO_FAILURE, e.to_string()),
    }
}

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

/// How an attachment's masquerade is written: as its ADD recorded, else as the
/// configuration asks, else the host's default.
fn masq_mode(conf: &PluginConf, saved: Option<&state::SavedState>) -> MasqMode {
    saved.and_then(state::SavedState::ip_masq_backend).or(conf.ip_masq_backend).unwrap_or_else(MasqMode::host_default)
}

fn pod_masq<'a>(network: &'a str, container_id: &'a str, ifname: &'a str) -> PodMasq<'a> {
    PodMasq { network, container_id, ifname }
}

fn state_path(conf: &PluginConf, container_id: &str) -> PathBuf {
    state::path(&conf.data_dir, container_id)
}

/// After a reboot, frees what the earlier boot reserved (see
/// [`Store::sweep_earlier_boot`]) and those attachments' saved state, and says so.
/// A host whose boot id cannot be read keeps every reservation.
fn sweep_earlier_boot(conf: &PluginConf, store: &Store, guard: &Locked<'_>, log: &mut Log) -> Result<()> {
    let boot = match ipam::current_boot_id() {
        Ok(b) => b,
        Err(e) => {
            log.warn(&format!("cannot tell which boot this is, so reservations of earlier boots stay: {e}"));
            return Ok(());
        }
    };
    let Some((old, freed)) = store.sweep_earlier_boot(guard, &boot).map_err(ipam_err)? else { return Ok(()) };
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
    async fn run(self, conf: &PluginConf, env: &Env, host: Option<&Netlink>, log: &mut Log) {
        if let (Some(name), Some(nl)) = (&self.host_veth, host)
            && let Ok(Some(l)) = nl.link_by_name(name).await
            && let Err(e) = nl.del_link(l.index).await
        {
            log.error(&format!("rollback: cannot delete {name}: {e}"));
        }
        if let Some((mode, ips)) = &self.masq
            && let Err(e) = pod_masq(&conf.name, env.container_id.as_str(), &env.ifname).teardown(*mode, ips)
        {
            log.error(&format!("rollback: {e}"));
        }
        if !self.ips.is_empty() {
            let released = Store::open(&conf.ipam_dir()).and_then(|s| {
                let g = s.lock()?;
                for ip in &self.ips {
                    s.release_ip(&g, *ip)?;
                }
                Ok(())
            });
            if let Err(e) = released {
                log.error(&format!("rollback: cannot free {:?}: {e}", self.ips));
            }
        }
        if let Some(p) = self.state {
            let _ = fs::remove_file(p);
        }
    }
}

fn enable_forwarding(fams: &[Family], log: &mut Log) {
    for f in fams {
        let path = if f.network.is_ipv4() {
            "/proc/sys/net/ipv4/ip_forward"
        } else {
            "/proc/sys/net/ipv6/conf/all/forwarding"
        };
        if fs::read_to_string(path).map(|s| s.trim() == "1").unwrap_or(false) {
            continue;
        }
        if let Err(e) = fs::write(path, "1") {
            log.warn(&format!("cannot enable forwarding ({path}): {e}"));
        }
    }
}

pub fn add(env: &Env, conf: &PluginConf, log: &mut Log) -> Result<String> {
    let senv = read_subnet_env(conf)?;
    let fams = families(&senv)?;
    let mtu = conf.mtu.unwrap_or(senv.mtu);
    let ip_masq = conf.ip_masq.unwrap_or(!senv.ipmasq);
    let netns_path = env.netns.as_ref().expect("CNI_NETNS checked for ADD");
    let ns = open_netns(netns_path)?;
    for ip in &conf.requested_ips {
        if !fams.iter().any(|f| f.range.subnet.is_ipv4() == ip.is_ipv4()) {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                format!("requested IP {ip}: the node has no subnet of that family"),
            ));
        }
    }
    let rt = runtime()?;
    rt.block_on(async {
        let host = Netlink::connect().map_err(|e| io_err("netlink", e))?;
        let pod = Netlink::connect_in(&ns).map_err(|e| io_err("netlink in the pod namespace", e))?;
        if let Some(l) = pod.link_by_name(&env.ifname).await? {
            // A DEL's reaper may still be deleting the old interface (it has no
            // addresses left by then): wait for it briefly.
            let global = |a: &flannel_shared::netlink::Address| !a.net.addr().to_string().starts_with("fe80:");
            let reaping = l.kind.as_deref() == Some("veth") && !pod.addresses(Some(l.index)).await?.iter().any(global);
            let mut gone = false;
            if reaping {
                for _ in 0..400 {
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                    if pod.link_by_name(&env.ifname).await?.is_none() {
                        gone = true;
                        break;
                    }
                }
            }
            if !gone {
                return Err(CniError::new(
                    code::INVALID_ENV,
                    format!("interface {} already exists in {}", env.ifname, netns_path.display()),
                ));
            }
        }
        let mut undo = Undo::default();
        let res = add_inner(env, conf, &fams, mtu, ip_masq, &host, &pod, &ns, &mut undo, log).await;
        if res.is_err() {
            undo.run(conf, env, Some(&host), log).await;
        }
        res
    })
}

#[allow(clippy::too_many_arguments)]
async fn add_inner(
    env: &Env,
    conf: &PluginConf,
    fams: &[Family],
    mtu: u32,
    ip_masq: bool,
    host: &Netlink,
    pod: &Netlink,
    ns: &File,
    undo: &mut Undo,
    log: &mut Log,
) -> Result<String> {
    // 1. Addresses, under host-local's lock. A saved state means this attachment
    // was ADDed before without a DEL: it gets the same addresses again.
    let readd = state_path(conf, &env.container_id).exists();
    let mut addrs: Vec<(IpNet, &Family)> = Vec::new();
    {
        let store = Store::open(&conf.ipam_dir()).map_err(ipam_err)?;
        let guard = store.lock().map_err(ipam_err)?;
        sweep_earlier_boot(conf, &store, &guard, log)?;
        for f in fams {
            let want = conf.requested_ips.iter().copied().find(|ip| ip.is_ipv4() == f.range.subnet.is_ipv4());
            let ip = store.allocate(&guard, &f.range, &env.container_id, &env.ifname, want, readd).map_err(ipam_err)?;
            undo.ips.push(ip);
            addrs.push((IpNet::new(ip, f.range.subnet.prefix()).expect("valid prefix"), f));
        }
    }
    log.info(&format!("allocated {:?}", addrs.iter().map(|(a, _)| a.to_string()).collect::<Vec<_>>()));

    // 2. The bridge, the veth pair, the pod side.
    let gateways: Vec<IpNet> = if conf.is_gateway { fams.iter().map(|f| f.gateway_net).collect() } else { Vec::new() };
    let spec = BridgeSpec { name: &conf.bridge, gateways: &gateways, mtu, promisc: conf.promisc };
    let bridge = dataplane::ensure_bridge(host, &spec, |m| log.warn(&m)).await?;
    if conf.is_gateway {
        enable_forwarding(fams, log);
    }
    let host_name = dataplane::host_veth_name(&env.container_id, &env.ifname);
    undo.host_veth = Some(host_name.clone());
    let host_link = dataplane::create_veth(host, &host_name, &env.ifname, ns, &bridge, mtu, conf.hairpin).await?;

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
    let pod_link = dataplane::configure_pod(pod, &env.ifname, &addr_list, &kernel_routes).await?;

    // 3. Per-pod masquerading when flanneld does not masquerade itself.
    let masq_with = ip_masq.then(|| masq_mode(conf, None));
    if let Some(mode) = masq_with {
        undo.masq = Some((mode, addr_list.iter().map(|a| a.addr()).collect()));
        pod_masq(&conf.name, &env.container_id, &env.ifname).setup(mode, &addr_list).map_err(|e| {
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
        ip_masq,
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
            ifname: Some(env.ifname.clone()),
            host_veth: Some(host_name.clone()),
            ips: addr_list.clone(),
        },
    };
    let spath = state_path(conf, &env.container_id);
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
                sandbox: env.netns.as_ref().map(|p| p.display().to_string()),
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
    log.info(&format!("ADD done: {host_name} in {}, pod {}", conf.bridge, env.ifname));
    Ok(result.to_json(&conf.cni_version))
}

pub fn del(env: &Env, conf: &PluginConf, log: &mut Log) -> Result<()> {
    let spath = state_path(conf, &env.container_id);
    let saved = state::load(&spath).unwrap_or_default();
    let ifname = saved.ifname().map_or_else(|| env.ifname.clone(), String::from);
    // The pod's addresses go first and synchronously (cheap), so a freed
    // address is never live on two pods. Deleting the veth itself costs the
    // kernel 20-30 ms of RCU grace periods; that runs in a detached reaper
    // after the addresses are freed (see `reap`).
    let host_name = dataplane::host_veth_name(&env.container_id, &ifname);
    let rt = runtime()?;
    let mut reap = rt.block_on(async {
        let host = Netlink::connect().map_err(|e| io_err("netlink", e))?;
        let mut reap = Reap::default();
        if let Some(path) = &env.netns
            && let Ok(ns) = netns::open(path)
            && netns::is_netns(&ns)
        {
            let pod = Netlink::connect_in(&ns).map_err(|e| io_err("netlink in the pod namespace", e))?;
            if let Some(l) = pod.link_by_name(&ifname).await? {
                for a in pod.addresses(Some(l.index)).await? {
                    pod.del_address(l.index, a.net).await.ignore_not_found()?;
                }
                reap.pod = Some((ns, ifname.clone()));
            }
        }
        if host.link_by_name(&host_name).await?.is_some() {
            reap.host = Some(host_name.clone());
        }
        Ok::<Reap, CniError>(reap)
    })?;
    drop(rt);
    if std::env::var_os("FLANNEL_CNI_SYNC_DEL").is_some() {
        reap.sync = true;
    }

    // Addresses: by container ID + ifname, whether or not the state survived.
    let name = saved.name.clone().unwrap_or_else(|| conf.name.clone());
    let ipam_dir = saved.ipam_data_dir().unwrap_or(&conf.ipam_data_dir).join(&name);
    let mut released = Vec::new();
    if ipam_dir.is_dir() {
        let store = Store::open(&ipam_dir).map_err(ipam_err)?;
        let guard = store.lock().map_err(ipam_err)?;
        released = store.release(&guard, &env.container_id, &ifname).map_err(ipam_err)?;
    }
    let ip_masq = saved
        .ip_masq
        .or(conf.ip_masq)
        .or_else(|| SubnetEnv::read(&conf.subnet_file).ok().map(|s| !s.ipmasq))
        .unwrap_or(false);
    if ip_masq {
        let mut ips = saved.ips();
        let known = ips.clone();
        ips.extend(released.iter().copied().filter(|ip| !known.contains(ip)));
        if let Err(e) = pod_masq(&name, &env.container_id, &ifname).teardown(masq_mode(conf, Some(&saved)), &ips) {
            log.warn(&e.to_string());
        }
    }
    match fs::remove_file(&spath) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(format_args!("cannot remove {}", spath.display()), e)),
    }
    remove_state_temps(&spath);
    reap.run(log)?;
    log.info(&format!("DEL done: released {released:?}"));
    Ok(())
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

/// Links a DEL still has to delete.
#[derive(Default)]
struct Reap {
    /// Host end of the veth, by name, in this namespace.
    host: Option<String>,
    /// The pod end, when the pod namespace still exists.
    pod: Option<(File, String)>,
    /// Delete before returning instead of in a detached child.
    sync: bool,
}

impl Reap {
    async fn delete(&self) -> Result<()> {
        // Deleting either end removes the pair; prefer the host end (no namespace hop).
        if let Some(name) = &self.host {
            let host = Netlink::connect().map_err(|e| io_err("netlink", e))?;
            if let Some(l) = host.link_by_name(name).await? {
                match host.del_link(l.index).await {
                    Ok(()) => return Ok(()),
                    Err(e) if e.is_not_found() => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        if let Some((ns, ifname)) = &self.pod {
            let pod = Netlink::connect_in(ns).map_err(|e| io_err("netlink in the pod namespace", e))?;
            if let Some(l) = pod.link_by_name(ifname).await? {
                pod.del_link(l.index).await.ignore_not_found()?;
            }
        }
        Ok(())
    }

    /// Deletes the links: synchronously when asked, else in a detached child
    /// so DEL returns without waiting for the kernel's teardown. Must be called
    /// with no other thread running (the child is a plain fork).
    fn run(self, log: &mut Log) -> Result<()> {
        if self.host.is_none() && self.pod.is_none() {
            return Ok(());
        }
        if self.sync {
            return runtime()?.block_on(self.delete());
        }
        // SAFETY: single-threaded here (the runtime and the namespace threads are
        // gone), so the child may run ordinary code; it never returns into main.
        match unsafe { libc::fork() } {
            -1 => {
                log.warn("fork failed; deleting the veth synchronously");
                runtime()?.block_on(self.delete())
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
                let ok = runtime().map(|rt| rt.block_on(self.delete()).is_ok()).unwrap_or(false);
                unsafe { libc::_exit(if ok { 0 } else { 1 }) }
            }
            _ => Ok(()),
        }
    }
}

pub fn check(env: &Env, conf: &PluginConf, log: &mut Log) -> Result<()> {
    if !conf.version_at_least("0.4.0") {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!("CHECK needs cniVersion 0.4.0 or later, got {}", conf.cni_version),
        ));
    }
    let prev =
        conf.prev_result.as_ref().ok_or_else(|| CniError::new(code::INVALID_CONFIG, "CHECK needs prevResult"))?;
    let prev = CniResult::from_json(prev).map_err(|e| CniError::new(code::DECODE_FAILURE, e))?;
    let ns = open_netns(env.netns.as_ref().expect("CNI_NETNS checked for CHECK"))?;
    let mut drift: Vec<String> = Vec::new();

    // IPAM: each address still recorded for this attachment.
    let pod_ips: Vec<&IpConfig> = prev
        .ips
        .iter()
        .filter(|ip| ip.interface.and_then(|i| prev.interfaces.get(i)).is_none_or(|i| i.sandbox.is_some()))
        .collect();
    let store_dir = conf.ipam_dir();
    if store_dir.is_dir() {
        let store = Store::open(&store_dir).map_err(ipam_err)?;
        let guard = store.lock().map_err(ipam_err)?;
        sweep_earlier_boot(conf, &store, &guard, log)?;
        let held = store.find(&guard, &env.container_id, &env.ifname).map_err(ipam_err)?;
        for ip in &pod_ips {
            if !held.contains(&ip.address.addr()) {
                drift.push(format!(
                    "{} is not reserved for this container in {}",
                    ip.address.addr(),
                    store_dir.display()
                ));
            }
        }
    } else {
        drift.push(format!("IPAM store {} is missing", store_dir.display()));
    }

    let rt = runtime()?;
    rt.block_on(async {
        let host = Netlink::connect().map_err(|e| io_err("netlink", e))?;
        let pod = Netlink::connect_in(&ns).map_err(|e| io_err("netlink in the pod namespace", e))?;

        // Pod side.
        match pod.link_by_name(&env.ifname).await? {
            None => drift.push(format!("{} is missing from the pod", env.ifname)),
            Some(link) => {
                if !link.up {
                    drift.push(format!("{} is down", env.ifname));
                }
                if let Some(want) = prev.interfaces.iter().find(|i| i.name == env.ifname && i.sandbox.is_some())
                    && !want.mac.is_empty()
                    && !want.mac.eq_ignore_ascii_case(&dataplane::mac_string(&link))
                {
                    drift.push(format!(
                        "{} has MAC {}, expected {}",
                        env.ifname,
                        dataplane::mac_string(&link),
                        want.mac
                    ));
                }
                let have = pod.addresses(Some(link.index)).await?;
                for ip in &pod_ips {
                    if !have.iter().any(|a| a.net == ip.address) {
                        drift.push(format!("{} lacks address {}", env.ifname, ip.address));
                    }
                }
                let mut routes = pod.routes(true, Some(flannel_shared::netlink::RT_TABLE_MAIN)).await?;
                routes.extend(pod.routes(false, Some(flannel_shared::netlink::RT_TABLE_MAIN)).await?);
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
                    .unwrap_or_else(|| dataplane::host_veth_name(&env.container_id, &env.ifname));
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
        Ok::<(), CniError>(())
    })?;

    // ipMasq: the bridge plugin's per-pod chain and its jump.
    let ip_masq = conf.ip_masq.or_else(|| SubnetEnv::read(&conf.subnet_file).ok().map(|s| !s.ipmasq)).unwrap_or(false);
    if ip_masq {
        let saved = state::load(&state_path(conf, &env.container_id));
        let mode = masq_mode(conf, saved.as_ref());
        let addrs: Vec<IpNet> = pod_ips.iter().map(|ip| ip.address).collect();
        drift.extend(pod_masq(&conf.name, &env.container_id, &env.ifname).missing(mode, &addrs));
    }

    if drift.is_empty() {
        Ok(())
    } else {
        Err(CniError::new(code::CHECK_FAILED, format!("attachment {} has drifted", env.container_id))
            .with_details(drift.join("; ")))
    }
}

pub fn status(conf: &PluginConf, log: &mut Log) -> Result<()> {
    let store_dir = conf.ipam_dir();
    if store_dir.is_dir() {
        let store = Store::open(&store_dir).map_err(ipam_err)?;
        let guard = store.lock().map_err(ipam_err)?;
        sweep_earlier_boot(conf, &store, &guard, log)?;
    }
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

pub fn gc(conf: &PluginConf, log: &mut Log) -> Result<()> {
    let valid = conf.valid_attachments.as_ref().ok_or_else(|| {
        CniError::new(code::INVALID_CONFIG, "GC needs cni.dev/valid-attachments (refusing to free every address)")
    })?;
    let is_valid =
        |id: &str, ifname: &str| valid.iter().any(|(v_id, v_if)| v_id == id && (ifname.is_empty() || v_if == ifname));
    let store_dir = conf.ipam_dir();
    let mut freed = Vec::new();
    if store_dir.is_dir() {
        let store = Store::open(&store_dir).map_err(ipam_err)?;
        let guard = store.lock().map_err(ipam_err)?;
        for a in store.allocations(&guard).map_err(ipam_err)? {
            if is_valid(&a.container_id, &a.ifname) {
                continue;
            }
            store.release_ip(&guard, a.ip).map_err(ipam_err)?;
            let saved = state::load(&state_path(conf, &a.container_id));
            if let Some(s) = saved.filter(|s| s.ip_masq.unwrap_or(false)) {
                let mode = masq_mode(conf, Some(&s));
                if let Err(e) = pod_masq(&conf.name, &a.container_id, &a.ifname).teardown(mode, &[a.ip]) {
                    log.warn(&e.to_string());
                }
            }
            freed.push(format!("{} ({})", a.ip, a.container_id));
        }
    }
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
