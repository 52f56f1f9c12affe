//! Which firewall driver this node's rules go through: `EnableNFTables` in
//! net-conf.json picks nftables, anything else iptables (the drivers and the
//! rule sets live in `flannel_shared::firewall`).

use flannel_shared::firewall::iptables::Iptables;
use flannel_shared::firewall::{self, Firewall, Mode as FirewallMode, nftables};
use flannel_shared::netconf::NetConfig;
use tracing::{info, warn};

use crate::config::Opts;

/// The firewall driver `EnableNFTables` asks for, after clearing away what the
/// other mode left (a switch is an edit of net-conf.json and a restart).
pub fn choose(opts: &Opts, cfg: &NetConfig) -> Result<Box<dyn Firewall>, String> {
    let mode = if cfg.enable_nftables { FirewallMode::Nftables } else { FirewallMode::Iptables };
    let needed = opts.ip_masq || opts.iptables_forward_rules;
    if needed && let Some(tool) = mode.missing_tool() {
        let (flag, value) = ("EnableNFTables", cfg.enable_nftables);
        return Err(format!(
            "net-conf.json: {flag} is {value}, so the rules are written with {mode}, but `{tool}` is not on PATH: \
             install the {} package{}",
            mode.tools().1,
            if value { "" } else { ", or set \"EnableNFTables\": true to use nftables" }
        ));
    }
    let (removed, failed) = firewall::purge_other(mode);
    for line in removed {
        info!("switch to {mode}: {line}");
    }
    for line in failed {
        warn!("switch to {mode}: {line}");
    }
    Ok(match mode {
        FirewallMode::Iptables => {
            let (fw, why) = Iptables::detect();
            info!("iptables: writing with {} ({why})", fw.restore_command());
            Box::new(fw)
        }
        FirewallMode::Nftables => {
            info!("nftables: writing tables ip {} / ip6 {}", nftables::IPV4_TABLE, nftables::IPV6_TABLE);
            if opts.iptables_forward_rules {
                match nftables::forward_drop_chains() {
                    Ok(drops) if !drops.is_empty() => warn!(
                        "nftables: {} drop forwarded packets by policy; flannel's forward chain cannot override \
                         another table's drop, so pod traffic between nodes is dropped until those chains accept it \
                         (see the README, \"FORWARD policy DROP\")",
                        drops.join(", ")
                    ),
                    Ok(_) => {}
                    Err(e) => warn!("nftables: cannot check other tables' forward policies: {e}"),
                }
            }
            Box::new(nftables::Nftables::new())
        }
    })
}
