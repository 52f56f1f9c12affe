//! The wireguard backend's keys in net-conf.json's `Backend` object, as
//! upstream reads them (names, defaults), each error naming its field.

use flannel_shared::netconf::{Backend as Section, NetConfigError};

use super::key::Key;

/// How the two families share tunnels (upstream's `Mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// One device per family: `flannel-wg` over IPv4, `flannel-wg-v6` over IPv6 (the default).
    Separate,
    /// One device for both families; each peer reached over the address family
    /// most likely to work (a public IPv4 address first, then a public IPv6 one).
    Auto,
    /// One device for both families, peers reached over IPv4.
    Ipv4,
    /// One device for both families, peers reached over IPv6.
    Ipv6,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// `PSK`: a preshared key mixed into every handshake (`wg genpsk`).
    pub psk: Option<Key>,
    /// `ListenPort` (51820): the UDP port of `flannel-wg`.
    pub listen_port: u16,
    /// `ListenPortV6` (51821): the UDP port of `flannel-wg-v6`.
    pub listen_port_v6: u16,
    /// `PersistentKeepaliveInterval` in seconds; 0 (the default) is off.
    pub keepalive: Option<u16>,
    pub mode: Mode,
    /// `MTU`: the underlay's MTU (upstream's meaning); the devices and pods get
    /// this minus 80. The uplink's MTU when absent.
    pub mtu: Option<u32>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            psk: None,
            listen_port: 51820,
            listen_port_v6: 51821,
            keepalive: None,
            mode: Mode::Separate,
            mtu: None,
        }
    }
}

const KNOWN: &[&str] = &["psk", "listenport", "listenportv6", "persistentkeepaliveinterval", "mode", "mtu"];

fn port(b: &Section, key: &str, name: &str, default: u16) -> Result<u16, NetConfigError> {
    match b.uint(key, name, 65535)? {
        None => Ok(default),
        Some(0) => Err(NetConfigError::new(name, "0 is not a port (1..65535)")),
        Some(p) => Ok(p as u16),
    }
}

impl Config {
    pub fn parse(b: &Section, warn: &mut dyn FnMut(String)) -> Result<Config, NetConfigError> {
        b.warn_unknown(KNOWN, warn);
        let psk = match b.string("psk", "Backend.PSK")? {
            None | Some("") => None,
            Some(s) => Some(Key::parse(s).map_err(|e| {
                NetConfigError::new("Backend.PSK", format!("{e} (make one with `wg genpsk`)").replace(s, "<PSK>"))
            })?),
        };
        let mode = match b.string("mode", "Backend.Mode")? {
            None | Some("separate") => Mode::Separate,
            Some("auto") => Mode::Auto,
            Some("ipv4") => Mode::Ipv4,
            Some("ipv6") => Mode::Ipv6,
            Some(m) => {
                return Err(NetConfigError::new(
                    "Backend.Mode",
                    format!("{m:?} is not a mode (use \"separate\", \"auto\", \"ipv4\" or \"ipv6\")"),
                ));
            }
        };
        Ok(Config {
            psk,
            listen_port: port(b, "listenport", "Backend.ListenPort", 51820)?,
            listen_port_v6: port(b, "listenportv6", "Backend.ListenPortV6", 51821)?,
            keepalive: b
                .uint("persistentkeepaliveinterval", "Backend.PersistentKeepaliveInterval", 65535)?
                .filter(|s| *s > 0)
                .map(|s| s as u16),
            mode,
            mtu: match b.uint("mtu", "Backend.MTU", 65535)? {
                None | Some(0) => None,
                Some(m) if m < 576 + 80 => {
                    return Err(NetConfigError::new(
                        "Backend.MTU",
                        format!("{m} leaves the pods less than 576 after WireGuard's 80 bytes"),
                    ));
                }
                Some(m) => Some(m as u32),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flannel_shared::netconf::NetConfig;

    fn parse(backend: &str) -> Result<Config, NetConfigError> {
        let doc = format!(r#"{{"Network":"10.244.0.0/16","Backend":{backend}}}"#);
        Config::parse(&NetConfig::parse(&doc, |_| {}).unwrap().backend, &mut |_| {})
    }

    #[test]
    fn upstream_defaults_and_keys() {
        assert_eq!(parse(r#"{"Type":"wireguard"}"#).unwrap(), Config::default());
        let psk = "ObRoIFzeh2A4HNo3XB+p3fVx4tmvZdD97R5vk8XUapM=";
        let c = parse(&format!(
            r#"{{"Type":"wireguard","PSK":"{psk}","ListenPort":5000,"listenPortV6":5001,
                "PersistentKeepaliveInterval":25,"Mode":"auto","MTU":1400}}"#
        ))
        .unwrap();
        assert_eq!(c.psk.unwrap().to_string(), psk);
        assert_eq!(
            (c.listen_port, c.listen_port_v6, c.keepalive, c.mode, c.mtu),
            (5000, 5001, Some(25), Mode::Auto, Some(1400))
        );
        assert_eq!(parse(r#"{"Type":"wireguard","PersistentKeepaliveInterval":0}"#).unwrap().keepalive, None);
    }

    #[test]
    fn errors_name_the_field_and_never_echo_the_psk() {
        for (backend, field) in [
            (r#"{"Type":"wireguard","PSK":"not-a-key"}"#, "Backend.PSK"),
            (r#"{"Type":"wireguard","PSK":"c2hvcnQ="}"#, "Backend.PSK"),
            (r#"{"Type":"wireguard","PSK":7}"#, "Backend.PSK"),
            (r#"{"Type":"wireguard","ListenPort":70000}"#, "Backend.ListenPort"),
            (r#"{"Type":"wireguard","ListenPort":0}"#, "Backend.ListenPort"),
            (r#"{"Type":"wireguard","ListenPortV6":-1}"#, "Backend.ListenPortV6"),
            (r#"{"Type":"wireguard","Mode":"both"}"#, "Backend.Mode"),
            (r#"{"Type":"wireguard","MTU":600}"#, "Backend.MTU"),
            (r#"{"Type":"wireguard","PersistentKeepaliveInterval":100000}"#, "Backend.PersistentKeepaliveInterval"),
        ] {
            let e = parse(backend).unwrap_err();
            assert_eq!(e.field, field, "{backend}");
            assert!(!e.to_string().contains("not-a-key") && !e.to_string().contains("c2hvcnQ"), "{e}");
        }
    }
}
