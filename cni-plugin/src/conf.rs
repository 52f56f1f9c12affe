//! The CNI environment and the network configuration on stdin.
//!
//! Accepts upstream flannel's conflist entry unchanged:
//! `{"type":"flannel","delegate":{"hairpinMode":true,"isDefaultGateway":true}}`,
//! plus `subnetFile`, `dataDir`, the delegate keys upstream forwards to the
//! bridge plugin, the `ipam` object (`dataDir`, `routes`) and `runtimeConfig`.
//! Fields are read by hand from JSON so every error names the offending key.

use std::net::IpAddr;
use std::path::PathBuf;

use flannel_shared::IpNet;
use serde_json::{Map, Value};

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

fn get_str(obj: &Map<String, Value>, key: &str, ctx: &str) -> Result<Option<String>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(cfg_err(format!("{ctx}{key}: expected a string, got {other}"))),
    }
}

fn get_bool(obj: &Map<String, Value>, key: &str, ctx: &str) -> Result<Option<bool>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(cfg_err(format!("{ctx}{key}: expected true or false, got {other}"))),
    }
}

fn get_obj<'a>(obj: &'a Map<String, Value>, key: &str, ctx: &str) -> Result<Option<&'a Map<String, Value>>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(m)) => Ok(Some(m)),
        Some(other) => Err(cfg_err(format!("{ctx}{key}: expected an object, got {other}"))),
    }
}

fn parse_ip_maybe_cidr(s: &str) -> Option<IpAddr> {
    s.parse::<IpAddr>().ok().or_else(|| s.parse::<IpNet>().ok().map(|n| n.addr()))
}

/// Delegate keys the bridge plugin understands that this plugin implements.
const DELEGATE_KEYS: &[&str] = &[
    "type",
    "name",
    "cniVersion",
    "bridge",
    "mtu",
    "ipMasq",
    "hairpinMode",
    "isGateway",
    "isDefaultGateway",
    "forceAddress",
    "promiscMode",
    "ipam",
    "dns",
];

