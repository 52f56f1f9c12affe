//! `manifests/kube-flannel.yml` parsed with k8s-openapi's types: every object
//! valid and complete (nothing dropped in a round trip), references that
//! agree, the embedded conflist run through the real plugin, and the
//! net-conf.json through the agent's parser.

mod common;

use std::collections::BTreeSet;

use common::Node;
use flannel_shared::netconf::NetConfig;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

const MANIFEST: &str = include_str!("../../manifests/kube-flannel.yml");

fn docs() -> Vec<Value> {
    serde_yaml::Deserializer::from_str(MANIFEST)
        .map(|d| {
            let y = serde_yaml::Value::deserialize(d).expect("YAML document");
            serde_json::to_value(y).expect("YAML as JSON")
        })
        .filter(|v| !v.is_null())
        .collect()
}

/// Deserializes `v` as `T` and checks that serializing it back loses nothing
/// (a misspelt field would silently vanish otherwise).
fn typed<T: DeserializeOwned + serde::Serialize>(v: &Value) -> T {
    let t: T = serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("{e}: {v}"));
    let back = serde_json::to_value(&t).unwrap();
    assert_eq!(&back, v, "round trip changed the object");
    t
}

fn find<'a>(all: &'a [Value], kind: &str) -> &'a Value {
    all.iter().find(|d| d["kind"] == kind).unwrap_or_else(|| panic!("no {kind} in the manifest"))
}

