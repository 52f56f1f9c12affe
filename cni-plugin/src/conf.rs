//! The CNI environment and the network configuration on stdin.
//!
//! Accepts upstream flannel's conflist entry unchanged:
//! `{"type":"flannel","delegate":{"hairpinMode":true,"isDefaultGateway":true}}`,
//! plus `subnetFile`, `dataDir`, the delegate keys upstream forwards to the
//! bridge plugin, the `ipam` object (`dataDir`, `routes`) and `runtimeConfig`.
//! The document is decoded into typed structs; every error names the key path
//! of the offending value (`delegate.mtu`, `ipam.routes[0].dst`).

use std::net::IpAddr;
use std::path::PathBuf;

use flannel_shared::IpNet;
use flannel_shared::firewall::Mode;
use serde::{Deserialize, de};
use serde_json::Value;

use crate::decode;
use crate::error::{CniError, Result, code};

pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
pub const DEFAULT_SUBNET_FILE: &str = "/run/flannel/subnet.env";
pub const DEFAULT_DATA_DIR: &str = "/var/lib/cni/flannel";
pub const DEFAULT_IPAM_DATA_DIR: &str = "/var/lib/cni/networks";
pub const DEFAULT_BRIDGE: &str = "cni0";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    Status,
    Gc,
}

/// The `CNI_*` environment of one invocation.
#[derive(Clone, Debug, Default)]
pub struct Env {
    pub container_id: String,
    pub netns: Option<PathBuf>,
    pub ifname: String,
    /// `CNI_ARGS` as key/value pairs.
    pub args: Vec<(String, String)>,
}

fn invalid_env(msg: impl Into<String>) -> CniError {
    CniError::new(code::INVALID_ENV, msg)
}

/// Container IDs end up in file names: letters, digits, `_`, `.`, `-`, not starting with a symbol.
pub fn validate_container_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 256
        && id.as_bytes()[0].is_ascii_alphanumeric()
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(invalid_env(format!("CNI_CONTAINERID {id:?} is invalid: use letters, digits, '_', '.', '-'")))
    }
}

/// Interface names as the kernel accepts them: 1-15 bytes, no '/', ':' or whitespace, not "." or "..".
pub fn validate_ifname(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && name.bytes().all(|b| b.is_ascii_graphic() && b != b'/' && b != b':');
    if ok { Ok(()) } else { Err(invalid_env(format!("CNI_IFNAME {name:?} is not a valid interface name"))) }
}

/// Network names are used as directory names in the IPAM store.
fn validate_network_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(CniError::new(
            code::INVALID_CONFIG,
            format!("name {name:?} is invalid: use letters, digits, '_', '.', '-'"),
        ))
    }
}

impl Env {
    /// Reads the environment for `command`; `get` is `std::env::var` in production.
    pub fn load(command: Command, get: impl Fn(&str) -> Option<String>) -> Result<Env> {
        let mut env = Env::default();
        let needs_container = matches!(command, Command::Add | Command::Del | Command::Check);
        if needs_container {
            env.container_id = get("CNI_CONTAINERID")
                .filter(|s| !s.is_empty())
                .ok_or_else(|| invalid_env("CNI_CONTAINERID is required"))?;
            validate_container_id(&env.container_id)?;
            env.ifname =
                get("CNI_IFNAME").filter(|s| !s.is_empty()).ok_or_else(|| invalid_env("CNI_IFNAME is required"))?;
            validate_ifname(&env.ifname)?;
            env.netns = get("CNI_NETNS").filter(|s| !s.is_empty()).map(PathBuf::from);
            if env.netns.is_none() && command != Command::Del {
                return Err(invalid_env("CNI_NETNS is required"));
            }
        }
        if let Some(args) = get("CNI_ARGS").filter(|s| !s.is_empty()) {
            for pair in args.split(';').filter(|p| !p.is_empty()) {
                let (k, v) =
                    pair.split_once('=').ok_or_else(|| invalid_env(format!("CNI_ARGS: {pair:?} is not KEY=VALUE")))?;
                env.args.push((k.to_string(), v.to_string()));
            }
        }
        Ok(env)
    }

