//! Leases from the Kubernetes API, as upstream's kube subnet manager does:
//! this node's subnet is `spec.podCIDR` (assigned by the controller manager),
//! what peers need is published as annotations on our own Node
//! (`<prefix>/backend-type`, `backend-data`, `public-ip`,
//! `kube-subnet-manager`), and peers are learnt from a Node watcher.
//! Every write is a strategic-merge patch, never a replace.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, Config};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tracing::{info, warn};

use flannel_shared::lease::LeaseAttrs;

mod node;
mod split;
pub mod watch;

pub use node::{NodeView, PeerNode, lease_key_of, node_lease, pod_cidr, pod_cidr_of};

use super::{Claim, LeaseEvent, OwnLease, SubnetError, SubnetManager};
use crate::backend::PublicIps;
use crate::config::Opts;
use crate::metrics::Metrics;

fn api_err(what: &str, e: impl std::fmt::Display) -> SubnetError {
    SubnetError::Store(format!("{what}: {e}"))
}

/// A client from `--kubeconfig-file` / `--kube-api-url`, else in-cluster config (or `$KUBECONFIG`).
pub async fn connect(opts: &Opts) -> Result<Client, SubnetError> {
    let mut config = match &opts.kubeconfig_file {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| api_err(&format!("--kubeconfig-file {}", path.display()), e))?;
            Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .map_err(|e| api_err(&format!("--kubeconfig-file {}", path.display()), e))?
        }
        None => Config::infer().await.map_err(|e| api_err("in-cluster config (or pass --kubeconfig-file)", e))?,
    };
    if let Some(url) = &opts.kube_api_url {
        config.cluster_url = url.parse().map_err(|e| api_err("--kube-api-url", e))?;
    }
    Client::try_from(config).map_err(|e| api_err("Kubernetes client", e))
}

/// This node's name: `NODE_NAME`, else the node of the pod named by `POD_NAME`/`POD_NAMESPACE`.
pub async fn node_name(client: &Client) -> Result<String, SubnetError> {
    if let Ok(n) = std::env::var("NODE_NAME")
        && !n.is_empty()
    {
        return Ok(n);
    }
    let (Ok(pod), Ok(ns)) = (std::env::var("POD_NAME"), std::env::var("POD_NAMESPACE")) else {
        return Err(SubnetError::Store(
            "set NODE_NAME (the DaemonSet passes spec.nodeName through the downward API), or POD_NAME and POD_NAMESPACE"
                .into(),
        ));
    };
    let p = Api::<Pod>::namespaced(client.clone(), &ns)
        .get(&pod)
        .await
        .map_err(|e| api_err(&format!("get pod {ns}/{pod}"), e))?;
    p.spec
        .and_then(|s| s.node_name)
        .ok_or_else(|| SubnetError::Store(format!("pod {ns}/{pod} is not scheduled on a node")))
}

/// The annotation keys under one prefix.
#[derive(Clone, Debug)]
pub struct Keys {
    pub backend_type: String,
    pub backend_data: String,
    pub public_ip: String,
    pub backend_v6_data: String,
    pub public_ipv6: String,
    pub subnet_manager: String,
    pub public_ip_overwrite: String,
    pub public_ipv6_overwrite: String,
    pub node_public_ip: String,
    pub node_public_ipv6: String,
}

impl Keys {
    /// Keys under `--kube-annotation-prefix`, read as upstream reads it: at most
    /// one `/`; without one, `/` is appended (`example.com` -> `example.com/backend-type`);
    /// with one, the part after it is a name prefix joined with `-`
    /// (`example.com/net` -> `example.com/net-backend-type`); the result must look
    /// like `fqdn/[0-9a-z-_]*` (upstream's own pattern, matched the same way).
    pub fn new(prefix: &str) -> Result<Keys, SubnetError> {
        let bad = |why: &str| SubnetError::Refused(format!("--kube-annotation-prefix {prefix:?}: {why}"));
        let mut p = prefix.to_string();
        match p.matches('/').count() {
            0 => p.push('/'),
            1 => {}
            _ => return Err(bad("can contain at most one slash")),
        }
        if !p.ends_with('/') && !p.ends_with('-') {
            p.push('-');
        }
        // Upstream's pattern, unanchored at the start as upstream matches it.
        let re = regex_lite::Regex::new(r"(?:[a-z0-9_-]+\.)+[a-z0-9_-]+/(?:[a-z0-9_-]+-)?$").expect("valid pattern");
        if !re.is_match(&p) {
            return Err(bad("must be in the form fqdn/[0-9a-z-_]*"));
        }
        let k = |name: &str| format!("{p}{name}");
        Ok(Keys {
            backend_type: k("backend-type"),
            backend_data: k("backend-data"),
            public_ip: k("public-ip"),
            backend_v6_data: k("backend-v6-data"),
            public_ipv6: k("public-ipv6"),
            subnet_manager: k("kube-subnet-manager"),
            public_ip_overwrite: k("public-ip-overwrite"),
            public_ipv6_overwrite: k("public-ipv6-overwrite"),
            node_public_ip: k("node-public-ip"),
            node_public_ipv6: k("node-public-ipv6"),
        })
    }
}

