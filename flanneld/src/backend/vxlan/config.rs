//! The vxlan backend's keys in net-conf.json's `Backend` object, as upstream
//! reads them (defaults and ranges), each error naming its field.

use flannel_shared::netconf::{Backend as Section, NetConfigError};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// VXLAN network identifier (`VNI`, 1 by default).
    pub vni: u32,
    /// VXLAN UDP port (`Port`, 8472 by default or when 0).
    pub port: u16,
    /// Peers on the uplink's own network get direct routes instead of the overlay.
    pub direct_routing: bool,
    /// The *underlay* MTU the backend plans for, as upstream reads `Backend.MTU`:
    /// the VXLAN device (and FLANNEL_MTU) gets this minus the encapsulation
    /// overhead. The uplink's MTU when absent.
    pub mtu: Option<u32>,
    /// Group-based policy extension.
    pub gbp: bool,
    /// Kernel MAC learning on the device (upstream's `Learning`, off by default).
    pub learning: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config { vni: 1, port: 8472, direct_routing: false, mtu: None, gbp: false, learning: false }
    }
}

const KNOWN: &[&str] = &["vni", "port", "directrouting", "mtu", "gbp", "learning", "macprefix"];

impl Config {
    pub fn parse(b: &Section, warn: &mut dyn FnMut(String)) -> Result<Config, NetConfigError> {
        b.warn_unknown(KNOWN, warn);
        Ok(Config {
            vni: b.uint("vni", "Backend.VNI", 0xff_ffff)?.unwrap_or(1) as u32,
            port: match b.uint("port", "Backend.Port", 65535)? {
                None | Some(0) => 8472,
                Some(p) => p as u16,
            },
            direct_routing: b.bool("directrouting", "Backend.DirectRouting")?.unwrap_or(false),
            mtu: match b.uint("mtu", "Backend.MTU", 65535)? {
                None | Some(0) => None,
                Some(m) if m < 576 => {
                    return Err(NetConfigError::new("Backend.MTU", format!("{m} is below the minimum of 576")));
                }
                Some(m) => Some(m as u32),
            },
            gbp: b.bool("gbp", "Backend.GBP")?.unwrap_or(false),
            learning: b.bool("learning", "Backend.Learning")?.unwrap_or(false),
        })
    }

    /// The config of a section already checked at start (doctor, teardown after
    /// a switch, where the section may be another backend's): defaults for what
    /// does not parse.
    pub fn lenient(b: &Section) -> Config {
        Config::parse(b, &mut |_| {}).unwrap_or_else(|_| Config {
            vni: b.uint("vni", "", 0xff_ffff).ok().flatten().map_or(1, |v| v as u32),
            ..Config::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flannel_shared::netconf::NetConfig;

    fn parse(doc: &str) -> Result<Config, NetConfigError> {
        Config::parse(&NetConfig::parse(doc, |_| {}).unwrap().backend, &mut |_| {})
    }

    #[test]
    fn upstream_defaults_and_case_insensitive_keys() {
        assert_eq!(parse(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#).unwrap(), Config::default());
        for key in ["VNI", "vni", "Vni"] {
            let c = parse(&format!(r#"{{"network":"10.1.0.0/16","BACKEND":{{"type":"vxlan","{key}":42}}}}"#)).unwrap();
            assert_eq!(c.vni, 42, "{key}");
        }
        let c = parse(r#"{"Network":"10.1.0.0/16","Backend":{"Port":0,"MTU":1400,"DirectRouting":true}}"#).unwrap();
        assert_eq!((c.port, c.mtu, c.direct_routing), (8472, Some(1400), true));
        let mut warned = Vec::new();
        let b = NetConfig::parse(r#"{"Network":"10.1.0.0/16","Backend":{"Type":"vxlan","Foo":1}}"#, |_| {}).unwrap();
        Config::parse(&b.backend, &mut |w| warned.push(w)).unwrap();
        assert_eq!(warned, ["network config: Backend.foo does not apply to vxlan and is ignored"]);
    }

    #[test]
    fn errors_name_the_field() {
        for (doc, field) in [
            (r#"{"Network":"10.0.0.0/16","Backend":{"VNI":"one"}}"#, "Backend.VNI"),
            (r#"{"Network":"10.0.0.0/16","Backend":{"VNI":16777216}}"#, "Backend.VNI"),
            (r#"{"Network":"10.0.0.0/16","Backend":{"MTU":100}}"#, "Backend.MTU"),
            (r#"{"Network":"10.0.0.0/16","Backend":{"Learning":1}}"#, "Backend.Learning"),
            (r#"{"Network":"10.0.0.0/16","Backend":{"Port":70000}}"#, "Backend.Port"),
        ] {
            assert_eq!(parse(doc).unwrap_err().field, field, "{doc}");
        }
    }
}
