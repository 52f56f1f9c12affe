//! Command-line flags, named as upstream flanneld names them; every flag can
//! also come from the environment as `FLANNELD_<FLAG>` (dashes become
//! underscores), which is how the DaemonSet and systemd units set them.
//! Booleans accept Go's forms: `--ip-masq`, `--ip-masq=true`, `--ip-masq=false`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use clap::{ArgAction, Parser};

#[derive(Clone, Debug, Parser)]
#[command(
    name = "flanneld",
    disable_version_flag = true,
    args_override_self = true,
    about = "flannel node agent: subnet leases and the VXLAN / host-gw data path"
)]
pub struct Opts {
    /// Comma-separated etcd endpoints.
    #[arg(long, env = "FLANNELD_ETCD_ENDPOINTS", default_value = "http://127.0.0.1:2379", value_delimiter = ',')]
    pub etcd_endpoints: Vec<String>,
    /// etcd key prefix holding `config` and `subnets/`.
    #[arg(long, env = "FLANNELD_ETCD_PREFIX", default_value = "/coreos.com/network")]
    pub etcd_prefix: String,
    /// TLS client key for etcd (an empty value, as with Go's flags, means none).
    #[arg(long, env = "FLANNELD_ETCD_KEYFILE")]
    pub etcd_keyfile: Option<String>,
    /// TLS client certificate for etcd.
    #[arg(long, env = "FLANNELD_ETCD_CERTFILE")]
    pub etcd_certfile: Option<String>,
    /// CA that signed etcd's server certificate.
    #[arg(long, env = "FLANNELD_ETCD_CAFILE")]
    pub etcd_cafile: Option<String>,
    #[arg(long, env = "FLANNELD_ETCD_USERNAME")]
    pub etcd_username: Option<String>,
    #[arg(long, env = "FLANNELD_ETCD_PASSWORD", hide_env_values = true)]
    pub etcd_password: Option<String>,

    /// Interface (name or IP) for inter-host traffic; repeat to give fallbacks in order.
    /// Never split on commas (upstream's flag is repeatable; `FLANNELD_IFACE` is one value).
    #[arg(long, env = "FLANNELD_IFACE")]
    pub iface: Vec<String>,
    /// Regex matched against interface IPv4 addresses, then names; repeat to give fallbacks
    /// in order, tried after every --iface. One pattern per flag: `^eth[0-9]{1,3}$` stays whole.
    #[arg(long, env = "FLANNELD_IFACE_REGEX")]
    pub iface_regex: Vec<String>,
    /// Use the interface of the route to this address.
    #[arg(long, env = "FLANNELD_IFACE_CAN_REACH")]
    pub iface_can_reach: Option<IpAddr>,
    /// IP advertised to other nodes (default: the uplink's address).
    #[arg(long, env = "FLANNELD_PUBLIC_IP")]
    pub public_ip: Option<Ipv4Addr>,
    #[arg(long, env = "FLANNELD_PUBLIC_IPV6")]
    pub public_ipv6: Option<Ipv6Addr>,

    #[arg(long, env = "FLANNELD_SUBNET_FILE", default_value = "/run/flannel/subnet.env")]
    pub subnet_file: PathBuf,
    /// Renew the lease this many minutes before it expires, from 1 to 1439 (as upstream).
    #[arg(long, env = "FLANNELD_SUBNET_LEASE_RENEW_MARGIN", default_value_t = 60, allow_negative_numbers = true)]
    pub subnet_lease_renew_margin: i64,
    /// Lifetime of the etcd lease in seconds (upstream fixes it at 24 h).
    #[arg(long, env = "FLANNELD_SUBNET_LEASE_TTL", default_value_t = 24 * 3600, hide = true)]
    pub subnet_lease_ttl: i64,

    /// Masquerade traffic leaving the cluster network.
    #[arg(long, env = "FLANNELD_IP_MASQ", action = ArgAction::Set, default_value_t = false, num_args = 0..=1, default_missing_value = "true")]
    pub ip_masq: bool,
    /// Accept traffic to and from the cluster network in FORWARD.
    #[arg(long, env = "FLANNELD_IPTABLES_FORWARD_RULES", action = ArgAction::Set, default_value_t = true, num_args = 0..=1, default_missing_value = "true")]
    pub iptables_forward_rules: bool,
    /// Seconds between checks that the iptables rules are still in place.
    #[arg(long, env = "FLANNELD_IPTABLES_RESYNC", default_value_t = 5)]
    pub iptables_resync: u64,
    #[arg(long, env = "FLANNELD_IP_MASQ_FULLY_RANDOM_DISABLE", action = ArgAction::Set, default_value_t = false, num_args = 0..=1, default_missing_value = "true")]
    pub ip_masq_fully_random_disable: bool,
    /// Add a blackhole route for this node's subnet, so traffic to unassigned pod IPs stays here.
    #[arg(long, env = "FLANNELD_IP_BLACKHOLE_ROUTE", action = ArgAction::Set, default_value_t = false, num_args = 0..=1, default_missing_value = "true")]
    pub ip_blackhole_route: bool,

    #[arg(long, env = "FLANNELD_HEALTHZ_IP", default_value = "0.0.0.0")]
    pub healthz_ip: IpAddr,
    /// Port of /healthz, /readyz and /metrics; 0 turns the server off.
    #[arg(long, env = "FLANNELD_HEALTHZ_PORT", default_value_t = 0)]
    pub healthz_port: u16,