/// The patch that publishes our lease attributes on our Node. An IPv6-only
/// node publishes no IPv4 half (`public-ip`, `backend-data`), as upstream's vxlan.
pub fn annotations_patch(keys: &Keys, attrs: &LeaseAttrs) -> Value {
    let mut patch = json!({"metadata": {"annotations": {
        keys.backend_type.as_str(): attrs.backend_type,
        keys.subnet_manager.as_str(): "true",
    }}});
    if !attrs.public_ip.is_unspecified() {
        let ann = &mut patch["metadata"]["annotations"];
        ann[keys.backend_data.as_str()] = json!(attrs.backend_data.to_string());
        ann[keys.public_ip.as_str()] = json!(attrs.public_ip.to_string());
    }
    if let Some(v6) = attrs.public_ipv6 {
        let ann = &mut patch["metadata"]["annotations"];
        ann[keys.public_ipv6.as_str()] = json!(v6.to_string());
        ann[keys.backend_v6_data.as_str()] = json!(attrs.backend_v6_data.clone().unwrap_or(Value::Null).to_string());
    }
    patch
}

/// The status patch that clears `NetworkUnavailable` (merged by condition type).
pub fn network_up_patch(now: &str) -> Value {
    json!({"status": {"conditions": [{
        "type": "NetworkUnavailable",
        "status": "False",
        "reason": "FlannelIsUp",
        "message": "Flannel is running on this node",
        "lastTransitionTime": now,
        "lastHeartbeatTime": now,
    }]}})
}

pub struct KubeManager {
    client: Client,
    node: String,
    keys: Keys,
    net_config_path: std::path::PathBuf,
    /// How long to wait between looks at our Node while it has no podCIDR.
    pub pod_cidr_poll: Duration,
}

impl KubeManager {
    pub fn new(client: Client, node: String, opts: &Opts) -> Result<KubeManager, SubnetError> {
        Ok(KubeManager {
            client,
            node,
            keys: Keys::new(&opts.kube_annotation_prefix)?,
            net_config_path: opts.net_config_path.clone(),
            pod_cidr_poll: Duration::from_secs(2),
        })
    }

    fn nodes(&self) -> Api<Node> {
        Api::all(self.client.clone())
    }

    fn rfc3339_now() -> String {
        serde_json::to_value(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now()))
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default()
    }
}

impl SubnetManager for KubeManager {
    /// Starts the Node list and watch ([`watch::run`]): every (re)listing is
    /// reported whole once complete, single changes in between.
    fn spawn_watch(&self, tx: mpsc::Sender<LeaseEvent>, metrics: Arc<Metrics>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(watch::run(self.client.clone(), self.keys.clone(), tx, metrics))
    }

