//! Subnet leases as upstream flannel stores them in etcd:
//! key `<prefix>/subnets/10.244.1.0-24`, value
//! `{"PublicIP":"192.0.2.1","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"aa:.."}}`.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ip::IpNet;
use crate::netconf::Family;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseAttrs {
    #[serde(rename = "PublicIP")]
    pub public_ip: Ipv4Addr,
    /// Upstream writes `"PublicIPv6":null` on IPv4-only leases; so do we.
    #[serde(rename = "PublicIPv6", default)]
    pub public_ipv6: Option<Ipv6Addr>,
    #[serde(rename = "BackendType")]
    pub backend_type: String,
    /// Left out when null (host-gw, IPv6-only), as upstream's `omitempty` does; absent reads as null.
    #[serde(rename = "BackendData", default, skip_serializing_if = "Value::is_null")]
    pub backend_data: Value,
    /// Absent on IPv4-only leases; `null` (kept as `Some(Null)`, so a lease reads back
    /// equal to what was written) for host-gw dual-stack ones.
    #[serde(rename = "BackendV6Data", default, skip_serializing_if = "Option::is_none", deserialize_with = "present")]
    pub backend_v6_data: Option<Value>,
}

/// A field that is present, even as `null`, is `Some`.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

/// A peer's (or our own) lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub subnet: IpNet,
    /// The IPv6 subnet of a dual-stack lease.
    pub subnet6: Option<IpNet>,
    pub attrs: LeaseAttrs,
}

/// The IPv4 half of an IPv6-only lease, as upstream keys it (`0.0.0.0-0&fd00:..::-64`).
pub fn no_ipv4() -> IpNet {
    IpNet::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0).expect("0.0.0.0/0")
}

/// The subnet a lease is known by: its IPv4 subnet, or its IPv6 one when it has no IPv4 half.
pub fn lease_key(subnet: IpNet, subnet6: Option<IpNet>) -> IpNet {
    match subnet6 {
        Some(s6) if subnet.prefix() == 0 => s6,
        _ => subnet,
    }
}

impl Lease {
    /// See [`lease_key`].
    pub fn key(&self) -> IpNet {
        lease_key(self.subnet, self.subnet6)
    }

    /// Whether the lease has an IPv4 subnet (IPv6-only leases have `0.0.0.0/0`).
    pub fn has_ipv4(&self) -> bool {
        self.subnet.prefix() != 0
    }

    /// The backend data of one family (`v6`: `BackendV6Data`), decoded as `T`
    /// (each backend's own lease-data type); `None` when absent or of another shape.
    pub fn backend_data<T: serde::de::DeserializeOwned>(&self, v6: bool) -> Option<T> {
        let v = if v6 { self.attrs.backend_v6_data.as_ref()? } else { &self.attrs.backend_data };
        T::deserialize(v).ok()
    }
}

/// `10.244.1.0/24` -> `10.244.1.0-24`.
pub fn subnet_key(subnet: &IpNet) -> String {
    format!("{}-{}", subnet.network_addr(), subnet.prefix())
}

/// Upstream's key for a lease: `10.244.1.0-24`, or `10.244.1.0-24&fc00:0:0:1::-64` when dual-stack.
pub fn subnet_key_pair(subnet: &IpNet, subnet6: Option<&IpNet>) -> String {
    match subnet6 {
        Some(v6) => format!("{}&{}", subnet_key(subnet), subnet_key(v6)),
        None => subnet_key(subnet),
    }
}

fn parse_part(part: &str) -> Option<IpNet> {
    let (ip, len) = part.rsplit_once('-')?;
    let ip: IpAddr = ip.parse().ok()?;
    IpNet::new(ip, len.parse().ok()?).ok().filter(|n| n.network() == *n)
}

/// A key's last path segment -> (IPv4 subnet, IPv6 subnet of a dual-stack lease):
/// `10.244.1.0-24`, or upstream's dual-stack form `10.244.1.0-24&fc00:0:0:1::-64`.
pub fn parse_subnet_key_pair(key: &str) -> Option<(IpNet, Option<IpNet>)> {
    let last = key.rsplit('/').next()?;
    let (v4, v6) = match last.split_once('&') {
        Some((a, b)) => (a, Some(b)),
        None => (last, None),
    };
    let v4 = parse_part(v4).filter(IpNet::is_ipv4)?;
    let v6 = match v6 {
        Some(p) => Some(parse_part(p).filter(|n| !n.is_ipv4())?),
        None => None,
    };
    Some((v4, v6))
}

/// The IPv4 subnet of a lease key (either form); see [`parse_subnet_key_pair`].
pub fn parse_subnet_key(key: &str) -> Option<IpNet> {
    parse_subnet_key_pair(key).map(|(v4, _)| v4)
}