#[test]
fn manifest_objects_are_valid_and_consistent() {
    let all = docs();
    let kinds: BTreeSet<&str> = all.iter().filter_map(|d| d["kind"].as_str()).collect();
    assert_eq!(
        kinds,
        BTreeSet::from(["ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet", "Namespace", "ServiceAccount"])
    );
    let ns: Namespace = typed(find(&all, "Namespace"));
    let ns_name = ns.metadata.name.clone().unwrap();
    assert_eq!(ns.metadata.labels.unwrap()["pod-security.kubernetes.io/enforce"], "privileged");
    let sa: ServiceAccount = typed(find(&all, "ServiceAccount"));
    let role: ClusterRole = typed(find(&all, "ClusterRole"));
    let binding: ClusterRoleBinding = typed(find(&all, "ClusterRoleBinding"));
    let cm: ConfigMap = typed(find(&all, "ConfigMap"));
    let ds: DaemonSet = typed(find(&all, "DaemonSet"));
    for ns_of in [&sa.metadata.namespace, &cm.metadata.namespace, &ds.metadata.namespace] {
        assert_eq!(ns_of.as_deref(), Some(ns_name.as_str()));
    }

    // RBAC: exactly what the agent uses.
    let mut perms = BTreeSet::new();
    for r in role.rules.unwrap() {
        for res in r.resources.unwrap() {
            for v in &r.verbs {
                perms.insert(format!("{res}:{v}"));
            }
        }
    }
    // Upstream's rules: annotations go through nodes/status, so no nodes patch.
    let want = ["nodes/status:patch", "nodes:get", "nodes:list", "nodes:watch", "pods:get"];
    assert_eq!(perms, want.iter().map(|s| s.to_string()).collect());
    assert_eq!(binding.role_ref.name, role.metadata.name.unwrap());
    let subj = &binding.subjects.unwrap()[0];
    assert_eq!(
        (subj.name.as_str(), subj.namespace.as_deref()),
        (sa.metadata.name.as_deref().unwrap(), Some(ns_name.as_str()))
    );

    // DaemonSet: the pieces an operator expects.
    let spec = ds.spec.unwrap();
    let labels = spec.template.metadata.as_ref().unwrap().labels.clone().unwrap();
    for (k, v) in spec.selector.match_labels.unwrap() {
        assert_eq!(labels.get(&k), Some(&v), "selector must match the template");
    }
    let pod = spec.template.spec.unwrap();
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.priority_class_name.as_deref(), Some("system-node-critical"));
    assert_eq!(pod.service_account_name, sa.metadata.name);
    let tol = pod.tolerations.unwrap();
    assert!(tol.iter().any(|t| t.operator.as_deref() == Some("Exists") && t.effect.as_deref() == Some("NoSchedule")));
    let volumes = pod.volumes.unwrap();
    let vol_names: BTreeSet<String> = volumes.iter().map(|v| v.name.clone()).collect();
    let cfg_vol = volumes.iter().find(|v| v.config_map.is_some()).unwrap();
    assert_eq!(cfg_vol.config_map.as_ref().unwrap().name, cm.metadata.name.clone().unwrap());
    let init = pod.init_containers.unwrap();
    let main = &pod.containers[0];
    for c in init.iter().chain(std::iter::once(main)) {
        assert_eq!(c.image, main.image, "one image for every container");
        for m in c.volume_mounts.iter().flatten() {
            assert!(vol_names.contains(&m.name), "{}: mount of unknown volume {}", c.name, m.name);
        }
    }
    let install = init.iter().find(|c| c.name == "install-cni").unwrap();
    assert!(install.args.as_ref().unwrap().contains(&"/etc/cni/net.d/10-flannel.conflist".to_string()));
    let plugin = init.iter().find(|c| c.name == "install-cni-plugin").unwrap();
    assert!(plugin.args.as_ref().unwrap().contains(&"/opt/cni/bin/flannel".to_string()));
    let args = main.args.clone().unwrap();
    assert!(args.contains(&"--ip-masq".into()) && args.contains(&"--kube-subnet-mgr".into()));
    let port = args.iter().find_map(|a| a.strip_prefix("--healthz-port=")).expect("health port flag");
    // The probes name the port, as upstream's do; it must be the flag's.
    let named = main.ports.iter().flatten().find(|p| p.name.as_deref() == Some("healthz")).expect("healthz port");
    assert_eq!(named.container_port.to_string(), port);
    let probe_port = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
        let g = p.as_ref().unwrap().http_get.as_ref().unwrap();
        (g.path.clone().unwrap(), serde_json::to_value(&g.port).unwrap())
    };
    assert_eq!(probe_port(&main.liveness_probe), ("/healthz".to_string(), serde_json::json!("healthz")));
    assert_eq!(probe_port(&main.readiness_probe), ("/readyz".to_string(), serde_json::json!("healthz")));
    let caps = main.security_context.as_ref().unwrap().capabilities.as_ref().unwrap().add.clone().unwrap();
    assert_eq!(caps, ["NET_ADMIN", "NET_RAW"]);
    let env: BTreeSet<String> = main.env.iter().flatten().map(|e| e.name.clone()).collect();
    assert!(["NODE_NAME", "POD_NAME", "POD_NAMESPACE"].iter().all(|e| env.contains(*e)));
    let mounts: BTreeSet<String> = main.volume_mounts.iter().flatten().map(|m| m.mount_path.clone()).collect();
    for p in ["/run/flannel", "/run/xtables.lock", "/lib/modules", "/etc/kube-flannel/"] {
        assert!(mounts.contains(p), "missing mount {p}");
    }
    assert!(main.resources.as_ref().unwrap().requests.is_some());

    // net-conf.json parses with the agent's own parser, without warnings.
    let data = cm.data.unwrap();
    let mut warnings = Vec::new();
    let net = NetConfig::parse(&data["net-conf.json"], |w| warnings.push(w)).expect("net-conf.json");
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(net.ipv4.unwrap().network.to_string(), "10.244.0.0/16");
}

#[test]
fn embedded_conflist_drives_the_real_plugin() {
    let all = docs();
    let cm: ConfigMap = typed(find(&all, "ConfigMap"));
    let conflist: Value = serde_json::from_str(&cm.data.unwrap()["cni-conf.json"]).expect("cni-conf.json");
    assert_eq!(conflist["plugins"][1]["type"], "portmap");
    // What a runtime hands the first plugin: the entry plus name and cniVersion, with files redirected.
    let node = Node::new("10.244.1.1/24");
    let mut conf = conflist["plugins"][0].clone();
    conf["name"] = conflist["name"].clone();
    conf["cniVersion"] = conflist["cniVersion"].clone();
    let ours = node.conf("0.3.1");
    for k in ["subnetFile", "dataDir", "ipam"] {
        conf[k] = ours[k].clone();
    }
    let pod = e2e::Netns::new("mp");
    let res = node.cni("ADD", "manifest", Some(pod.path().to_str().unwrap()), "eth0", &conf).expect_ok().json();
    assert_eq!(res["ips"][0]["address"], "10.244.1.2/24");
    node.cni("DEL", "manifest", Some(pod.path().to_str().unwrap()), "eth0", &conf).expect_ok();
    node.assert_clean();
}
