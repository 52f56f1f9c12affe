//! net-conf.json: the cluster network configuration (a file in Kubernetes
//! mode, `<prefix>/config` in etcd). Decoded like upstream's Go decoder:
//! keys match case-insensitively (`VNI`, `vni`, `Vni`); defaults as upstream.
//! Every error names the field at fault.

use std::net::IpAddr;

use serde_json::{Map, Value};

use crate::ip::IpNet;

/// The `Backend` object of net-conf.json: its `Type` (`vxlan` when absent) and
/// the rest of its keys, lower-cased, for the backend of that type to read
/// (flanneld's backend registry: each backend decodes its own config type).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backend {
    pub kind: String,
    keys: Map<String, Value>,
}

impl Backend {
    /// A `Backend` object as net-conf.json would hold it (keys in any case).
    pub fn new(kind: &str, keys: &Map<String, Value>) -> Backend {
        let mut keys = fold(keys);
        keys.remove("type");
        Backend { kind: kind.to_string(), keys }
    }

    /// A whole number `<= max`; `name` is the field as errors name it (`Backend.VNI`).
    pub fn uint(&self, key: &str, name: &str, max: u64) -> Result<Option<u64>, NetConfigError> {
        get_uint(&self.keys, key, name, max)
    }

    pub fn bool(&self, key: &str, name: &str) -> Result<Option<bool>, NetConfigError> {
        get_bool(&self.keys, key, name)
    }

    pub fn string(&self, key: &str, name: &str) -> Result<Option<&str>, NetConfigError> {
        match self.keys.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(err(name, format!("expected a string, got {v}"))),
        }
    }

    /// Tells `warn` of every key outside `known` (lower-case): it does not apply to this Type.
    pub fn warn_unknown(&self, known: &[&str], warn: &mut dyn FnMut(String)) {
        for k in self.keys.keys().filter(|k| !known.contains(&k.as_str())) {
            warn(format!("network config: Backend.{k} does not apply to {} and is ignored", self.kind));
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Family {
    pub network: IpNet,
    pub subnet_len: u8,
    /// First and last subnet that may be leased (network addresses).
    pub subnet_min: IpAddr,
    pub subnet_max: IpAddr,
}

impl Family {
    /// The subnet (network form) starting at `addr`.
    pub fn subnet_at(&self, addr: IpAddr) -> IpNet {
        IpNet::new(addr, self.subnet_len).expect("valid length").network()
    }

    /// Every leasable subnet, SubnetMin to SubnetMax.
    pub fn subnets(&self) -> impl Iterator<Item = IpNet> + '_ {
        let step = 1u128 << (self.network.host_bits() - (self.subnet_len - self.network.prefix())) as u32;
        let first = self.network.offset_of(self.subnet_min).unwrap_or(0);
        let last = self.network.offset_of(self.subnet_max).unwrap_or(0);
        let count = if last >= first { (last - first) / step + 1 } else { 0 };
        (0..count).map(move |i| self.subnet_at(self.network.nth(first + i * step).expect("inside network")))
    }

    /// Whether `subnet` is a leasable subnet of this family.
    pub fn allows(&self, subnet: &IpNet) -> bool {
        subnet.prefix() == self.subnet_len
            && self.network.contains_net(subnet)
            && self.network.offset_of(subnet.network_addr()) >= self.network.offset_of(self.subnet_min)
            && self.network.offset_of(subnet.network_addr()) <= self.network.offset_of(self.subnet_max)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    pub ipv4: Option<Family>,
    pub ipv6: Option<Family>,
    pub backend: Backend,
    /// `EnableNFTables`: write the rules as nftables tables instead of iptables chains.
    pub enable_nftables: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("network config: {field}: {msg}")]
pub struct NetConfigError {
    pub field: String,
    pub msg: String,
}

impl NetConfigError {
    pub fn new(field: &str, msg: impl Into<String>) -> NetConfigError {
        NetConfigError { field: field.to_string(), msg: msg.into() }
    }
}

fn err(field: &str, msg: impl Into<String>) -> NetConfigError {
    NetConfigError::new(field, msg)
}

/// Lower-cases object keys (one level); on duplicates differing only in case the last wins, as in Go.
fn fold(obj: &Map<String, Value>) -> Map<String, Value> {
    obj.iter().map(|(k, v)| (k.to_ascii_lowercase(), v.clone())).collect()
}

fn get_bool(o: &Map<String, Value>, key: &str, name: &str) -> Result<Option<bool>, NetConfigError> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => Err(err(name, format!("expected true or false, got {v}"))),
    }
}

