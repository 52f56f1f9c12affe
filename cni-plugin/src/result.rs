//! The CNI result, printed in the `cniVersion` the runtime asked for and read
//! back as `prevResult` for CHECK.

use std::net::IpAddr;

use flannel_shared::IpNet;
use serde_json::{Value, json};

use crate::conf::Dns;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub mac: String,
    pub mtu: Option<u32>,
    pub sandbox: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpConfig {
    /// The address with the subnet's prefix length.
    pub address: IpNet,
    pub gateway: Option<IpAddr>,
    /// Index into `interfaces`.
    pub interface: Option<usize>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteResult {
    pub dst: IpNet,
    pub gw: Option<IpAddr>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CniResult {
    pub interfaces: Vec<Interface>,
    pub ips: Vec<IpConfig>,
    pub routes: Vec<RouteResult>,
    pub dns: Dns,
}

impl CniResult {
    /// Serializes for `version`: 0.3.x/0.4.0 carry `"version"` on each IP, 1.x do not;
    /// 1.1.0 adds interface MTUs.
    pub fn to_json(&self, version: &str) -> Value {
        let legacy = version.starts_with("0.");
        let v11 = version == "1.1.0";
        let interfaces: Vec<Value> = self
            .interfaces
            .iter()
            .map(|i| {
                let mut o = json!({"name": i.name, "mac": i.mac});
                if let Some(s) = &i.sandbox {
                    o["sandbox"] = s.clone().into();
                }
                if let (true, Some(m)) = (v11, i.mtu) {
                    o["mtu"] = m.into();
                }
                o
            })
            .collect();
        let ips: Vec<Value> = self
            .ips
            .iter()
            .map(|ip| {
                let mut o = json!({"address": ip.address.to_string()});
                if legacy {
                    o["version"] = if ip.address.is_ipv4() { "4" } else { "6" }.into();
                }
                if let Some(i) = ip.interface {
                    o["interface"] = i.into();
                }
                if let Some(g) = ip.gateway {
                    o["gateway"] = g.to_string().into();
                }
                o
            })
            .collect();
        let routes: Vec<Value> = self
            .routes
            .iter()
            .map(|r| {
                let mut o = json!({"dst": r.dst.to_string()});
                if let Some(g) = r.gw {
                    o["gw"] = g.to_string().into();
                }
                o
            })
            .collect();
        let mut out = json!({"cniVersion": version, "interfaces": interfaces, "ips": ips});
        if !routes.is_empty() {
            out["routes"] = routes.into();
        }
        out["dns"] = serde_json::to_value(&self.dns).unwrap_or_else(|_| json!({}));
        out
    }

    /// Reads a result of any supported version (as found in `prevResult`).
    pub fn from_json(v: &Value) -> Result<CniResult, String> {
        let o = v.as_object().ok_or("prevResult is not an object")?;
        let mut r = CniResult::default();
        for (i, it) in o.get("interfaces").and_then(Value::as_array).into_iter().flatten().enumerate() {
            let name =
                it.get("name").and_then(Value::as_str).ok_or(format!("prevResult.interfaces[{i}].name missing"))?;
            r.interfaces.push(Interface {
                name: name.to_string(),
                mac: it.get("mac").and_then(Value::as_str).unwrap_or_default().to_string(),
                mtu: it.get("mtu").and_then(Value::as_u64).map(|m| m as u32),
                sandbox: it.get("sandbox").and_then(Value::as_str).filter(|s| !s.is_empty()).map(String::from),
            });
        }
        for (i, it) in o.get("ips").and_then(Value::as_array).into_iter().flatten().enumerate() {
            let addr = req_net(it, "address", &format!("prevResult.ips[{i}]"))?;
            let gateway = opt_ip(it, "gateway", &format!("prevResult.ips[{i}]"))?;
            r.ips.push(IpConfig {
                address: addr,
                gateway,
                interface: it.get("interface").and_then(Value::as_u64).map(|x| x as usize),
            });
        }
        for (i, it) in o.get("routes").and_then(Value::as_array).into_iter().flatten().enumerate() {
            let dst = req_net(it, "dst", &format!("prevResult.routes[{i}]"))?;
            let gw = opt_ip(it, "gw", &format!("prevResult.routes[{i}]"))?;
            r.routes.push(RouteResult { dst, gw });
        }
        if let Some(d) = o.get("dns") {
            r.dns = serde_json::from_value(d.clone()).unwrap_or_default();
        }
        Ok(r)
    }
}

/// A required CIDR field of a result entry.
fn req_net(entry: &Value, key: &str, ctx: &str) -> Result<IpNet, String> {
    entry
        .get(key)
        .and_then(Value::as_str)
        .and_then(|s| s.parse::<IpNet>().ok())
        .ok_or_else(|| format!("{ctx}.{key} missing or invalid"))
}

/// An optional IP field of a result entry.
fn opt_ip(entry: &Value, key: &str, ctx: &str) -> Result<Option<IpAddr>, String> {
    entry.get(key).and_then(Value::as_str).map(|g| g.parse().map_err(|_| format!("{ctx}.{key} invalid"))).transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CniResult {
        CniResult {
            interfaces: vec![
                Interface { name: "cni0".into(), mac: "0a:58:0a:f4:01:01".into(), mtu: Some(1450), sandbox: None },
                Interface {
                    name: "eth0".into(),
                    mac: "aa:bb:cc:dd:ee:ff".into(),
                    mtu: Some(1450),
                    sandbox: Some("/var/run/netns/p".into()),
                },
            ],
            ips: vec![IpConfig {
                address: "10.244.1.2/24".parse().unwrap(),
                gateway: Some("10.244.1.1".parse().unwrap()),
                interface: Some(1),
            }],
            routes: vec![RouteResult { dst: "0.0.0.0/0".parse().unwrap(), gw: Some("10.244.1.1".parse().unwrap()) }],
            dns: Dns::default(),
        }
    }

    #[test]
    fn every_version_round_trips() {
        for v in crate::conf::SUPPORTED_VERSIONS {
            let j = sample().to_json(v);
            assert_eq!(j["cniVersion"], *v);
            assert_eq!(j["ips"][0].get("version").is_some(), v.starts_with("0."), "{v}: {j}");
            let mut back = CniResult::from_json(&j).unwrap();
            if *v != "1.1.0" {
                for i in &mut back.interfaces {
                    i.mtu = Some(1450);
                }
            }
            assert_eq!(back, sample(), "{v}");
        }
    }
}
