//! The rule sets the agent owns, as data, and the driver that writes them.
//! The agent says which sets it wants (and which the flags turned off); a
//! [`Firewall`] makes the kernel agree. [`Iptables`] is today's driver.

use flannel_shared::IpNet;

use crate::iptables::{self, Flavour, IptablesError, TableRules};

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

#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    #[error("{0}")]
    Iptables(#[from] IptablesError),
}

/// A driver for the agent's rule sets.
pub trait Firewall {
    /// For log lines (`iptables`).
    fn name(&self) -> &'static str;
    /// What `set` is called in this driver's terms (`FLANNEL-POSTRTG in table nat`).
    fn describe(&self, set: &RuleSet) -> String;
    /// Makes sure `set` is in place exactly; true when it had to be written.
    fn ensure(&mut self, set: &RuleSet) -> Result<bool, FirewallError>;
    /// Removes `set` if present; true when there was something to remove.
    fn remove(&mut self, set: &RuleSet) -> Result<bool, FirewallError>;
}

/// iptables-restore/-save in the flavour kube-proxy uses.
pub struct Iptables {
    flavour: Flavour,
}

impl Iptables {
    pub fn new(flavour: Flavour) -> Iptables {
        Iptables { flavour }
    }

    /// Picks nft or legacy as kube-proxy's rules do; returns the reason too.
    pub fn detect() -> (Iptables, String) {
        let (flavour, why) = Flavour::detect();
        (Iptables { flavour }, why)
    }

    /// The restore command rules are written with.
    pub fn restore_command(&self) -> &str {
        &self.flavour.restore
    }

    fn flavour(&self, set: &RuleSet) -> Flavour {
        if set.is_ipv4() { self.flavour.clone() } else { self.flavour.v6() }
    }
}

/// `set` as iptables rules.
pub fn render(set: &RuleSet) -> TableRules {
    match set {
        RuleSet::Masq { network, subnet, random_fully } => iptables::masq_rules(network, subnet, *random_fully),
        RuleSet::Forward { network } => iptables::forward_rules(network),
    }
}

impl Firewall for Iptables {
    fn name(&self) -> &'static str {
        "iptables"
    }

    fn describe(&self, set: &RuleSet) -> String {
        let t = render(set);
        format!("{} in table {}", t.chain, t.table)
    }

    fn ensure(&mut self, set: &RuleSet) -> Result<bool, FirewallError> {
        Ok(iptables::ensure_with(&self.flavour(set), &render(set))?)
    }

    fn remove(&mut self, set: &RuleSet) -> Result<bool, FirewallError> {
        Ok(iptables::remove_with(&self.flavour(set), &render(set))?)
    }
}