    pub fn arg(&self, key: &str) -> Option<&str> {
        self.args.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

/// A route the IPAM section asks for; `gw` absent means "via the pod's gateway".
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteSpec {
    pub dst: IpNet,
    pub gw: Option<IpAddr>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Dns {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub domain: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

/// The effective settings of one invocation, after upstream's merge rules.
#[derive(Clone, Debug)]
pub struct PluginConf {
    pub cni_version: String,
    pub name: String,
    pub subnet_file: PathBuf,
    pub data_dir: PathBuf,
    pub bridge: String,
    /// Delegate `mtu`; `FLANNEL_MTU` when absent.
    pub mtu: Option<u32>,
    /// Delegate `ipMasq`; `!FLANNEL_IPMASQ` when absent (upstream's rule).
    pub ip_masq: Option<bool>,
    /// Delegate `ipMasqBackend` (the bridge plugin's key): `iptables` or
    /// `nftables`; absent means iptables where it is installed, else nftables.
    pub ip_masq_backend: Option<Mode>,
    pub hairpin: bool,
    pub is_gateway: bool,
    pub is_default_gateway: bool,
    pub force_address: bool,
    pub promisc: bool,
    pub ipam_data_dir: PathBuf,
    pub ipam_routes: Vec<RouteSpec>,
    pub dns: Dns,
    /// Specific addresses asked for via `runtimeConfig.ips`, `args.cni.ips` or `CNI_ARGS` `IP=`.
    pub requested_ips: Vec<IpAddr>,
    pub prev_result: Option<Value>,
    pub log_file: Option<PathBuf>,
    /// GC: `cni.dev/valid-attachments` as (containerID, ifname).
    pub valid_attachments: Option<Vec<(String, String)>>,
}

fn cfg_err(msg: impl Into<String>) -> CniError {
    CniError::new(code::INVALID_CONFIG, msg)
}

/// The network configuration as it arrives on stdin (one plugin entry of a
/// conflist, with what the runtime adds). Every field is optional here; the
/// defaults and upstream's merge rules are applied in [`PluginConf::parse`].
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawConf {
    /// Judged before the typed decode (see [`PluginConf::parse`]).
    #[serde(rename = "cniVersion")]
    _cni_version: Option<de::IgnoredAny>,
    name: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    subnet_file: Option<PathBuf>,
    data_dir: Option<PathBuf>,
    log_file: Option<PathBuf>,
    delegate: Option<RawDelegate>,
    ipam: Option<RawIpam>,
    dns: Option<Dns>,
    runtime_config: Option<RuntimeConfig>,
    args: Option<Args>,
    /// Decoded by CHECK, into [`crate::result::CniResult`].
    prev_result: Option<Value>,
    #[serde(rename = "cni.dev/valid-attachments")]
    valid_attachments: Option<Vec<Attachment>>,
}

/// The bridge-plugin keys upstream forwards as `delegate`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawDelegate {
    #[serde(rename = "type")]
    kind: Option<String>,
    // Upstream's delegate carries these; the top-level ones are used.
    #[serde(rename = "name")]
    _name: Option<Value>,
    #[serde(rename = "cniVersion")]
    _cni_version: Option<Value>,
    bridge: Option<String>,
    mtu: Option<u32>,
    ip_masq: Option<bool>,
    ip_masq_backend: Option<String>,
    hairpin_mode: Option<bool>,
    is_gateway: Option<bool>,
    is_default_gateway: Option<bool>,
    force_address: Option<bool>,
    promisc_mode: Option<bool>,
    ipam: Option<RawIpam>,
    dns: Option<Dns>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawIpam {
    #[serde(rename = "type")]
    kind: Option<String>,
    data_dir: Option<PathBuf>,
    routes: Option<Vec<RawRoute>>,
}

impl RawIpam {
    /// Upstream starts from the top-level ipam object and lets the delegate's override it, key by key.
    fn overridden_by(self, d: RawIpam) -> RawIpam {
        RawIpam { kind: d.kind.or(self.kind), data_dir: d.data_dir.or(self.data_dir), routes: d.routes.or(self.routes) }
    }
}

#[derive(Debug, Deserialize)]
struct RawRoute {
    dst: IpNet,
    gw: Option<IpAddr>,
}

#[derive(Debug, Default, Deserialize)]
struct RuntimeConfig {
    ips: Option<Vec<RequestedIp>>,
}

#[derive(Debug, Default, Deserialize)]
struct Args {
    cni: Option<CniArgs>,
}

#[derive(Debug, Default, Deserialize)]
struct CniArgs {
    ips: Option<Vec<RequestedIp>>,
}

/// An address asked for by the runtime: a bare IP or one with a prefix length.
#[derive(Debug, Clone, Copy)]
struct RequestedIp(IpAddr);

impl<'de> Deserialize<'de> for RequestedIp {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_ip_maybe_cidr(&s).map(RequestedIp).ok_or_else(|| de::Error::custom(format!("{s:?} is not an IP address")))
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Attachment {
    #[serde(rename = "containerID")]
    container_id: String,
    ifname: String,
}

fn parse_ip_maybe_cidr(s: &str) -> Option<IpAddr> {
    s.parse::<IpAddr>().ok().or_else(|| s.parse::<IpNet>().ok().map(|n| n.addr()))
}

impl PluginConf {
    /// Parses the network configuration. `warn` receives non-fatal notes.
    pub fn parse(bytes: &[u8], env: &Env, mut warn: impl FnMut(String)) -> Result<PluginConf> {
        let root: Value = serde_json::from_slice(bytes).map_err(|e| {
            CniError::new(code::DECODE_FAILURE, "failed to decode the network configuration")
                .with_details(e.to_string())
        })?;
        if !root.is_object() {
            return Err(CniError::new(code::DECODE_FAILURE, "the network configuration is not a JSON object"));
        }
        // The version decides how everything else is read, so it is judged first.
        let cni_version = root.get("cniVersion").and_then(Value::as_str).unwrap_or_default().to_string();
        if !SUPPORTED_VERSIONS.contains(&cni_version.as_str()) {
            return Err(CniError::new(
                code::INCOMPATIBLE_VERSION,
                format!("cniVersion {cni_version:?} is not supported (supported: {})", SUPPORTED_VERSIONS.join(", ")),
            ));
        }
        let raw: RawConf = decode::typed(root, "", |path| {
            // Only the delegate's keys are ours to judge: the rest of the document
            // belongs to the runtime and the conflist.
            if let Some(k) = path.strip_prefix("delegate.") {
                warn(format!("delegate.{k} is not supported and is ignored"));
            }
        })
        .map_err(cfg_err)?;

        let name = raw.name.ok_or_else(|| cfg_err("name is required"))?;
        validate_network_name(&name)?;
        if let Some(t) = raw.kind
            && t != "flannel"
        {
            warn(format!("type is {t:?}; treating this configuration as flannel's"));
        }

        let delegate = raw.delegate.unwrap_or_default();
        if let Some(t) = &delegate.kind
            && t != "bridge"
        {
            return Err(CniError::new(
                code::UNSUPPORTED_FIELD,
                format!("delegate.type {t:?} is not supported: this plugin implements the bridge delegate itself"),
            ));
        }
        if let Some(m) = delegate.mtu
            && !(68..=65535).contains(&m)
        {
            return Err(cfg_err(format!("delegate.mtu: expected an MTU between 68 and 65535, got {m}")));
        }
        let ip_masq_backend = match delegate.ip_masq_backend.as_deref() {
            None => None,
            Some(b) => Some(Mode::parse(b).ok_or_else(|| {
                cfg_err(format!("delegate.ipMasqBackend: {b:?} is not supported (use \"iptables\" or \"nftables\")"))
            })?),
        };
        let bridge = delegate.bridge.unwrap_or_else(|| DEFAULT_BRIDGE.to_string());
        validate_ifname(&bridge)
            .map_err(|_| cfg_err(format!("delegate.bridge {bridge:?} is not a valid interface name")))?;
        let is_default_gateway = delegate.is_default_gateway.unwrap_or(false);
        let is_gateway = delegate.is_gateway.unwrap_or(true) || is_default_gateway;

        let ipam = match delegate.ipam {
            Some(d) => raw.ipam.unwrap_or_default().overridden_by(d),
            None => raw.ipam.unwrap_or_default(),
        };
        if let Some(t) = ipam.kind
            && t != "host-local"
        {
            return Err(CniError::new(
                code::UNSUPPORTED_FIELD,
                format!("ipam.type {t:?} is not supported: this plugin allocates host-local style itself"),
            ));
        }
        let ipam_routes =
            ipam.routes.unwrap_or_default().into_iter().map(|r| RouteSpec { dst: r.dst.network(), gw: r.gw }).collect();

        let mut requested_ips: Vec<IpAddr> =
            [raw.runtime_config.and_then(|r| r.ips), raw.args.and_then(|a| a.cni).and_then(|c| c.ips)]
                .into_iter()
                .flatten()
                .flatten()
                .map(|r| r.0)
                .collect();
        if let Some(ip) = env.arg("IP") {
            for part in ip.split(',') {
                let a = parse_ip_maybe_cidr(part)
                    .ok_or_else(|| invalid_env(format!("CNI_ARGS IP={part:?} is not an IP address")))?;
                requested_ips.push(a);
            }
        }
        requested_ips.dedup();

        Ok(PluginConf {
            cni_version,
            name,
            subnet_file: raw.subnet_file.unwrap_or_else(|| DEFAULT_SUBNET_FILE.into()),
            data_dir: raw.data_dir.unwrap_or_else(|| DEFAULT_DATA_DIR.into()),
            bridge,
            mtu: delegate.mtu,
            ip_masq: delegate.ip_masq,
            ip_masq_backend,
            hairpin: delegate.hairpin_mode.unwrap_or(false),
            is_gateway,
            is_default_gateway,
            force_address: delegate.force_address.unwrap_or(false),
            promisc: delegate.promisc_mode.unwrap_or(false),
            ipam_data_dir: ipam.data_dir.unwrap_or_else(|| PathBuf::from(DEFAULT_IPAM_DATA_DIR)),
            ipam_routes,
            dns: delegate.dns.or(raw.dns).unwrap_or_default(),
            requested_ips,
            prev_result: raw.prev_result.filter(|v| !v.is_null()),
            log_file: raw.log_file,
            valid_attachments: raw
                .valid_attachments
                .map(|l| l.into_iter().map(|a| (a.container_id, a.ifname)).collect()),
        })
    }

    /// The IPAM store directory of this network (host-local's layout).
    pub fn ipam_dir(&self) -> PathBuf {
        self.ipam_data_dir.join(&self.name)
    }

    /// Compares versions like "0.4.0" >= "0.3.1".
    pub fn version_at_least(&self, min: &str) -> bool {
        version_tuple(&self.cni_version) >= version_tuple(min)
    }
}

pub fn version_tuple(v: &str) -> (u32, u32, u32) {
    let mut it = v.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    (it.next().unwrap_or(0), it.next().unwrap_or(0), it.next().unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> Env {
        Env { container_id: "c1".into(), netns: Some("/x".into()), ifname: "eth0".into(), args: vec![] }
    }

    #[test]
    fn upstream_conflist_entry_parses() {
        let c = PluginConf::parse(
            br#"{"cniVersion":"0.3.1","name":"cbr0","type":"flannel","delegate":{"hairpinMode":true,"isDefaultGateway":true}}"#,
            &env(),
            |_| {},
        )
        .unwrap();
        assert!(c.hairpin && c.is_default_gateway && c.is_gateway);
        assert_eq!(c.bridge, "cni0");
        assert_eq!(c.subnet_file, PathBuf::from(DEFAULT_SUBNET_FILE));
        assert_eq!(c.ipam_dir(), PathBuf::from("/var/lib/cni/networks/cbr0"));
        assert_eq!(c.ip_masq, None);
    }

    #[test]
    fn errors_name_the_field() {
        let e = PluginConf::parse(br#"{"cniVersion":"0.3.1","name":"n","delegate":{"mtu":"big"}}"#, &env(), |_| {})
            .unwrap_err();
        assert_eq!(e.code, code::INVALID_CONFIG);
        assert!(e.msg.contains("delegate.mtu"), "{e}");
        let e = PluginConf::parse(
            br#"{"cniVersion":"0.3.1","name":"n","ipam":{"routes":[{"dst":"nope"}]}}"#,
            &env(),
            |_| {},
        )
        .unwrap_err();
        assert!(e.msg.contains("ipam.routes[0].dst"), "{e}");
        let e = PluginConf::parse(br#"{"cniVersion":"9.9.9","name":"n"}"#, &env(), |_| {}).unwrap_err();
        assert_eq!(e.code, code::INCOMPATIBLE_VERSION);
        let e = PluginConf::parse(b"{not json", &env(), |_| {}).unwrap_err();
        assert_eq!(e.code, code::DECODE_FAILURE);
        let e = PluginConf::parse(br#"{"cniVersion":"0.3.1","name":"../etc"}"#, &env(), |_| {}).unwrap_err();
        assert_eq!(e.code, code::INVALID_CONFIG);
    }

    #[test]
    fn typed_fields_name_their_path_and_unknown_delegate_keys_warn() {
        let parse = |text: &str| {
            let mut warnings = Vec::new();
            PluginConf::parse(text.as_bytes(), &env(), |w| warnings.push(w)).map(|c| (c, warnings))
        };
        let e =
            parse(r#"{"cniVersion":"1.0.0","name":"n","runtimeConfig":{"ips":["10.1.1.1/24","nope"]}}"#).unwrap_err();
        assert_eq!(e.code, code::INVALID_CONFIG);
        assert!(e.msg.starts_with("runtimeConfig.ips[1]: \"nope\" is not an IP address"), "{e}");
        let e =
            parse(r#"{"cniVersion":"1.0.0","name":"n","cni.dev/valid-attachments":[{"ifname":"eth0"}]}"#).unwrap_err();
        assert!(e.msg.starts_with("cni.dev/valid-attachments[0]: missing field `containerID`"), "{e}");
        let e =
            parse(r#"{"cniVersion":"1.0.0","name":"n","delegate":{"ipam":{"routes":[{"dst":"10.0.0.0/8","gw":1}]}}}"#)
                .unwrap_err();
        assert!(e.msg.starts_with("delegate.ipam.routes[0].gw: "), "{e}");
        let e = parse(r#"{"cniVersion":"1.0.0","name":"n","delegate":{"ipMasqBackend":"pf"}}"#).unwrap_err();
        assert!(e.msg.starts_with("delegate.ipMasqBackend: \"pf\" is not supported"), "{e}");
        let (c, _) = parse(r#"{"cniVersion":"1.0.0","name":"n","delegate":{"ipMasqBackend":"nftables"}}"#).unwrap();
        assert_eq!(c.ip_masq_backend, Some(Mode::Nftables));
        let e = parse(r#"{"cniVersion":"1.0.0","name":"n","delegate":{"mtu":20}}"#).unwrap_err();
        assert!(e.msg.contains("delegate.mtu: expected an MTU between 68 and 65535, got 20"), "{e}");

        let (c, warnings) = parse(
            r#"{"cniVersion":"1.0.0","name":"n","capabilities":{"ips":true},"runtimeConfig":{"ips":["10.1.1.1/24"],"portMappings":[]},
                "ipam":{"dataDir":"/top","routes":[{"dst":"10.9.0.1/16"}]},
                "delegate":{"name":"n","cniVersion":"1.0.0","vlan":3,"ipam":{"dataDir":"/d"},"isDefaultGateway":true}}"#,
        )
        .unwrap();
        assert_eq!(warnings, ["delegate.vlan is not supported and is ignored"]);
        assert_eq!(c.requested_ips, ["10.1.1.1".parse::<IpAddr>().unwrap()]);
        assert_eq!(c.ipam_data_dir, PathBuf::from("/d"));
        assert_eq!(c.ipam_routes, [RouteSpec { dst: "10.9.0.0/16".parse().unwrap(), gw: None }]);
        assert!(c.is_gateway);
    }

    #[test]
    fn env_validation() {
        let get = |k: &str| match k {
            "CNI_CONTAINERID" => Some("../../etc/passwd".to_string()),
            "CNI_IFNAME" => Some("eth0".to_string()),
            "CNI_NETNS" => Some("/var/run/netns/x".to_string()),
            _ => None,
        };
        assert_eq!(Env::load(Command::Add, get).unwrap_err().code, code::INVALID_ENV);
        assert!(validate_ifname("this-name-is-too-long").is_err());
        assert!(validate_ifname("eth0").is_ok());
        assert!(validate_ifname("a/b").is_err());
    }
}
