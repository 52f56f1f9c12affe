//! Reading leases off Nodes. Our own Node is read as k8s-openapi's full
//! `Node`; peers, thousands of them in a listing, as [`PeerNode`]: only the
//! name, resourceVersion, annotations and pod CIDRs are decoded, and serde
//! skips the rest (status with its conditions and images list, managedFields),
//! which is most of a real Node's bytes. At 5,000 Nodes decoding them in full
//! was most of the agent's start time and memory (`e2e scale --kube`).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;
use serde_json::Value;

use flannel_shared::IpNet;
use flannel_shared::lease::{Lease, LeaseAttrs};

use super::Keys;

/// A peer's Node, as much of it as a lease needs.
#[derive(Clone, Debug, Default)]
pub struct PeerNode {
    pub metadata: ObjectMeta,
    pub pod_cidr: Option<String>,
    pub pod_cidrs: Vec<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawMeta {
    name: Option<String>,
    resource_version: Option<String>,
    annotations: Option<BTreeMap<String, String>>,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawSpec {
    #[serde(rename = "podCIDR")]
    pod_cidr: Option<String>,
    #[serde(rename = "podCIDRs")]
    pod_cidrs: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct RawNode {
    metadata: RawMeta,
    #[serde(default)]
    spec: Option<RawSpec>,
}

impl<'de> Deserialize<'de> for PeerNode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = RawNode::deserialize(d)?;
        let spec = raw.spec.unwrap_or_default();
        Ok(PeerNode {
            metadata: ObjectMeta {
                name: raw.metadata.name,
                resource_version: raw.metadata.resource_version,
                annotations: raw.metadata.annotations,
                ..ObjectMeta::default()
            },
            pod_cidr: spec.pod_cidr,
            pod_cidrs: spec.pod_cidrs.unwrap_or_default(),
        })
    }
}

impl kube::Resource for PeerNode {
    type DynamicType = ();
    type Scope = kube::core::ClusterResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        "Node".into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        "".into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        "v1".into()
    }
    fn api_version(_: &()) -> Cow<'_, str> {
        "v1".into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        "nodes".into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// What a lease is read from: a Node's annotations and pod CIDRs.
pub trait NodeView {
    fn annotation(&self, key: &str) -> Option<&str>;
    /// `spec.podCIDRs`, then `spec.podCIDR`.
    fn pod_cidrs(&self) -> Vec<&str>;
}

impl NodeView for Node {
    fn annotation(&self, key: &str) -> Option<&str> {
        self.metadata.annotations.as_ref()?.get(key).map(String::as_str)
    }
    fn pod_cidrs(&self) -> Vec<&str> {
        let Some(spec) = self.spec.as_ref() else { return Vec::new() };
        spec.pod_cidrs.iter().flatten().chain(spec.pod_cidr.iter()).map(String::as_str).collect()
    }
}

impl NodeView for PeerNode {
    fn annotation(&self, key: &str) -> Option<&str> {
        self.metadata.annotations.as_ref()?.get(key).map(String::as_str)
    }
    fn pod_cidrs(&self) -> Vec<&str> {
        self.pod_cidrs.iter().chain(self.pod_cidr.iter()).map(String::as_str).collect()
    }
}

/// What a Node's lease is known by (see `flannel_shared::lease::lease_key`):
/// its IPv4 pod CIDR, else its IPv6 one.
pub fn lease_key_of(node: &impl NodeView) -> Option<IpNet> {
    pod_cidr(node).or_else(|| pod_cidr_of(node, false))
}

/// The IPv4 pod CIDR of a node (`spec.podCIDRs`, else `spec.podCIDR`).
pub fn pod_cidr(node: &impl NodeView) -> Option<IpNet> {
    pod_cidr_of(node, true)
}

/// The pod CIDR of one family (`spec.podCIDRs` holds one per family when dual-stack).
pub fn pod_cidr_of(node: &impl NodeView, v4: bool) -> Option<IpNet> {
    node.pod_cidrs()
        .into_iter()
        .filter_map(|c| c.parse::<IpNet>().ok())
        .find(|n| n.is_ipv4() == v4)
        .map(|n| n.network())
}

/// A peer's lease from its Node: podCIDR plus our annotations; None until both
/// are there, and None for a Node whose `kube-subnet-manager` annotation is not
/// `"true"` (upstream ignores those: their annotations were not written by a
/// kube-subnet-manager flannel).
pub fn node_lease(node: &impl NodeView, keys: &Keys) -> Option<Lease> {
    if node.annotation(&keys.subnet_manager) != Some("true") {
        return None;
    }
    let backend_type = node.annotation(&keys.backend_type)?.to_string();
    // The IPv6 half, when the node publishes one.
    let public_ipv6: Option<std::net::Ipv6Addr> = node.annotation(&keys.public_ipv6).and_then(|v| v.parse().ok());
    let subnet6 = public_ipv6.and(pod_cidr_of(node, false));
    let backend_v6_data = node.annotation(&keys.backend_v6_data).and_then(|t| serde_json::from_str(t).ok());
    let public_ip: Option<Ipv4Addr> = node.annotation(&keys.public_ip).and_then(|v| v.parse().ok());
    let (subnet, public_ip) = match (pod_cidr(node), public_ip) {
        (Some(s), Some(ip)) if !ip.is_unspecified() => (s, ip),
        // An IPv6-only node: no IPv4 half (upstream's host-gw writes public-ip 0.0.0.0).
        _ if subnet6.is_some() => (flannel_shared::lease::no_ipv4(), Ipv4Addr::UNSPECIFIED),
        _ => return None,
    };
    let backend_data = match node.annotation(&keys.backend_data).filter(|_| !public_ip.is_unspecified()) {
        Some(text) => serde_json::from_str(text).ok()?,
        None => Value::Null,
    };
    Some(Lease {
        subnet,
        subnet6,
        attrs: LeaseAttrs { public_ip, public_ipv6, backend_type, backend_data, backend_v6_data },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A peer decodes to the same lease as the full Node, and the parts a lease
    /// does not need are not kept.
    #[test]
    fn peer_node_reads_what_a_lease_needs_only() {
        let keys = Keys::new("flannel.alpha.coreos.com").unwrap();
        let v = json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "n2", "resourceVersion": "42", "labels": {"a": "b"},
                "managedFields": [{"manager": "kubelet", "operation": "Update"}],
                "annotations": {
                    "flannel.alpha.coreos.com/backend-type": "vxlan",
                    "flannel.alpha.coreos.com/backend-data": r#"{"VNI":1,"VtepMAC":"0e:00:00:00:00:02"}"#,
                    "flannel.alpha.coreos.com/public-ip": "192.0.2.2",
                    "flannel.alpha.coreos.com/kube-subnet-manager": "true"}},
            "spec": {"podCIDR": "10.244.2.0/24", "podCIDRs": ["10.244.2.0/24", "fd00:10:244:2::/64"]},
            "status": {"images": [{"names": ["x"], "sizeBytes": 1}], "conditions": [{"type": "Ready", "status": "True"}]},
        });
        let full: Node = serde_json::from_value(v.clone()).unwrap();
        let peer: PeerNode = serde_json::from_value(v).unwrap();
        assert_eq!(node_lease(&peer, &keys), node_lease(&full, &keys));
        assert!(node_lease(&peer, &keys).is_some());
        assert_eq!(pod_cidr_of(&peer, false).unwrap().to_string(), "fd00:10:244:2::/64");
        assert_eq!(peer.metadata.resource_version.as_deref(), Some("42"));
        assert!(peer.metadata.labels.is_none() && peer.metadata.managed_fields.is_none());
        // Annotations not written by a kube-subnet-manager flannel: no peer, as upstream.
        let mut other = peer.clone();
        other.metadata.annotations.as_mut().unwrap().remove("flannel.alpha.coreos.com/kube-subnet-manager");
        assert!(node_lease(&other, &keys).is_none());
        other
            .metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert("flannel.alpha.coreos.com/kube-subnet-manager".into(), "false".into());
        assert!(node_lease(&other, &keys).is_none());
        // An IPv6-only peer (upstream's vxlan writes no IPv4 half; its host-gw writes public-ip 0.0.0.0).
        for v4_half in [None, Some("0.0.0.0")] {
            let mut ann = serde_json::Map::new();
            ann.insert("flannel.alpha.coreos.com/backend-type".into(), json!("vxlan"));
            ann.insert("flannel.alpha.coreos.com/kube-subnet-manager".into(), json!("true"));
            ann.insert("flannel.alpha.coreos.com/public-ipv6".into(), json!("2001:db8::7"));
            ann.insert(
                "flannel.alpha.coreos.com/backend-v6-data".into(),
                json!(r#"{"VNI":1,"VtepMAC":"0e:00:00:00:00:07"}"#),
            );
            if let Some(ip) = v4_half {
                ann.insert("flannel.alpha.coreos.com/public-ip".into(), json!(ip));
            }
            let v6only: PeerNode = serde_json::from_value(json!({"metadata": {"name": "n7", "annotations": ann},
                "spec": {"podCIDR": "fd00:10:244:7::/64", "podCIDRs": ["fd00:10:244:7::/64"]}}))
            .unwrap();
            let l = node_lease(&v6only, &keys).expect("an IPv6-only peer");
            assert_eq!(
                (l.subnet, l.key().to_string()),
                (flannel_shared::lease::no_ipv4(), "fd00:10:244:7::/64".into())
            );
            assert_eq!(
                l.backend_data::<crate::backend::vxlan::VxlanData>(true).unwrap().vtep_mac.to_string(),
                "0e:00:00:00:00:07"
            );
            assert_eq!(lease_key_of(&v6only), Some(l.key()));
        }
        // A Node without spec (just registered) is no peer, not an error.
        let bare: PeerNode = serde_json::from_value(json!({"metadata": {"name": "n9"}})).unwrap();
        assert!(node_lease(&bare, &keys).is_none());
    }
}
