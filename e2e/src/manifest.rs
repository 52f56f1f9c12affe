//! `manifests/kube-flannel.yml` read the way the kubelet reads it: the
//! DaemonSet's init containers and agent container (command, args, env,
//! capabilities, volume mounts), its volumes, and the ConfigMap's files.
//! Nothing is copied out of the manifest by hand; tests run what it says.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

/// The manifest's path in the workspace.
pub fn path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/kube-flannel.yml")
}

/// Where a volume's files come from.
#[derive(Debug, Clone, PartialEq)]
pub enum Volume {
    /// A directory or file of the node; `file` when its type is `FileOrCreate`.
    HostPath { path: String, file: bool },
    /// The named ConfigMap's keys as files.
    ConfigMap(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Mount {
    pub volume: String,
    pub path: String,
    pub read_only: bool,
}

/// One container of the pod template.
#[derive(Debug, Clone, PartialEq)]
pub struct Container {
    pub name: String,
    pub image: String,
    /// Replaces the image's entrypoint (Kubernetes `command`).
    pub command: Vec<String>,
    pub args: Vec<String>,
    /// Plain values, and `fieldRef` paths as `field:<path>`.
    pub env: Vec<(String, String)>,
    pub cap_add: Vec<String>,
    pub privileged: bool,
    pub mounts: Vec<Mount>,
    /// `httpGet` probes as (path, port).
    pub readiness: Option<(String, u16)>,
    pub liveness: Option<(String, u16)>,
}

/// An `httpGet` probe's path and numeric port (a named port is resolved against `ports`).
fn http_probe(c: &Value, which: &str) -> Result<Option<(String, u16)>, String> {
    let g = &c[which]["httpGet"];
    if g.is_null() {
        return Ok(None);
    }
    let path = g["path"].as_str().unwrap_or("/").to_string();
    let port = match &g["port"] {
        Value::Number(n) => n.as_u64(),
        Value::String(name) => c["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["name"] == name.as_str())
            .and_then(|p| p["containerPort"].as_u64()),
        _ => None,
    };
    let port = port.and_then(|p| u16::try_from(p).ok()).ok_or_else(|| format!("{which}: bad httpGet port"))?;
    Ok(Some((path, port)))
}

#[derive(Debug, Clone)]
pub struct DaemonSet {
    pub namespace: String,
    pub host_network: bool,
    pub init: Vec<Container>,
    pub agent: Container,
    pub volumes: BTreeMap<String, Volume>,
    /// ConfigMap name -> file name -> contents.
    pub config_maps: BTreeMap<String, BTreeMap<String, String>>,
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array().into_iter().flatten().filter_map(|s| s.as_str().map(String::from)).collect()
}

fn text(v: &Value, what: &str) -> Result<String, String> {
    v.as_str().map(String::from).ok_or_else(|| format!("{what} missing or not a string"))
}

fn container(c: &Value) -> Result<Container, String> {
    let name = text(&c["name"], "container name")?;
    let env = c["env"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            let k = text(&e["name"], "env name")?;
            let v = match (&e["value"], &e["valueFrom"]["fieldRef"]["fieldPath"]) {
                (Value::String(v), _) => v.clone(),
                (_, Value::String(f)) => format!("field:{f}"),
                _ => return Err(format!("{name}: env {k} has neither value nor fieldRef")),
            };
            Ok((k, v))
        })
        .collect::<Result<_, String>>()?;
    let mounts = c["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| {
            Ok(Mount {
                volume: text(&m["name"], "volumeMount name")?,
                path: text(&m["mountPath"], "mountPath")?,
                read_only: m["readOnly"].as_bool().unwrap_or(false),
            })
        })
        .collect::<Result<_, String>>()?;
    let sc = &c["securityContext"];
    Ok(Container {
        image: text(&c["image"], &format!("{name}: image"))?,
        command: strings(&c["command"]),
        args: strings(&c["args"]),
        env,
        cap_add: strings(&sc["capabilities"]["add"]),
        privileged: sc["privileged"].as_bool().unwrap_or(false),
        mounts,
        readiness: http_probe(c, "readinessProbe")?,
        liveness: http_probe(c, "livenessProbe")?,
        name,
    })
}

impl DaemonSet {
    /// Parses the manifest text (all its YAML documents).
    pub fn parse(yaml: &str) -> Result<DaemonSet, String> {
        let mut docs = Vec::new();
        for d in serde_yaml::Deserializer::from_str(yaml) {
            let y = serde_yaml::Value::deserialize(d).map_err(|e| format!("YAML: {e}"))?;
            docs.push(serde_json::to_value(y).map_err(|e| format!("YAML as JSON: {e}"))?);
        }
        let mut config_maps = BTreeMap::new();
        for cm in docs.iter().filter(|d| d["kind"] == "ConfigMap") {
            let files = cm["data"]
                .as_object()
                .into_iter()
                .flatten()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect();
            config_maps.insert(text(&cm["metadata"]["name"], "ConfigMap name")?, files);
        }
        let ds = docs.iter().find(|d| d["kind"] == "DaemonSet").ok_or("no DaemonSet in the manifest")?;
        let pod = &ds["spec"]["template"]["spec"];
        let init = pod["initContainers"].as_array().into_iter().flatten().map(container).collect::<Result<_, _>>()?;
        let agent = container(pod["containers"].get(0).ok_or("DaemonSet without containers")?)?;
        let mut volumes = BTreeMap::new();
        for v in pod["volumes"].as_array().into_iter().flatten() {
            let name = text(&v["name"], "volume name")?;
            let vol = if let Some(p) = v["hostPath"]["path"].as_str() {
                Volume::HostPath { path: p.to_string(), file: v["hostPath"]["type"] == "FileOrCreate" }
            } else if let Some(cm) = v["configMap"]["name"].as_str() {
                Volume::ConfigMap(cm.to_string())
            } else {
                return Err(format!("volume {name}: only hostPath and configMap are supported here"));
            };
            volumes.insert(name, vol);
        }
        Ok(DaemonSet {
            namespace: text(&ds["metadata"]["namespace"], "DaemonSet namespace")?,
            host_network: pod["hostNetwork"].as_bool().unwrap_or(false),
            init,
            agent,
            volumes,
            config_maps,
        })
    }

