//! WireGuard's cross-platform userspace API (the text protocol `wg` speaks to
//! wireguard-go), served for the userspace device on
//! `<dir>/<name>.sock` so `wg show flannel-wg` works as with the kernel's
//! device. Read-only: `set=1` is refused, flanneld owns the configuration.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use tracing::{debug, warn};

use super::{PeerStatus, Settings};

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
    use crate::backend::wireguard::device::{Bind, PeerConfig};
    use crate::backend::wireguard::key::Key;

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