fn get_uint(o: &Map<String, Value>, key: &str, name: &str, max: u64) -> Result<Option<u64>, NetConfigError> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .filter(|n| *n <= max)
            .map(Some)
            .ok_or_else(|| err(name, format!("expected a whole number from 0 to {max}, got {v}"))),
    }
}

fn get_net(o: &Map<String, Value>, key: &str, name: &str) -> Result<Option<IpNet>, NetConfigError> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => s.parse::<IpNet>().map(Some).map_err(|e| err(name, e.to_string())),
        Some(v) => Err(err(name, format!("expected a CIDR string, got {v}"))),
    }
}

fn get_ip(o: &Map<String, Value>, key: &str, name: &str) -> Result<Option<IpAddr>, NetConfigError> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => {
            s.parse::<IpAddr>().map(Some).map_err(|_| err(name, format!("{s:?} is not an IP address")))
        }
        Some(v) => Err(err(name, format!("expected an IP address string, got {v}"))),
    }
}

const KNOWN_TOP: &[&str] = &[
    "network",
    "subnetlen",
    "subnetmin",
    "subnetmax",
    "enableipv4",
    "enableipv6",
    "ipv6network",
    "ipv6subnetlen",
    "ipv6subnetmin",
    "ipv6subnetmax",
    "backend",
    "enablenftables",
];

#[allow(clippy::too_many_arguments)]
fn family(
    network: Option<IpNet>,
    len: Option<u64>,
    min: Option<IpAddr>,
    max: Option<IpAddr>,
    names: [&str; 4],
    v4: bool,
) -> Result<Family, NetConfigError> {
    let [n_net, n_len, n_min, n_max] = names;
    let network = network.ok_or_else(|| err(n_net, "is required"))?;
    if network.is_ipv4() != v4 {
        return Err(err(n_net, format!("{network} is not an IPv{} network", if v4 { 4 } else { 6 })));
    }
    let network = network.network();
    let width: u8 = if v4 { 32 } else { 128 };
    let subnet_len = match len {
        Some(l) => {
            let l = l as u8;
            let limit = if v4 { 30 } else { 126 };
            if l > limit {
                return Err(err(n_len, format!("{l} is too long: at most /{limit}")));
            }
            if l < network.prefix() + 2 {
                return Err(err(n_len, format!("/{l} leaves room for fewer than four subnets in {network}")));
            }
            l
        }
        None if v4 => {
            if network.prefix() > 28 {
                return Err(err(n_net, format!("{network} is too small: the smallest useful network is a /28")));
            }
            if network.prefix() <= 22 { 24 } else { network.prefix() + 2 }
        }
        None => {
            if network.prefix() > 62 {
                return Err(err(
                    n_net,
                    format!("{network} is too small: IPv6 networks need a prefix of /62 or shorter"),
                ));
            }
            64.max(network.prefix() + 2)
        }
    };
    let sub_bits = (width - subnet_len) as u32;
    let size = if sub_bits >= 128 { u128::MAX } else { 1u128 << sub_bits };
    let subnets = 1u128 << ((subnet_len - network.prefix()) as u32).min(127);
    let check = |ip: Option<IpAddr>, name: &str, default_offset: u128| -> Result<IpAddr, NetConfigError> {
        match ip {
            None => Ok(network.nth(default_offset).expect("inside network")),
            Some(ip) => {
                let off =
                    network.offset_of(ip).ok_or_else(|| err(name, format!("{ip} is outside the network {network}")))?;
                if off % size != 0 {
                    return Err(err(name, format!("{ip} is not on a /{subnet_len} boundary")));
                }
                Ok(ip)
            }
        }
    };
    // The first subnet is skipped by default: its .0 would clash with the network address.
    let subnet_min = check(min, n_min, size)?;
    let subnet_max = check(max, n_max, (subnets - 1) * size)?;
    if network.offset_of(subnet_min) > network.offset_of(subnet_max) {
        return Err(err(n_min, format!("{subnet_min} is above SubnetMax {subnet_max}")));
    }
    Ok(Family { network, subnet_len, subnet_min, subnet_max })
}

