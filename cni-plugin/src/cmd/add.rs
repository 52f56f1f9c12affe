//! ADD: an address for each family under the store's lock, the bridge, the
//! veth pair born in the pod, the pod's addresses and routes, the per-pod
//! masquerade, the saved state, the result; a failure undoes what was done.

use std::fs;
use std::net::IpAddr;
use std::path::PathBuf;

use flannel_shared::IpNet;
use flannel_shared::firewall::Mode as MasqMode;
use flannel_shared::netlink::Route;
use flannel_shared::subnet_env::{SubnetEnv, write_file_atomic};

use super::{Ctx, Pod, connect, connect_in, masquerade, open_netns, pod_masq, read_subnet_env, runtime, with_store};
use crate::conf::{PluginConf, RouteSpec};
use crate::dataplane::{self, BridgeSpec};
use crate::error::{CniError, Result, code, io_err};
use crate::ipam::Range;
use crate::kernel::{Kernel, sysctl_path};
use crate::log::Log;
use crate::result::{CniResult, Interface, IpConfig, RouteResult};
use crate::state;

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
pub(super) struct Plan {
    fams: Vec<Family>,
    mtu: u32,
    /// `FLANNEL_IPMASQ`: whether flanneld masquerades itself.
    flannel_ipmasq: bool,
}

impl Plan {
    pub(super) fn new(conf: &PluginConf, senv: &SubnetEnv) -> Result<Plan> {
        Ok(Plan { fams: families(senv)?, mtu: conf.mtu.unwrap_or(senv.mtu), flannel_ipmasq: senv.ipmasq })
    }

    /// Every requested address has a node subnet of its family.
    pub(super) fn check_requested(&self, conf: &PluginConf) -> Result<()> {
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
pub(super) async fn add_with<K: Kernel>(
    ctx: &Ctx<'_>,
    plan: &Plan,
    host: &K,
    pod: &Pod<'_, K>,
    log: &mut Log,
) -> Result<String> {
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

#[cfg(test)]
mod tests {
    use std::fs;
    use std::net::IpAddr;

    use serde_json::json;

    use super::super::Ctx;
    use super::super::testing::*;
    use super::*;
    use crate::conf::Command;
    use crate::kernel::fake;

    /// ADD of one pod against the fake kernel: what it leaves in the kernel,
    /// the store and the state directory, and the result.
    #[test]
    fn add_against_the_fake_kernel() {
        let s = Scratch::new("add");
        s.subnet_env(V4);
        let conf = s.conf("1.0.0", json!({}));
        let (host, pod) = fake::pair();
        let e = env("c1", Some("/run/netns/p1"));
        let ctx = Ctx::new(Command::Add, &e, &conf).unwrap();
        let res = fake_add(&ctx, &host, &pod).unwrap();

        let veth = dataplane::host_veth_name("c1", "eth0");
        let (bridge, host_end) = host.with(|n| (n.link("cni0").cloned().unwrap(), n.link(&veth).cloned().unwrap()));
        assert_eq!(
            (bridge.up, bridge.mtu, bridge.mac),
            (true, 1450, Some(flannel_shared::Mac([0x0a, 0x58, 10, 244, 1, 1])))
        );
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
