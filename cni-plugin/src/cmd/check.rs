//! CHECK: the attachment is still as its ADD left it (the result it printed,
//! `prevResult`): store, pod interface, addresses and routes, host veth and
//! bridge, masquerade. What differs is reported as drift (error 102).

use flannel_shared::IpNet;
use flannel_shared::netlink::RT_TABLE_MAIN;

use super::{Ctx, connect, connect_in, flannel_ipmasq, masquerade, open_netns, pod_masq, runtime, with_existing_store};
use crate::dataplane;
use crate::error::{CniError, Result, code};
use crate::kernel::Kernel;
use crate::log::Log;
use crate::result::{CniResult, IpConfig};

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

#[cfg(test)]
mod tests {
    use std::fs;

    use serde_json::json;

    use super::super::testing::*;
    use super::*;
    use crate::conf::Command;
    use crate::kernel::fake;

    /// CHECK after an ADD against the fake kernel: nothing wrong, then what
    /// was changed behind the plugin's back.
    #[test]
    fn check_against_the_fake_kernel() {
        let s = Scratch::new("check");
        s.subnet_env(V4);
        let conf = s.conf("1.0.0", json!({}));
        let (host, pod) = fake::pair();
        let e = env("c1", Some("/run/netns/p1"));
        let res = fake_add(&Ctx::new(Command::Add, &e, &conf).unwrap(), &host, &pod).unwrap();
        let veth = dataplane::host_veth_name("c1", "eth0");

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

        // The store no longer holds the address.
        fs::remove_file(s.0.join("ipam/cbr0/10.244.1.2")).unwrap();
        let mut drift = Vec::new();
        check_store(&ctx, &prev, &mut drift, &mut Log::default()).unwrap();
        assert_eq!(drift.len(), 1, "{drift:?}");
        assert!(drift[0].starts_with("10.244.1.2 is not reserved for this container"), "{drift:?}");
    }
}