    async fn network_config(&mut self) -> Result<String, SubnetError> {
        std::fs::read_to_string(&self.net_config_path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                SubnetError::NoConfig(self.net_config_path.display().to_string())
            } else {
                SubnetError::Store(format!("--net-config-path {}: {e}", self.net_config_path.display()))
            }
        })
    }

    /// What our Node's annotations say (the public address is our Node's name here).
    async fn previous_lease(&mut self, _public_ip: IpAddr) -> Option<LeaseAttrs> {
        let node = self.nodes().get(&self.node).await.ok()?;
        node_lease(&node, &self.keys).map(|l| l.attrs)
    }

    async fn stored_public_ips(&mut self) -> PublicIps {
        let node = match self.nodes().get(&self.node).await {
            Ok(n) => n,
            Err(e) => {
                warn!("get node {} for its {} annotation: {e}", self.node, self.keys.node_public_ip);
                return PublicIps::default();
            }
        };
        let read = |key: &str| {
            let v = node.annotation(key)?;
            match v.parse::<IpAddr>() {
                Ok(ip) => {
                    info!("public IP {ip} from the {key} annotation of node {}", self.node);
                    Some(ip)
                }
                Err(_) => {
                    warn!("node {}: annotation {key}={v:?} is not an IP address; ignored", self.node);
                    None
                }
            }
        };
        PublicIps {
            v4: read(&self.keys.node_public_ip).and_then(|ip| match ip {
                IpAddr::V4(v4) => Some(v4),
                IpAddr::V6(_) => None,
            }),
            v6: read(&self.keys.node_public_ipv6).and_then(|ip| match ip {
                IpAddr::V6(v6) => Some(v6),
                IpAddr::V4(_) => None,
            }),
        }
    }

    async fn acquire(&mut self, c: &Claim<'_>) -> Result<OwnLease, SubnetError> {
        let attrs = c.attrs;
        let api = self.nodes();
        let mut waited = false;
        let node = loop {
            let node = api.get(&self.node).await.map_err(|e| api_err(&format!("get node {}", self.node), e))?;
            if (c.family.is_none() || pod_cidr(&node).is_some())
                && (c.family6.is_none() || pod_cidr_of(&node, false).is_some())
            {
                break node;
            }
            if !waited {
                info!(
                    "waiting for node {} to be given a podCIDR (kube-controller-manager --allocate-node-cidrs)",
                    self.node
                );
                waited = true;
            }
            tokio::time::sleep(self.pod_cidr_poll).await;
        };
        // IPv6-only: no IPv4 half, as upstream keys such a lease.
        let subnet = match c.family {
            Some(family) => {
                let subnet = pod_cidr(&node).expect("checked above");
                if !family.network.contains_net(&subnet) {
                    return Err(SubnetError::Refused(format!(
                        "node {} has podCIDR {subnet}, outside the flannel Network {} (net-conf.json and --cluster-cidr disagree)",
                        self.node, family.network
                    )));
                }
                subnet
            }
            None => flannel_shared::lease::no_ipv4(),
        };
        let subnet6 = match c.family6 {
            Some(f6) => {
                let s6 = pod_cidr_of(&node, false).expect("checked above");
                if !f6.network.contains_net(&s6) {
                    return Err(SubnetError::Refused(format!(
                        "node {} has IPv6 podCIDR {s6}, outside the flannel IPv6Network {}",
                        self.node, f6.network
                    )));
                }
                Some(s6)
            }
            None => None,
        };
        // `node-public-ip(v6)` already chose the uplink and our address (stored_public_ips);
        // `public-ip(v6)-overwrite` replaces only what peers are told, as upstream.
        let mut attrs = attrs.clone();
        let overwrite = &self.keys.public_ip_overwrite;
        if let Some(ip) = node.annotation(overwrite).and_then(|v| v.parse::<Ipv4Addr>().ok()) {
            info!("public IP {ip} from the {overwrite} annotation");
            attrs.public_ip = ip;
        }
        let overwrite6 = &self.keys.public_ipv6_overwrite;
        if attrs.public_ipv6.is_some()
            && let Some(ip) = node.annotation(overwrite6).and_then(|v| v.parse::<Ipv6Addr>().ok())
        {
            info!("public IPv6 {ip} from the {overwrite6} annotation");
            attrs.public_ipv6 = Some(ip);
        }
        // Through the status subresource, as upstream: the ClusterRole grants
        // `nodes/status` patch and no `nodes` patch.
        let patch = annotations_patch(&self.keys, &attrs);
        api.patch_status(&self.node, &PatchParams::default(), &Patch::Strategic(&patch))
            .await
            .map_err(|e| api_err(&format!("annotate node {} (nodes/status patch)", self.node), e))?;
        info!(
            "node {} has podCIDR {}; annotations published",
            self.node,
            subnet6.filter(|_| c.family.is_none()).unwrap_or(subnet)
        );
        Ok(OwnLease { subnet, subnet6, attrs, expiration: SystemTime::now() + Duration::from_secs(24 * 3600), id: 1 })
    }

    async fn renew(&mut self, lease: &OwnLease) -> Result<OwnLease, SubnetError> {
        // Nothing expires in the API; check that our Node still carries what we published.
        let node = match self.nodes().get(&self.node).await {
            Ok(n) => n,
            Err(kube::Error::Api(e)) if e.code == 404 => return Err(SubnetError::LeaseLost(lease.key())),
            Err(e) => return Err(api_err(&format!("get node {}", self.node), e)),
        };
        let ours = node_lease(&node, &self.keys);
        if ours.as_ref().map(|l| (&l.subnet, &l.attrs)) != Some((&lease.subnet, &lease.attrs)) {
            return Err(SubnetError::LeaseLost(lease.key()));
        }
        Ok(OwnLease { expiration: SystemTime::now() + Duration::from_secs(24 * 3600), ..lease.clone() })
    }

    async fn network_up(&mut self) -> Result<(), SubnetError> {
        let patch = network_up_patch(&Self::rfc3339_now());
        self.nodes()
            .patch_status(&self.node, &PatchParams::default(), &Patch::Strategic(&patch))
            .await
            .map_err(|e| api_err(&format!("set NetworkUnavailable=False on node {}", self.node), e))?;
        info!("node {}: NetworkUnavailable=False (FlannelIsUp)", self.node);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, cidr: Option<&str>, ann: &[(&str, &str)]) -> Node {
        serde_json::from_value(json!({
            "metadata": {"name": name, "annotations": ann.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<std::collections::BTreeMap<_, _>>()},
            "spec": {"podCIDR": cidr, "podCIDRs": cidr.map(|c| vec![c])},
        }))
        .unwrap()
    }

    /// `--kube-annotation-prefix` as upstream's newAnnotations reads it.
    #[test]
    fn annotation_prefix_forms_and_validation() {
        let cases = [
            ("flannel.alpha.coreos.com", "flannel.alpha.coreos.com/backend-type"),
            ("flannel.alpha.coreos.com/", "flannel.alpha.coreos.com/backend-type"),
            ("example.com/net", "example.com/net-backend-type"),
            ("example.com/net-", "example.com/net-backend-type"),
            ("k8s.example.org/flannel_2", "k8s.example.org/flannel_2-backend-type"),
        ];
        for (prefix, want) in cases {
            let k = Keys::new(prefix).unwrap_or_else(|e| panic!("{prefix}: {e}"));
            assert_eq!(k.backend_type, want, "{prefix}");
            assert!(
                k.node_public_ipv6.ends_with("node-public-ipv6")
                    && k.public_ipv6_overwrite.ends_with("public-ipv6-overwrite")
            );
        }
        for bad in ["a/b/c", "nodots", "nodots/x", "example.com/UPPER", "example.com/a.b", ""] {
            let e = Keys::new(bad).err().unwrap_or_else(|| panic!("{bad:?} must be refused")).to_string();
            assert!(e.contains("--kube-annotation-prefix"), "{bad}: {e}");
        }
    }

    #[test]
    fn leases_from_nodes() {
        let k = Keys::new("flannel.alpha.coreos.com").unwrap();
        let n = node(
            "n2",
            Some("10.244.2.0/24"),
            &[
                ("flannel.alpha.coreos.com/backend-type", "vxlan"),
                ("flannel.alpha.coreos.com/backend-data", r#"{"VNI":1,"VtepMAC":"0e:00:00:00:00:02"}"#),
                ("flannel.alpha.coreos.com/public-ip", "192.0.2.2"),
                ("flannel.alpha.coreos.com/kube-subnet-manager", "true"),
            ],
        );
        let l = node_lease(&n, &k).unwrap();
        assert_eq!(l.subnet.to_string(), "10.244.2.0/24");
        assert_eq!(
            l.backend_data::<crate::backend::vxlan::VxlanData>(false).unwrap().vtep_mac.to_string(),
            "0e:00:00:00:00:02"
        );
        // No annotations yet (flannel not running there) or no podCIDR: not a peer.
        assert!(node_lease(&node("n3", Some("10.244.3.0/24"), &[]), &k).is_none());
        assert!(node_lease(&node("n4", None, &[("flannel.alpha.coreos.com/public-ip", "192.0.2.4")]), &k).is_none());
        // The patch round-trips into the same lease.
        let patch = annotations_patch(&k, &l.attrs);
        assert_eq!(patch["metadata"]["annotations"]["flannel.alpha.coreos.com/kube-subnet-manager"], "true");
        let mut n5 = node("n5", Some("10.244.2.0/24"), &[]);
        n5.metadata.annotations = serde_json::from_value(patch["metadata"]["annotations"].clone()).unwrap();
        assert_eq!(node_lease(&n5, &k), Some(l));
        let hostgw = LeaseAttrs {
            public_ip: "192.0.2.9".parse().unwrap(),
            public_ipv6: None,
            backend_type: "host-gw".into(),
            backend_data: Value::Null,
            backend_v6_data: None,
        };
        assert_eq!(
            annotations_patch(&k, &hostgw)["metadata"]["annotations"]["flannel.alpha.coreos.com/backend-data"],
            "null"
        );
    }
}
