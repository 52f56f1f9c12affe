//! WireGuard's cross-platform userspace API (the text protocol `wg` speaks to
//! wireguard-go), served for the userspace device on
//! `<dir>/<name>.sock` so `wg show flannel-wg` works as with the kernel's
//! device. Read-only: `set=1` is refused, flanneld owns the configuration.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use tracing::{debug, warn};

use super::{PeerConfig, PeerSet, PeerStatus, Settings};
use crate::backend::wireguard::key::Key;

/// Where `wg` looks for userspace devices' sockets; `FLANNEL_WG_SOCKET_DIR`
/// moves it (tests run several nodes on one filesystem).
pub fn socket_dir() -> PathBuf {
    std::env::var_os("FLANNEL_WG_SOCKET_DIR").map_or_else(|| "/var/run/wireguard".into(), Into::into)
}

pub fn socket_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.sock"))
}

/// The answer to `get=1`.
pub fn format_get(settings: &Settings, port: u16, peers: &[PeerStatus]) -> String {
    let mut s = format!("private_key={}\nlisten_port={port}\n", settings.private.hex());
    for p in peers {
        s += &format!("public_key={}\n", p.key.hex());
        if let Some(psk) = settings.psk {
            s += &format!("preshared_key={}\n", psk.hex());
        }
        if let Some(e) = p.cfg.endpoint {
            s += &format!("endpoint={e}\n");
        }
        let (sec, nsec) = p
            .last_handshake
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or((0, 0), |d| (d.as_secs(), d.subsec_nanos()));
        s += &format!(
            "last_handshake_time_sec={sec}\nlast_handshake_time_nsec={nsec}\ntx_bytes={}\nrx_bytes={}\npersistent_keepalive_interval={}\n",
            p.tx_bytes,
            p.rx_bytes,
            settings.keepalive.unwrap_or(0)
        );
        for n in &p.cfg.allowed {
            s += &format!("allowed_ip={n}\n");
        }
    }
    s += "protocol_version=1\nerrno=0\n\n";
    s
}

/// Reads a `get=1` answer back: the listen port and the peers (what `wg show`
/// shows). `None` when it is no answer (no `errno=0`).
pub fn parse_get(text: &str) -> Option<(u16, PeerSet)> {
    let mut port = 0;
    let mut peers = PeerSet::new();
    let mut current: Option<Key> = None;
    let mut ok = false;
    for line in text.lines() {
        let Some((k, v)) = line.split_once('=') else { continue };
        match k {
            "listen_port" => port = v.parse().ok()?,
            "public_key" => {
                let key = Key::from_hex(v)?;
                peers.insert(key, PeerConfig { endpoint: None, allowed: Vec::new() });
                current = Some(key);
            }
            "endpoint" => peers.get_mut(current.as_ref()?)?.endpoint = v.parse().ok(),
            "allowed_ip" => peers.get_mut(current.as_ref()?)?.allowed.push(v.parse().ok()?),
            "errno" => ok = v == "0",
            _ => {}
        }
    }
    for p in peers.values_mut() {
        p.allowed.sort();
    }
    ok.then_some((port, peers))
}

/// Asks a userspace device (ours or wireguard-go) on its socket.
pub fn get(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut s = std::os::unix::net::UnixStream::connect(path)?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(2)))?;
    s.write_all(b"get=1\n\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// Serves `get=1` on the device's socket until the device is gone; `status`
/// gives the current answer (`None`: the device stopped).
pub fn serve(path: PathBuf, status: impl Fn() -> Option<String> + Send + 'static) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    std::thread::Builder::new().name("wg-uapi".into()).spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let mut line = String::new();
            let mut reader = BufReader::new(&conn);
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            let answer = match line.trim_end() {
                "get=1" => match status() {
                    Some(a) => a,
                    None => break,
                },
                "set=1" => {
                    // Drain the request; flanneld owns the device.
                    let mut l = String::new();
                    while reader.read_line(&mut l).is_ok_and(|n| n > 0) && l.trim_end() != "" {
                        l.clear();
                    }
                    "errno=1\n\n".to_string()
                }
                other => {
                    debug!("wireguard uapi: unknown request {other:?}");
                    "errno=22\n\n".to_string()
                }
            };
            if let Err(e) = (&conn).write_all(answer.as_bytes()) {
                debug!("wireguard uapi: {e}");
            }
        }
        let _ = std::fs::remove_file(&path);
    })?;
    Ok(())
}

/// Logs instead of failing: `wg show` is a convenience, the tunnels work without it.
pub fn serve_or_warn(path: PathBuf, status: impl Fn() -> Option<String> + Send + 'static) {
    if let Err(e) = serve(path.clone(), status) {
        warn!("wireguard: no `wg show` socket at {}: {e}", path.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::wireguard::device::Bind;

    #[test]
    fn get_answers_as_the_cross_platform_api_spells_it() {
        let settings = Settings {
            name: "flannel-wg".into(),
            private: Key([1; 32]),
            port: 51820,
            psk: None,
            keepalive: Some(25),
            bind: Bind::V4,
        };
        let peers = [PeerStatus {
            key: Key([2; 32]),
            cfg: PeerConfig {
                endpoint: Some("192.0.2.2:51820".parse().unwrap()),
                allowed: vec!["10.244.2.0/24".parse().unwrap()],
            },
            last_handshake: Some(UNIX_EPOCH + std::time::Duration::new(1_700_000_000, 5)),
            tx_bytes: 10,
            rx_bytes: 20,
        }];
        let got = format_get(&settings, 51820, &peers);
        let (port, back) = parse_get(&got).unwrap();
        assert_eq!((port, back.len()), (51820, 1));
        assert_eq!(back[&Key([2; 32])], peers[0].cfg);
        assert_eq!(parse_get("errno=1\n\n"), None);
        assert_eq!(
            got,
            format!(
                "private_key={}\nlisten_port=51820\npublic_key={}\nendpoint=192.0.2.2:51820\n\
                 last_handshake_time_sec=1700000000\nlast_handshake_time_nsec=5\ntx_bytes=10\nrx_bytes=20\n\
                 persistent_keepalive_interval=25\nallowed_ip=10.244.2.0/24\nprotocol_version=1\nerrno=0\n\n",
                "01".repeat(32),
                "02".repeat(32)
            )
        );
    }
}
