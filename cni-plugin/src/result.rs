//! The CNI result, printed in the `cniVersion` the runtime asked for and read
//! back as `prevResult` for CHECK. Both directions go through the typed wire
//! structs at the bottom; decoding errors name the key path
//! (`prevResult.ips[0].address`).

use std::net::IpAddr;

use flannel_shared::IpNet;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::conf::Dns;
use crate::decode;

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
    /// The result for `version`: 0.3.x/0.4.0 carry `"version"` on each IP, 1.x
    /// do not; 1.1.0 adds interface MTUs.
    pub fn to_wire<'a>(&'a self, version: &'a str) -> WireResult<'a> {
        let legacy = version.starts_with("0.");
        let v11 = version == "1.1.0";
        WireResult {
            cni_version: version,
            interfaces: self
                .interfaces
                .iter()
                .map(|i| WireInterface {
                    name: i.name.clone(),
                    mac: i.mac.clone(),
                    mtu: i.mtu.filter(|_| v11),
                    sandbox: i.sandbox.clone(),
                })
                .collect(),
            ips: self
                .ips
                .iter()
                .map(|ip| WireIp {
                    version: legacy.then(|| if ip.address.is_ipv4() { "4" } else { "6" }.to_string()),
                    address: ip.address,
                    gateway: ip.gateway,
                    interface: ip.interface,
                })
                .collect(),
            routes: self.routes.iter().map(|r| WireRoute { dst: r.dst, gw: r.gw }).collect(),
            dns: &self.dns,
        }
    }

    /// The result as JSON text for `version`.
    pub fn to_json(&self, version: &str) -> String {
        serde_json::to_string(&self.to_wire(version)).expect("a result always serializes")
    }

    /// Reads a result of any supported version (as found in `prevResult`).
    pub fn from_json(v: &Value) -> Result<CniResult, String> {
        if !v.is_object() {
            return Err("prevResult: expected an object".into());
        }
        let w: PrevResult = decode::typed(v.clone(), "prevResult", |_| {})?;
        Ok(CniResult {
            interfaces: w
                .interfaces
                .into_iter()
                .map(|i| Interface {
                    name: i.name,
                    mac: i.mac,
                    mtu: i.mtu,
                    sandbox: i.sandbox.filter(|s| !s.is_empty()),
                })
                .collect(),
            ips: w
                .ips
                .into_iter()
                .map(|ip| IpConfig { address: ip.address, gateway: ip.gateway, interface: ip.interface })
                .collect(),
            routes: w.routes.into_iter().map(|r| RouteResult { dst: r.dst, gw: r.gw }).collect(),
            // A runtime's odd dns block in prevResult is not worth failing CHECK over.
            dns: w.dns.and_then(|d| serde_json::from_value(d).ok()).unwrap_or_default(),
        })
    }
}

/// The result on the wire, fields in the spec's order.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WireResult<'a> {
    cni_version: &'a str,
    interfaces: Vec<WireInterface>,
    ips: Vec<WireIp>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    routes: Vec<WireRoute>,
    dns: &'a Dns,
}

#[derive(Debug, Serialize, Deserialize)]
struct WireInterface {
    name: String,
    #[serde(default)]
    mac: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sandbox: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct WireIp {
    /// 0.3.x/0.4.0 only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    version: Option<String>,
    address: IpNet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    gateway: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    interface: Option<usize>,
}

#[derive(Debug, Serialize, Deserialize)]
struct WireRoute {
    dst: IpNet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    gw: Option<IpAddr>,
}

/// A result of any version as read back; unknown keys are ignored.
#[derive(Debug, Deserialize)]
struct PrevResult {
    #[serde(default)]
    interfaces: Vec<WireInterface>,
    #[serde(default)]
    ips: Vec<WireIp>,
    #[serde(default)]
    routes: Vec<WireRoute>,
    #[serde(default)]
    dns: Option<Value>,
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
            let j: Value = serde_json::from_str(&sample().to_json(v)).unwrap();
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

    #[test]
    fn keys_print_in_the_spec_order() {
        let j = sample().to_json("1.1.0");
        let at = |k: &str| j.find(&format!("\"{k}\"")).unwrap_or_else(|| panic!("{k} missing in {j}"));
        assert!(at("cniVersion") < at("interfaces") && at("interfaces") < at("ips"), "{j}");
        assert!(at("ips") < at("routes") && at("routes") < at("dns"), "{j}");
    }

    #[test]
    fn a_bad_prev_result_names_the_key() {
        let mut j: Value = serde_json::from_str(&sample().to_json("1.0.0")).unwrap();
        j["ips"][0]["address"] = "10.244.1.300/24".into();
        let e = CniResult::from_json(&j).unwrap_err();
        assert!(e.starts_with("prevResult.ips[0].address: "), "{e}");
        j["ips"][0]["address"] = "10.244.1.3/24".into();
        j["routes"][0]["gw"] = 7.into();
        let e = CniResult::from_json(&j).unwrap_err();
        assert!(e.starts_with("prevResult.routes[0].gw: "), "{e}");
        j["routes"][0]["gw"] = "10.244.1.1".into();
        j["interfaces"][1].as_object_mut().unwrap().remove("name");
        let e = CniResult::from_json(&j).unwrap_err();
        assert!(e.starts_with("prevResult.interfaces[1]: missing field `name`"), "{e}");
    }
}
