//! What ADD saves in `<dataDir>/<containerID>` for DEL and GC. Shaped like
//! the delegate config upstream flannel saves there (a bridge plugin
//! configuration), so either implementation can DEL the other's pods; the
//! `flannel` object carries what this plugin needs on top.

use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use flannel_shared::IpNet;
use flannel_shared::firewall::Mode;
use serde::{Deserialize, Serialize};

/// The file ADD writes.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Saved<'a> {
    pub cni_version: &'a str,
    pub name: &'a str,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub bridge: &'a str,
    pub mtu: u32,
    pub ip_masq: bool,
    /// The bridge plugin's key: which tool wrote the pod's masquerade.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip_masq_backend: Option<String>,
    pub is_gateway: bool,
    pub is_default_gateway: bool,
    pub hairpin_mode: bool,
    pub force_address: bool,
    pub promisc_mode: bool,
    pub ipam: SavedIpam<'a>,
    pub flannel: FlannelState,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SavedIpam<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub data_dir: &'a Path,
    /// host-local's range sets: one set per family, one range each.
    pub ranges: Vec<[SavedRange; 1]>,
    pub routes: Vec<SavedRoute>,
}

#[derive(Debug, Serialize)]
pub struct SavedRange {
    pub subnet: IpNet,
}

#[derive(Debug, Serialize)]
pub struct SavedRoute {
    pub dst: IpNet,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gw: Option<IpAddr>,
}

#[derive(Debug, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct FlannelState {
    #[serde(default)]
    pub ifname: Option<String>,
    #[serde(default)]
    pub host_veth: Option<String>,
    /// The pod's addresses with their prefix lengths.
    #[serde(default)]
    pub ips: Vec<IpNet>,
}

/// What DEL and GC read back: the few keys they need, from our file or
/// upstream's (which has no `flannel` object). Other keys are ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SavedState {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub ip_masq: Option<bool>,
    #[serde(default)]
    ip_masq_backend: Option<String>,
    #[serde(default)]
    ipam: Option<LoadedIpam>,
    #[serde(default)]
    flannel: Option<FlannelState>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LoadedIpam {
    #[serde(default)]
    data_dir: Option<PathBuf>,
}

impl SavedState {
    /// How ADD masqueraded the pod, when it says.
    pub fn ip_masq_backend(&self) -> Option<Mode> {
        self.ip_masq_backend.as_deref().and_then(Mode::parse)
    }

    pub fn ipam_data_dir(&self) -> Option<&Path> {
        self.ipam.as_ref()?.data_dir.as_deref()
    }

    pub fn ifname(&self) -> Option<&str> {
        self.flannel.as_ref()?.ifname.as_deref()
    }

    pub fn ips(&self) -> Vec<IpAddr> {
        self.flannel.iter().flat_map(|f| &f.ips).map(|n| n.addr()).collect()
    }
}

pub fn path(data_dir: &Path, container_id: &str) -> PathBuf {
    data_dir.join(container_id)
}

/// The saved state at `path`; `None` when there is none or it cannot be read.
pub fn load(path: &Path) -> Option<SavedState> {
    serde_json::from_slice(&fs::read(path).ok()?).ok()
}

pub fn to_bytes(s: &Saved<'_>) -> Vec<u8> {
    serde_json::to_vec(s).expect("saved state always serializes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_back_what_add_writes_and_upstreams_file() {
        let ips: Vec<IpNet> = vec!["10.244.1.5/24".parse().unwrap(), "fd00:1::5/64".parse().unwrap()];
        let saved = Saved {
            cni_version: "1.0.0",
            name: "cbr0",
            kind: "bridge",
            bridge: "cni0",
            mtu: 1450,
            ip_masq: true,
            ip_masq_backend: Some("nftables".into()),
            is_gateway: true,
            is_default_gateway: false,
            hairpin_mode: true,
            force_address: false,
            promisc_mode: false,
            ipam: SavedIpam {
                kind: "host-local",
                data_dir: Path::new("/var/lib/cni/networks"),
                ranges: vec![[SavedRange { subnet: "10.244.1.0/24".parse().unwrap() }]],
                routes: vec![SavedRoute { dst: "10.244.0.0/16".parse().unwrap(), gw: None }],
            },
            flannel: FlannelState { ifname: Some("eth0".into()), host_veth: Some("veth1".into()), ips },
        };
        let text = String::from_utf8(to_bytes(&saved)).unwrap();
        assert!(text.contains(r#""ranges":[[{"subnet":"10.244.1.0/24"}]]"#), "{text}");
        assert!(text.contains(r#""routes":[{"dst":"10.244.0.0/16"}]"#), "{text}");
        let back: SavedState = serde_json::from_str(&text).unwrap();
        assert_eq!(back.name.as_deref(), Some("cbr0"));
        assert_eq!(back.ip_masq, Some(true));
        assert_eq!(back.ip_masq_backend(), Some(Mode::Nftables));
        assert_eq!(back.ipam_data_dir(), Some(Path::new("/var/lib/cni/networks")));
        assert_eq!(back.ifname(), Some("eth0"));
        assert_eq!(back.ips(), ["10.244.1.5".parse::<IpAddr>().unwrap(), "fd00:1::5".parse().unwrap()]);

        // Upstream flannel's saved delegate config: no flannel object.
        let upstream = r#"{"cniVersion":"0.3.1","hairpinMode":true,"ipMasq":false,"ipam":{"ranges":[[{"subnet":"10.244.1.0/24"}]],"routes":[{"dst":"10.244.0.0/16"}],"type":"host-local"},"isDefaultGateway":true,"isGateway":true,"mtu":1450,"name":"cbr0","type":"bridge"}"#;
        let up: SavedState = serde_json::from_str(upstream).unwrap();
        assert_eq!(
            (up.name.as_deref(), up.ip_masq, up.ipam_data_dir(), up.ifname()),
            (Some("cbr0"), Some(false), None, None)
        );
        assert!(up.ips().is_empty());
    }
}
