//! DEL: idempotent, and it succeeds when the netns, the saved state or the
//! IP are already gone. The pod's addresses and its IPs are freed before it
//! returns; the veth is deleted by a detached reaper right after.

use std::fs::{self, File};
use std::io;
use std::net::IpAddr;
use std::path::Path;

use flannel_shared::netlink::Idempotent;

use super::{Ctx, connect, connect_in, flannel_ipmasq, masquerade, pod_masq, runtime, with_existing_store};
use crate::dataplane;
use crate::error::{CniError, Result, io_err};
use crate::kernel::Kernel;
use crate::log::Log;
use crate::state::SavedState;

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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::testing::*;
    use super::*;
    use crate::conf::Command;
    use crate::kernel::fake;

    /// DEL after an ADD against the fake kernel: the pod's addresses, the
    /// reservation and the state go at once; the veth is left to the reaper,
    /// which takes both ends. A second DEL finds nothing and succeeds.
    #[test]
    fn del_against_the_fake_kernel() {
        let s = Scratch::new("del");
        s.subnet_env(V4);
        let conf = s.conf("1.0.0", json!({}));
        let (host, pod) = fake::pair();
        let e = env("c1", Some("/run/netns/p1"));
        fake_add(&Ctx::new(Command::Add, &e, &conf).unwrap(), &host, &pod).unwrap();
        let veth = dataplane::host_veth_name("c1", "eth0");

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
}
