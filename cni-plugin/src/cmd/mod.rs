//! ADD, DEL, CHECK, STATUS and GC, one file each; what they share is here.
//!
//! An attachment's command gets one [`Ctx`], built once from the environment;
//! every command reaches the address store through [`with_store`] (open,
//! lock, work, unlock), decides ipMasq with [`masquerade`], and reaches the
//! kernel through one connection per namespace. The kernel side is written
//! against [`Kernel`](crate::kernel::Kernel), so it also runs against the
//! in-memory kernel of the unit tests.

mod add;
mod check;
mod del;
mod gc;
mod status;
#[cfg(test)]
mod testing;

use std::fs::{self, File};
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use flannel_shared::firewall::{Mode as MasqMode, PodMasq};
use flannel_shared::netlink::Netlink;
use flannel_shared::netns;
use flannel_shared::subnet_env::SubnetEnv;

use crate::conf::{self, Command, Env, PluginConf};
use crate::error::{CniError, Result, code, io_err};
use crate::ipam::{self, Allocation, IpamError, Locked, Range, Store};
use crate::log::Log;
use crate::state::{self, SavedState};

/// Runs one command. VERSION is answered before there is a configuration.
pub fn run(cmd: Command, env: &Env, conf: &PluginConf, log: &mut Log) -> Result<Option<String>> {
    match cmd {
        Command::Add => add::add(&Ctx::new(cmd, env, conf)?, log).map(Some),
        Command::Del => del::del(&Ctx::new(cmd, env, conf)?, log).map(|()| None),
        Command::Check => check::check(&Ctx::new(cmd, env, conf)?, log).map(|()| None),
        Command::Status => status::status(conf, log).map(|()| None),
        Command::Gc => gc::gc(conf, log).map(|()| None),
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

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::testing::*;
    use super::*;

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
        let e = add::add(&Ctx::new(Command::Add, &missing, &conf).unwrap(), &mut Log::default()).unwrap_err();
        assert_eq!(e.code, code::UNKNOWN_CONTAINER, "{e}");
        let file = env("c1", Some(s.0.join("subnet.env").to_str().unwrap()));
        let e = add::add(&Ctx::new(Command::Add, &file, &conf).unwrap(), &mut Log::default()).unwrap_err();
        assert_eq!((e.code, e.msg.contains("is not a network namespace")), (code::INVALID_ENV, true), "{e}");
        // ... but subnet.env is judged first, as before.
        fs::remove_file(s.0.join("subnet.env")).unwrap();
        let e = add::add(&Ctx::new(Command::Add, &missing, &conf).unwrap(), &mut Log::default()).unwrap_err();
        assert_eq!(e.code, code::TRY_AGAIN_LATER, "{e}");
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
}