impl PluginConf {
    /// Parses the network configuration. `warn` receives non-fatal notes.
    pub fn parse(bytes: &[u8], env: &Env, mut warn: impl FnMut(String)) -> Result<PluginConf> {
        let root: Value = serde_json::from_slice(bytes).map_err(|e| {
            CniError::new(code::DECODE_FAILURE, "failed to decode the network configuration")
                .with_details(e.to_string())
        })?;
        let top = root
            .as_object()
            .ok_or_else(|| CniError::new(code::DECODE_FAILURE, "the network configuration is not a JSON object"))?;

        let cni_version = get_str(top, "cniVersion", "")?.unwrap_or_default();
        if !SUPPORTED_VERSIONS.contains(&cni_version.as_str()) {
            return Err(CniError::new(
                code::INCOMPATIBLE_VERSION,
                format!("cniVersion {cni_version:?} is not supported (supported: {})", SUPPORTED_VERSIONS.join(", ")),
            ));
        }
        let name = get_str(top, "name", "")?.ok_or_else(|| cfg_err("name is required"))?;
        validate_network_name(&name)?;
        if let Some(t) = get_str(top, "type", "")?
            && t != "flannel"
        {
            warn(format!("type is {t:?}; treating this configuration as flannel's"));
        }

        let delegate = get_obj(top, "delegate", "")?.cloned().unwrap_or_default();
        let d = "delegate.";
        if let Some(t) = get_str(&delegate, "type", d)?
            && t != "bridge"
        {
            return Err(CniError::new(
                code::UNSUPPORTED_FIELD,
                format!("delegate.type {t:?} is not supported: this plugin implements the bridge delegate itself"),
            ));
        }
        for k in delegate.keys() {
            if !DELEGATE_KEYS.contains(&k.as_str()) {
                warn(format!("delegate.{k} is not supported and is ignored"));
            }
        }
        let mtu = match delegate.get("mtu") {
            None | Some(Value::Null) => None,
            Some(v) => Some(
                v.as_u64()
                    .filter(|m| (68..=65535).contains(m))
                    .map(|m| m as u32)
                    .ok_or_else(|| cfg_err(format!("delegate.mtu: expected an MTU between 68 and 65535, got {v}")))?,
            ),
        };
        let bridge = get_str(&delegate, "bridge", d)?.unwrap_or_else(|| DEFAULT_BRIDGE.to_string());
        validate_ifname(&bridge)
            .map_err(|_| cfg_err(format!("delegate.bridge {bridge:?} is not a valid interface name")))?;
        let is_default_gateway = get_bool(&delegate, "isDefaultGateway", d)?.unwrap_or(false);
        let is_gateway = get_bool(&delegate, "isGateway", d)?.unwrap_or(true) || is_default_gateway;

        // Upstream starts from the top-level ipam object and lets the delegate's override it.
        let mut ipam = get_obj(top, "ipam", "")?.cloned().unwrap_or_default();
        if let Some(dipam) = get_obj(&delegate, "ipam", d)? {
            ipam.extend(dipam.clone());
        }
        if let Some(t) = get_str(&ipam, "type", "ipam.")?
            && t != "host-local"
        {
            return Err(CniError::new(
                code::UNSUPPORTED_FIELD,
                format!("ipam.type {t:?} is not supported: this plugin allocates host-local style itself"),
            ));
        }
        let ipam_data_dir = get_str(&ipam, "dataDir", "ipam.")?
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_IPAM_DATA_DIR));
        let mut ipam_routes = Vec::new();
        match ipam.get("routes") {
            None | Some(Value::Null) => {}
            Some(Value::Array(routes)) => {
                for (i, r) in routes.iter().enumerate() {
                    let ctx = format!("ipam.routes[{i}].");
                    let r = r.as_object().ok_or_else(|| cfg_err(format!("ipam.routes[{i}]: expected an object")))?;
                    let dst = get_str(r, "dst", &ctx)?.ok_or_else(|| cfg_err(format!("{ctx}dst is required")))?;
                    let dst: IpNet = dst.parse().map_err(|e| cfg_err(format!("{ctx}dst: {e}")))?;
                    let gw = match get_str(r, "gw", &ctx)? {
                        None => None,
                        Some(g) => Some(
                            g.parse::<IpAddr>().map_err(|_| cfg_err(format!("{ctx}gw: {g:?} is not an IP address")))?,
                        ),
                    };
                    ipam_routes.push(RouteSpec { dst: dst.network(), gw });
                }
            }
            Some(other) => return Err(cfg_err(format!("ipam.routes: expected an array, got {other}"))),
        }

        let dns_value = delegate.get("dns").or_else(|| top.get("dns"));
        let dns = match dns_value {
            None | Some(Value::Null) => Dns::default(),
            Some(v) => serde_json::from_value(v.clone()).map_err(|e| cfg_err(format!("dns: {e}")))?,
        };

        let mut requested_ips = Vec::new();
        let runtime = get_obj(top, "runtimeConfig", "")?;
        let args_ips =
            get_obj(top, "args", "")?.and_then(|a| a.get("cni")).and_then(|c| c.as_object()).and_then(|c| c.get("ips"));
        for (ctx, list) in [("runtimeConfig.ips", runtime.and_then(|r| r.get("ips"))), ("args.cni.ips", args_ips)] {
            match list {
                None | Some(Value::Null) => {}
                Some(Value::Array(items)) => {
                    for it in items {
                        let ip = it
                            .as_str()
                            .and_then(parse_ip_maybe_cidr)
                            .ok_or_else(|| cfg_err(format!("{ctx}: {it} is not an IP address")))?;
                        requested_ips.push(ip);
                    }
                }
                Some(other) => return Err(cfg_err(format!("{ctx}: expected an array, got {other}"))),
            }
        }
        if let Some(ip) = env.arg("IP") {
            for part in ip.split(',') {
                let a = parse_ip_maybe_cidr(part)
                    .ok_or_else(|| invalid_env(format!("CNI_ARGS IP={part:?} is not an IP address")))?;
                requested_ips.push(a);
            }
        }
        requested_ips.dedup();

        let valid_attachments = match top.get("cni.dev/valid-attachments") {
            None | Some(Value::Null) => None,
            Some(Value::Array(items)) => {
                let mut out = Vec::new();
                for (i, it) in items.iter().enumerate() {
                    let ctx = format!("cni.dev/valid-attachments[{i}].");
                    let o = it
                        .as_object()
                        .ok_or_else(|| cfg_err(format!("cni.dev/valid-attachments[{i}]: expected an object")))?;
                    let id = get_str(o, "containerID", &ctx)?
                        .ok_or_else(|| cfg_err(format!("{ctx}containerID is required")))?;
                    let ifname =
                        get_str(o, "ifname", &ctx)?.ok_or_else(|| cfg_err(format!("{ctx}ifname is required")))?;
                    out.push((id, ifname));
                }
                Some(out)
            }
            Some(other) => return Err(cfg_err(format!("cni.dev/valid-attachments: expected an array, got {other}"))),
        };

        Ok(PluginConf {
            cni_version,
            name,
            subnet_file: get_str(top, "subnetFile", "")?
                .map(PathBuf::from)
                .unwrap_or_else(|| DEFAULT_SUBNET_FILE.into()),
            data_dir: get_str(top, "dataDir", "")?.map(PathBuf::from).unwrap_or_else(|| DEFAULT_DATA_DIR.into()),
            bridge,
            mtu,
            ip_masq: get_bool(&delegate, "ipMasq", d)?,
            hairpin: get_bool(&delegate, "hairpinMode", d)?.unwrap_or(false),
            is_gateway,
            is_default_gateway,
            force_address: get_bool(&delegate, "forceAddress", d)?.unwrap_or(false),
            promisc: get_bool(&delegate, "promiscMode", d)?.unwrap_or(false),
            ipam_data_dir,
            ipam_routes,
            dns,
            requested_ips,
            prev_result: top.get("prevResult").filter(|v| !v.is_null()).cloned(),
            log_file: get_str(top, "logFile", "")?.map(PathBuf::from),
            valid_attachments,
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
