//! The firewall rules flannel owns, described once as data and written by one
//! of two drivers: [`iptables`] (iptables-restore text, upstream flannel's and
//! the bridge plugin's exact rules) or [`nftables`] (flannel's own nftables
//! tables, through `nft -j`). flanneld keeps the agent's sets
//! ([`RuleSet`]) in place through the [`Firewall`] trait; the CNI plugin adds
//! and removes one pod's masquerade ([`PodMasq`]) per ADD/DEL.

pub mod iptables;
pub mod nftables;

use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;

use crate::IpNet;

/// A rule set flanneld owns (one per family).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RuleSet {
    /// No masquerade inside `network`, none for kube-proxy-marked (0x4000) traffic,
    /// masquerade of pod traffic leaving it (`subnet` is this node's lease).
    Masq { network: IpNet, subnet: IpNet, random_fully: bool },
    /// Accept forwarded traffic from and to `network` (a FORWARD policy of DROP).
    Forward { network: IpNet },
}

impl RuleSet {
    pub fn is_ipv4(&self) -> bool {
        match self {
            RuleSet::Masq { network, .. } | RuleSet::Forward { network } => network.is_ipv4(),
        }
    }
}

/// One attachment whose pod addresses the CNI plugin masquerades (`ipMasq`):
/// traffic from the pod to anywhere outside its subnet (multicast aside)
/// leaves with the node's address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodMasq<'a> {
    /// The CNI network name (the conflist's `name`).
    pub network: &'a str,
    pub container_id: &'a str,
    pub ifname: &'a str,
}

impl PodMasq<'_> {
    /// Installs the masquerade of `addrs` (each with its subnet's prefix length).
    pub fn setup(&self, mode: Mode, addrs: &[IpNet]) -> Result<(), FirewallError> {
        match mode {
            Mode::Iptables => addrs.iter().try_for_each(|a| iptables::pod_setup(self, a)),
            Mode::Nftables => nftables::pod_setup(self, addrs),
        }
    }

    /// What of [`PodMasq::setup`]'s rules is missing (empty when all are in place).
    pub fn missing(&self, mode: Mode, addrs: &[IpNet]) -> Vec<String> {
        match mode {
            Mode::Iptables => addrs.iter().flat_map(|a| iptables::pod_missing(self, a)).collect(),
            Mode::Nftables => nftables::pod_missing(self, addrs),
        }
    }

    /// Removes the masquerade of the attachment (`ips` are its addresses, which
    /// the iptables rules are keyed by); what is already gone is fine. In
    /// iptables mode whatever still jumps to the attachment's chain goes too,
    /// addresses known or not (an ADD killed before it saved them).
    pub fn teardown(&self, mode: Mode, ips: &[IpAddr]) -> Result<(), FirewallError> {
        match mode {
            Mode::Iptables => {
                ips.iter().try_for_each(|ip| iptables::pod_teardown(self.network, self.container_id, *ip))?;
                iptables::pod_teardown_chain(self.network, self.container_id, true)?;
                if ips.iter().any(|ip| ip.is_ipv6())
                    || iptables::pod_chain_exists(self.network, self.container_id, false)
                {
                    iptables::pod_teardown_chain(self.network, self.container_id, false)?;
                }
                Ok(())
            }
            Mode::Nftables => nftables::pod_teardown(self.network, self.ifname, self.container_id),
        }
    }
}

impl Mode {
    /// `ipMasqBackend`'s values.
    pub fn parse(s: &str) -> Option<Mode> {
        match s {
            "iptables" => Some(Mode::Iptables),
            "nftables" => Some(Mode::Nftables),
            _ => None,
        }
    }

    /// The bridge plugin's default: iptables where it is installed, else nftables.
    pub fn host_default() -> Mode {
        if Mode::Iptables.missing_tool().is_none() || find_in_path("nft").is_none() {
            Mode::Iptables
        } else {
            Mode::Nftables
        }
    }
}

/// Which driver writes the rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Iptables,
    Nftables,
}

impl Mode {
    /// The programs this mode runs, and the Debian package that has them.
    pub fn tools(self) -> (&'static [&'static str], &'static str) {
        match self {
            Mode::Iptables => (&["iptables-save", "iptables-restore", "iptables"], "iptables"),
            Mode::Nftables => (&["nft"], "nftables"),
        }
    }

    /// The first of this mode's programs not found on `PATH`, if any.
    pub fn missing_tool(self) -> Option<&'static str> {
        self.tools().0.iter().copied().find(|t| find_in_path(t).is_none())
    }

    pub fn other(self) -> Mode {
        match self {
            Mode::Iptables => Mode::Nftables,
            Mode::Nftables => Mode::Iptables,
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Iptables => "iptables",
            Mode::Nftables => "nftables",
        })
    }
}

/// `name` as the shell would find it on `PATH`.
pub fn find_in_path(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    /// A program (iptables-restore, nft) failed or could not be run.
    #[error("{cmd}: {msg}")]
    Command { cmd: String, msg: String },
    /// `nft -j` printed something that is not its JSON.
    #[error("{cmd}: unexpected output: {msg}")]
    Output { cmd: String, msg: String },
}

/// A driver for the agent's rule sets.
pub trait Firewall {
    /// For log lines (`iptables`, `nftables`).
    fn mode(&self) -> Mode;
    /// Makes this driver's rules of one family exactly `sets` (those of the
    /// family's kinds not in `sets` are removed). Returns one line per change
    /// made; none when everything was in place.
    fn sync(&mut self, v6: bool, sets: &[RuleSet]) -> Result<Vec<String>, FirewallError>;
}

impl<T: Firewall + ?Sized> Firewall for Box<T> {
    fn mode(&self) -> Mode {
        (**self).mode()
    }
    fn sync(&mut self, v6: bool, sets: &[RuleSet]) -> Result<Vec<String>, FirewallError> {
        (**self).sync(v6, sets)
    }
}

/// Clears away what the other mode's driver left in the kernel, for a node
/// that switched `EnableNFTables` (an edit of net-conf.json and a restart).
/// Returns what was removed, and what could not be checked or removed.
///
/// Into nftables mode: the iptables chains, with nft itself where they are
/// iptables-nft's (no iptables binaries needed), with iptables-legacy where
/// that is installed. Into iptables mode: flannel's nftables tables, where
/// `nft` is installed.
pub fn purge_other(mode: Mode) -> (Vec<String>, Vec<String>) {
    let (mut removed, mut failed) = (Vec::new(), Vec::new());
    let mut take = |r: Result<Vec<String>, FirewallError>| match r {
        Ok(lines) => removed.extend(lines),
        Err(e) => failed.push(e.to_string()),
    };
    match mode {
        Mode::Nftables => {
            take(nftables::purge_iptables_nft(&[iptables::MASQ_CHAIN, iptables::FWD_CHAIN]));
            if find_in_path("iptables-legacy-save").is_some() {
                let mut legacy = iptables::Iptables::new(iptables::Flavour::legacy());
                for v6 in [false, true] {
                    take(legacy.sync(v6, &[]).map(|l| l.into_iter().map(|c| format!("{c} (legacy)")).collect()));
                }
            }
        }
        Mode::Iptables => {
            if find_in_path("nft").is_some() {
                take(nftables::purge_tables());
            }
        }
    }
    (removed, failed)
}