    /// The project's manifest.
    pub fn load() -> DaemonSet {
        let p = path();
        let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        DaemonSet::parse(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    /// A file of a ConfigMap this DaemonSet mounts (e.g. `cni-conf.json`).
    pub fn config_file(&self, key: &str) -> Option<&str> {
        self.volumes.values().find_map(|v| match v {
            Volume::ConfigMap(cm) => self.config_maps.get(cm)?.get(key).map(String::as_str),
            Volume::HostPath { .. } => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_projects_manifest_parses() {
        let ds = DaemonSet::load();
        assert!(ds.host_network);
        assert_eq!(ds.init.len(), 2);
        // Upstream's layout: overlays and probes written for their DaemonSet apply to ours.
        assert_eq!(ds.agent.command, ["/opt/bin/flanneld"]);
        assert_eq!(ds.agent.args, ["--ip-masq", "--kube-subnet-mgr", "--healthz-port=8081"]);
        assert_eq!(ds.init[1].command, ["/opt/bin/install-conf"]);
        assert!(ds.agent.env.contains(&("NODE_NAME".into(), "field:spec.nodeName".into())));
        assert_eq!(ds.agent.readiness, Some(("/readyz".into(), 8081)));
        assert_eq!(ds.agent.liveness, Some(("/healthz".into(), 8081)));
        assert!(ds.config_file("cni-conf.json").is_some_and(|c| c.contains("flannel")));
        assert!(ds.config_file("net-conf.json").is_some_and(|c| c.contains("Network")));
        assert_eq!(
            ds.volumes.get("xtables-lock"),
            Some(&Volume::HostPath { path: "/run/xtables.lock".into(), file: true })
        );
    }

    /// The ClusterRole grants exactly upstream's rules, and the DaemonSet keeps
    /// upstream's names (selector, containers, volumes) so a kustomize overlay
    /// or a `kubectl apply` over upstream's DaemonSet works unchanged.
    #[test]
    fn rbac_and_names_are_upstreams() {
        let text = std::fs::read_to_string(path()).unwrap();
        let docs: Vec<Value> = serde_yaml::Deserializer::from_str(&text)
            .map(|d| serde_json::to_value(serde_yaml::Value::deserialize(d).unwrap()).unwrap())
            .collect();
        let kind = |k: &str| docs.iter().find(|d| d["kind"] == k).unwrap_or_else(|| panic!("no {k}"));
        let rules = serde_json::json!([
            {"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]},
            {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch"]},
            {"apiGroups": [""], "resources": ["nodes/status"], "verbs": ["patch"]},
        ]);
        assert_eq!(kind("ClusterRole")["rules"], rules);
        assert_eq!(kind("ClusterRole")["metadata"]["name"], "flannel");
        let ds = kind("DaemonSet");
        assert_eq!(
            (&ds["metadata"]["name"], &ds["metadata"]["namespace"]),
            (&"kube-flannel-ds".into(), &"kube-flannel".into())
        );
        assert_eq!(ds["spec"]["selector"], serde_json::json!({"matchLabels": {"app": "flannel"}}));
        let pod = &ds["spec"]["template"]["spec"];
        let names = |v: &Value| {
            v.as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap().to_string()).collect::<Vec<_>>()
        };
        assert_eq!(names(&pod["initContainers"]), ["install-cni-plugin", "install-cni"]);
        assert_eq!(names(&pod["containers"]), ["kube-flannel"]);
        for v in ["run", "cni-plugin", "cni", "flannel-cfg", "xtables-lock"] {
            assert!(names(&pod["volumes"]).iter().any(|n| n == v), "volume {v}");
        }
        assert_eq!(pod["serviceAccountName"], "flannel");
        assert_eq!(kind("ConfigMap")["metadata"]["name"], "kube-flannel-cfg");
    }

    #[test]
    fn unsupported_volumes_and_env_are_named() {
        let y = |vol: &str, env: &str| {
            format!(
                "kind: DaemonSet\nmetadata: {{namespace: x}}\nspec:\n  template:\n    spec:\n      \
                 containers: [{{name: c, image: i, env: [{env}]}}]\n      volumes: [{vol}]\n"
            )
        };
        let e = DaemonSet::parse(&y("{name: v, emptyDir: {}}", "")).unwrap_err();
        assert!(e.contains("volume v"), "{e}");
        let e = DaemonSet::parse(&y("", "{name: E}")).unwrap_err();
        assert!(e.contains("env E"), "{e}");
        assert!(DaemonSet::parse("kind: ConfigMap\nmetadata: {name: a}\n").unwrap_err().contains("no DaemonSet"));
    }
}