    /// Use the Kubernetes API instead of etcd.
    #[arg(long, env = "FLANNELD_KUBE_SUBNET_MGR", action = ArgAction::Set, default_value_t = false, num_args = 0..=1, default_missing_value = "true")]
    pub kube_subnet_mgr: bool,
    #[arg(long, env = "FLANNELD_KUBE_API_URL")]
    pub kube_api_url: Option<String>,
    #[arg(long, env = "FLANNELD_KUBECONFIG_FILE")]
    pub kubeconfig_file: Option<PathBuf>,
    #[arg(long, env = "FLANNELD_KUBE_ANNOTATION_PREFIX", default_value = "flannel.alpha.coreos.com")]
    pub kube_annotation_prefix: String,
    #[arg(long, env = "FLANNELD_SET_NODE_NETWORK_UNAVAILABLE", action = ArgAction::Set, default_value_t = true, num_args = 0..=1, default_missing_value = "true")]
    pub set_node_network_unavailable: bool,
    /// net-conf.json (Kubernetes mode).
    #[arg(long, env = "FLANNELD_NET_CONFIG_PATH", default_value = "/etc/kube-flannel/net-conf.json")]
    pub net_config_path: PathBuf,

    /// Seconds between full reconcile passes of routes, ARP and FDB entries. Kernel change
    /// notifications wake a pass at once; this periodic one is the safety net.
    #[arg(long, env = "FLANNELD_RECONCILE_INTERVAL", default_value_t = 60)]
    pub reconcile_interval: u64,

    /// Print the version (upstream's form, `v0.1.0`, on stderr) and exit.
    #[arg(long, action = ArgAction::Set, default_value_t = false, num_args = 0..=1, default_missing_value = "true")]
    pub version: bool,

    /// Log verbosity: 0 = info, 1-2 = debug, 3+ = trace.
    #[arg(short = 'v', long = "v", env = "FLANNELD_V", default_value_t = 0)]
    pub verbosity: u8,

    /// klog's per-file verbosity and backtrace flags, which upstream's flanneld
    /// accepts: taken so a unit or manifest that passes them still starts, and
    /// ignored with a warning (tracing has no per-file levels).
    #[arg(long, env = "FLANNELD_VMODULE", hide = true)]
    pub vmodule: Option<String>,
    #[arg(long = "log_backtrace_at", env = "FLANNELD_LOG_BACKTRACE_AT", hide = true)]
    pub log_backtrace_at: Option<String>,
}

/// The version as upstream prints it.
pub fn version() -> String {
    format!("v{}", env!("CARGO_PKG_VERSION"))
}

impl Opts {
    /// Checks upstream makes after parsing, with upstream's ranges.
    pub fn validate(&self) -> Result<(), String> {
        if !(1..24 * 60).contains(&self.subnet_lease_renew_margin) {
            return Err(format!(
                "--subnet-lease-renew-margin {}: out of range, must be from 1 to 1439 minutes",
                self.subnet_lease_renew_margin
            ));
        }
        Ok(())
    }

    pub fn etcd_key(&self, rest: &str) -> String {
        format!("{}/{rest}", self.etcd_prefix.trim_end_matches('/'))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_style_booleans_and_defaults() {
        let o = Opts::try_parse_from(["flanneld"]).unwrap();
        assert!(!o.ip_masq && o.iptables_forward_rules && o.iptables_resync == 5);
        assert_eq!(o.etcd_key("config"), "/coreos.com/network/config");
        assert_eq!(o.subnet_file, PathBuf::from("/run/flannel/subnet.env"));
        let o = Opts::try_parse_from([
            "flanneld",
            "--ip-masq",
            "--iptables-forward-rules=false",
            "--iface=eth1",
            "--iface",
            "10.0.0.1",
            "--etcd-endpoints=http://a:2379,http://b:2379",
            "--etcd-prefix=/x/",
            "-v=2",
            "--iptables-resync=3",
            "--iptables-resync=7",
        ])
        .unwrap();
        assert!(o.ip_masq && !o.iptables_forward_rules);
        assert_eq!(o.iface, ["eth1", "10.0.0.1"]);
        assert_eq!(o.etcd_endpoints.len(), 2);
        assert_eq!(o.etcd_key("subnets"), "/x/subnets");
        assert_eq!(o.verbosity, 2);
        // As with Go's flag package, a repeated flag's last value wins.
        assert_eq!(o.iptables_resync, 7);
        let e = Opts::try_parse_from(["flanneld", "--public-ip=300.1.1.1"]).unwrap_err().to_string();
        assert!(e.contains("--public-ip"), "{e}");
        assert!(o.validate().is_ok());
    }

    #[test]
    fn iface_values_are_never_split_on_commas() {
        let o = Opts::try_parse_from(["flanneld", "--iface-regex=^eth[0-9]{1,3}$", "--iface-regex", "^ens,x"]).unwrap();
        assert_eq!(o.iface_regex, ["^eth[0-9]{1,3}$", "^ens,x"]);
        let o = Opts::try_parse_from(["flanneld", "--iface=eth0,eth1"]).unwrap();
        assert_eq!(o.iface, ["eth0,eth1"]);
        // klog's flags are accepted, as upstream's flanneld accepts them.
        let o = Opts::try_parse_from(["flanneld", "--vmodule=kube*=4", "--log_backtrace_at=main.go:1"]).unwrap();
        assert_eq!(o.vmodule.as_deref(), Some("kube*=4"));
    }

    #[test]
    fn renew_margin_has_upstreams_range_and_version_its_form() {
        for (m, ok) in [("0", false), ("-5", false), ("1", true), ("1439", true), ("1440", false)] {
            let o = Opts::try_parse_from(["flanneld", &format!("--subnet-lease-renew-margin={m}")]).unwrap();
            assert_eq!(o.validate().is_ok(), ok, "{m}");
        }
        assert!(Opts::try_parse_from(["flanneld", "--version"]).unwrap().version);
        assert!(version().starts_with('v') && version()[1..].split('.').count() == 3, "{}", version());
    }
}