/// Picks a subnet to claim: `prefer` when it is still allowed and free, else a
/// pseudo-random one among the first 100 free subnets (so agents racing for
/// the same range rarely collide; the claim itself is a create-if-absent
/// transaction, so a collision only costs a retry).
pub fn choose_subnet(family: &Family, taken: &HashSet<IpNet>, prefer: Option<IpNet>, seed: u64) -> Option<IpNet> {
    if let Some(p) = prefer
        && family.allows(&p)
        && !taken.contains(&p)
    {
        return Some(p);
    }
    let free: Vec<IpNet> = family.subnets().filter(|s| !taken.contains(s)).take(100).collect();
    if free.is_empty() {
        return None;
    }
    // splitmix64: a cheap, well-mixed index from the seed.
    let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    Some(free[(z % free.len() as u64) as usize])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netconf::NetConfig;

    #[test]
    fn lease_json_is_upstreams() {
        // As upstream writes it (Documentation/reservations.md).
        let text = r#"{"PublicIP":"192.0.2.1","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:ff"}}"#;
        let attrs: LeaseAttrs = serde_json::from_str(text).unwrap();
        assert_eq!(serde_json::to_string(&attrs).unwrap(), text);
        // Older writers leave PublicIPv6 out.
        let old =
            r#"{"PublicIP":"192.0.2.1","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:ff"}}"#;
        assert_eq!(serde_json::from_str::<LeaseAttrs>(old).unwrap(), attrs);
        let l = Lease { subnet: "10.244.1.0/24".parse().unwrap(), subnet6: None, attrs };
        let data: serde_json::Map<String, Value> = l.backend_data(false).unwrap();
        assert_eq!(data["VtepMAC"], "aa:bb:cc:dd:ee:ff");
        assert_eq!(l.backend_data::<Value>(true), None);
        assert_eq!(subnet_key(&l.subnet), "10.244.1.0-24");
        assert_eq!(parse_subnet_key("/coreos.com/network/subnets/10.244.1.0-24"), Some(l.subnet));
        assert_eq!(parse_subnet_key("10.244.1.5-24"), None);
        assert_eq!(parse_subnet_key("garbage"), None);
        // Upstream's dual-stack keys: an IPv4-only agent still sees the peer's IPv4 subnet.
        let (v4, v6) = parse_subnet_key_pair("/coreos.com/network/subnets/10.244.1.0-24&fc00:0:0:1::-64").unwrap();
        assert_eq!((v4.to_string(), v6.unwrap().to_string()), ("10.244.1.0/24".into(), "fc00:0:0:1::/64".into()));
        assert_eq!(parse_subnet_key("10.244.1.0-24&fc00:0:0:1::-64"), Some(l.subnet));
        assert_eq!(subnet_key_pair(&v4, v6.as_ref()), "10.244.1.0-24&fc00:0:0:1::-64");
        assert_eq!(parse_subnet_key("10.244.1.0-24&fc00:0:0:1::5-64"), None);
        assert_eq!(parse_subnet_key("10.244.1.0-24&10.1.0.0-16"), None);
        // IPv6-only: upstream's key has an empty IPv4 half; the lease is known by its IPv6 subnet.
        let (v4, v6) = parse_subnet_key_pair("/coreos.com/network/subnets/0.0.0.0-0&fd00:10:244:3::-64").unwrap();
        assert_eq!((v4, lease_key(v4, v6).to_string()), (no_ipv4(), "fd00:10:244:3::/64".to_string()));
        assert_eq!(subnet_key_pair(&no_ipv4(), v6.as_ref()), "0.0.0.0-0&fd00:10:244:3::-64");
        let hostgw: LeaseAttrs =
            serde_json::from_str(r#"{"PublicIP":"192.0.2.2","BackendType":"host-gw","BackendData":null}"#).unwrap();
        assert_eq!(hostgw.backend_type, "host-gw");
        // A host-gw dual-stack lease reads back equal to what was written (an agent
        // comparing its own lease with the store's must not see a stranger's).
        let dual = LeaseAttrs {
            public_ipv6: Some("2001:db8::2".parse().unwrap()),
            backend_v6_data: Some(Value::Null),
            ..hostgw.clone()
        };
        let text = serde_json::to_string(&dual).unwrap();
        assert!(text.ends_with(r#""BackendType":"host-gw","BackendV6Data":null}"#), "{text}");
        // host-gw's null BackendData is left out, as upstream writes it.
        assert_eq!(
            serde_json::to_string(&hostgw).unwrap(),
            r#"{"PublicIP":"192.0.2.2","PublicIPv6":null,"BackendType":"host-gw"}"#
        );
        assert_eq!(serde_json::from_str::<LeaseAttrs>(&text).unwrap(), dual);
        assert_eq!(serde_json::from_str::<LeaseAttrs>(&serde_json::to_string(&hostgw).unwrap()).unwrap(), hostgw);
    }

    #[test]
    fn choosing_prefers_the_old_subnet_and_avoids_taken_ones() {
        let cfg = NetConfig::parse(r#"{"Network":"10.244.0.0/16","SubnetMax":"10.244.8.0"}"#, |_| {}).unwrap();
        let fam = cfg.ipv4.unwrap();
        let mut taken = HashSet::new();
        let old: IpNet = "10.244.5.0/24".parse().unwrap();
        assert_eq!(choose_subnet(&fam, &taken, Some(old), 1), Some(old));
        taken.insert(old);
        for seed in 0..50 {
            let s = choose_subnet(&fam, &taken, Some(old), seed).unwrap();
            assert!(fam.allows(&s) && s != old);
        }
        for s in fam.subnets() {
            taken.insert(s);
        }
        assert_eq!(choose_subnet(&fam, &taken, None, 7), None);
        // A subnet outside SubnetMin..SubnetMax is not reused.
        let outside: IpNet = "10.244.9.0/24".parse().unwrap();
        taken.clear();
        assert_ne!(choose_subnet(&fam, &taken, Some(outside), 3), Some(outside));
    }
}