impl NetConfig {
    /// Parses net-conf.json. `warn` receives notes on keys that are ignored.
    pub fn parse(text: &str, mut warn: impl FnMut(String)) -> Result<NetConfig, NetConfigError> {
        let root: Value = serde_json::from_str(text).map_err(|e| err("(document)", format!("not valid JSON: {e}")))?;
        let top = fold(root.as_object().ok_or_else(|| err("(document)", "expected a JSON object"))?);
        for k in top.keys() {
            if !KNOWN_TOP.contains(&k.as_str()) {
                warn(format!("network config: unknown key {k:?} is ignored"));
            }
        }
        let enable_v4 = get_bool(&top, "enableipv4", "EnableIPv4")?.unwrap_or(true);
        let enable_v6 = get_bool(&top, "enableipv6", "EnableIPv6")?.unwrap_or(false);
        if !enable_v4 && !enable_v6 {
            return Err(err("EnableIPv4", "both EnableIPv4 and EnableIPv6 are false: nothing to do"));
        }
        let ipv4 = if enable_v4 {
            Some(family(
                get_net(&top, "network", "Network")?,
                get_uint(&top, "subnetlen", "SubnetLen", 32)?,
                get_ip(&top, "subnetmin", "SubnetMin")?,
                get_ip(&top, "subnetmax", "SubnetMax")?,
                ["Network", "SubnetLen", "SubnetMin", "SubnetMax"],
                true,
            )?)
        } else {
            None
        };
        let ipv6 = if enable_v6 {
            Some(family(
                get_net(&top, "ipv6network", "IPv6Network")?,
                get_uint(&top, "ipv6subnetlen", "IPv6SubnetLen", 128)?,
                get_ip(&top, "ipv6subnetmin", "IPv6SubnetMin")?,
                get_ip(&top, "ipv6subnetmax", "IPv6SubnetMax")?,
                ["IPv6Network", "IPv6SubnetLen", "IPv6SubnetMin", "IPv6SubnetMax"],
                false,
            )?)
        } else {
            None
        };

        let backend = match top.get("backend") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(o)) => fold(o),
            Some(v) => return Err(err("Backend", format!("expected an object, got {v}"))),
        };
        let kind = match backend.get("type") {
            None | Some(Value::Null) => "vxlan",
            Some(Value::String(t)) => t.as_str(),
            Some(v) => return Err(err("Backend.Type", format!("expected a string, got {v}"))),
        };
        let backend = Backend::new(kind, &backend);
        let enable_nftables = get_bool(&top, "enablenftables", "EnableNFTables")?.unwrap_or(false);
        Ok(NetConfig { ipv4, ipv6, backend, enable_nftables })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<NetConfig, NetConfigError> {
        NetConfig::parse(s, |_| {})
    }

    #[test]
    fn upstream_defaults() {
        let c = parse(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#).unwrap();
        let f = c.ipv4.unwrap();
        assert_eq!(f.subnet_len, 24);
        assert_eq!(f.subnet_min.to_string(), "10.244.1.0");
        assert_eq!(f.subnet_max.to_string(), "10.244.255.0");
        assert_eq!(f.subnets().count(), 255);
        assert_eq!(c.backend.kind, "vxlan");
        assert_eq!(c.backend.uint("vni", "Backend.VNI", 99).unwrap(), None);
        assert!(!c.enable_nftables);
        // No Backend at all: vxlan.
        assert_eq!(parse(r#"{"Network":"10.244.0.0/16"}"#).unwrap().backend.kind, "vxlan");
        assert!(parse(r#"{"Network":"10.244.0.0/16","enableNFTables":true}"#).unwrap().enable_nftables);
        // A /24 network is split in four /26s.
        let small = parse(r#"{"Network":"10.5.5.0/24"}"#).unwrap().ipv4.unwrap();
        assert_eq!(small.subnet_len, 26);
        assert_eq!(
            small.subnets().map(|s| s.to_string()).collect::<Vec<_>>(),
            ["10.5.5.64/26", "10.5.5.128/26", "10.5.5.192/26"]
        );
    }

    #[test]
    fn keys_match_case_insensitively() {
        for key in ["VNI", "vni", "Vni"] {
            let c = parse(&format!(r#"{{"network":"10.1.0.0/16","BACKEND":{{"type":"vxlan","{key}":42}}}}"#)).unwrap();
            assert_eq!(c.backend.uint("vni", "Backend.VNI", 99).unwrap(), Some(42), "{key}");
        }
        let c = parse(r#"{"Network":"10.1.0.0/16","subnetlen":25,"Backend":{"Type":"host-gw"}}"#).unwrap();
        assert_eq!(c.ipv4.unwrap().subnet_len, 25);
        assert_eq!(c.backend.kind, "host-gw");
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (r#"{"Backend":{"Type":"vxlan"}}"#, "Network"),
            (r#"{"Network":"10.0.0.0/16","Backend":{"Type":7}}"#, "Backend.Type"),
            (r#"{"Network":"10.0.0.0/16","Backend":[1]}"#, "Backend"),
            (r#"{"Network":"10.0.0.0/16","SubnetLen":31}"#, "SubnetLen"),
            (r#"{"Network":"10.0.0.0/16","SubnetLen":17}"#, "SubnetLen"),
            (r#"{"Network":"10.0.0.0/16","SubnetMin":"10.9.0.0"}"#, "SubnetMin"),
            (r#"{"Network":"10.0.0.0/16","SubnetMax":"10.0.3.128"}"#, "SubnetMax"),
            (r#"{"Network":"10.0.0.0/30"}"#, "Network"),
            (r#"{"Network":"banana"}"#, "Network"),
            (r#"{"Network":"10.0.0.0/16","EnableIPv6":true}"#, "IPv6Network"),
            (r#"{"Network":"10.0.0.0/16","EnableNFTables":"yes"}"#, "EnableNFTables"),
            (r#"[1,2]"#, "(document)"),
        ];
        for (doc, field) in cases {
            let e = parse(doc).unwrap_err();
            assert_eq!(e.field, field, "{doc}: {e}");
        }
    }

    #[test]
    fn dual_stack_and_ranges() {
        let c = parse(
            r#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.10.0","SubnetMax":"10.244.17.0","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56"}"#,
        )
        .unwrap();
        let v4 = c.ipv4.unwrap();
        assert_eq!(v4.subnets().count(), 8);
        assert!(v4.allows(&"10.244.12.0/24".parse().unwrap()));
        assert!(!v4.allows(&"10.244.9.0/24".parse().unwrap()));
        assert!(!v4.allows(&"10.244.12.0/25".parse().unwrap()));
        let v6 = c.ipv6.unwrap();
        assert_eq!(v6.subnet_len, 64);
        assert_eq!(v6.subnet_min.to_string(), "fd00:10:244:1::");
    }
}
