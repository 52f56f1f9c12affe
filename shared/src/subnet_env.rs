//! `/run/flannel/subnet.env`, the file flanneld writes and the CNI plugin reads.
//!
//! Byte-compatible with upstream flannel:
//! ```text
//! FLANNEL_NETWORK=10.244.0.0/16
//! FLANNEL_SUBNET=10.244.1.1/24
//! FLANNEL_MTU=1450
//! FLANNEL_IPMASQ=true
//! ```
//! `FLANNEL_SUBNET` is in gateway form: the first usable address of the
//! node's lease with the lease's prefix length.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::ip::IpNet;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubnetEnv {
    /// Cluster-wide IPv4 network (`FLANNEL_NETWORK`).
    pub network: Option<IpNet>,
    /// This node's IPv4 subnet in gateway form (`FLANNEL_SUBNET`).
    pub subnet: Option<IpNet>,
    pub ipv6_network: Option<IpNet>,
    pub ipv6_subnet: Option<IpNet>,
    pub mtu: u32,
    pub ipmasq: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum SubnetEnvError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: line {line}: {msg}")]
    Invalid { path: PathBuf, line: usize, msg: String },
    #[error("{path}: {msg}")]
    Incomplete { path: PathBuf, msg: String },
}

impl SubnetEnvError {
    /// True when the file does not exist (yet): flanneld has not written it.
    pub fn is_missing(&self) -> bool {
        matches!(self, SubnetEnvError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound)
    }
}

impl SubnetEnv {
    pub fn read(path: &Path) -> Result<SubnetEnv, SubnetEnvError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| SubnetEnvError::Io { path: path.to_path_buf(), source })?;
        Self::parse(&text, path)
    }

    /// Parses the file's text; `path` only labels errors.
    pub fn parse(text: &str, path: &Path) -> Result<SubnetEnv, SubnetEnvError> {
        let invalid = |line: usize, msg: String| SubnetEnvError::Invalid { path: path.to_path_buf(), line, msg };
        let mut env =
            SubnetEnv { network: None, subnet: None, ipv6_network: None, ipv6_subnet: None, mtu: 0, ipmasq: false };
        let mut have_mtu = false;
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (key, value) =
                line.split_once('=').ok_or_else(|| invalid(i + 1, format!("expected KEY=VALUE, got {line:?}")))?;
            let value = value.trim().trim_matches('"');
            let net = |v4: bool| -> Result<IpNet, SubnetEnvError> {
                let n: IpNet = value.parse().map_err(|e| invalid(i + 1, format!("{key}: {e}")))?;
                if n.is_ipv4() != v4 {
                    return Err(invalid(i + 1, format!("{key}: {value} is the wrong address family")));
                }
                Ok(n)
            };
            match key.trim() {
                "FLANNEL_NETWORK" => env.network = Some(net(true)?),
                "FLANNEL_SUBNET" => env.subnet = Some(net(true)?),
                "FLANNEL_IPV6_NETWORK" => env.ipv6_network = Some(net(false)?),
                "FLANNEL_IPV6_SUBNET" => env.ipv6_subnet = Some(net(false)?),
                "FLANNEL_MTU" => {
                    env.mtu = value
                        .parse()
                        .ok()
                        .filter(|m| (68..=65535).contains(m))
                        .ok_or_else(|| invalid(i + 1, format!("FLANNEL_MTU: {value:?} is not an MTU")))?;
                    have_mtu = true;
                }
                "FLANNEL_IPMASQ" => {
                    env.ipmasq = match value {
                        "true" => true,
                        "false" => false,
                        _ => return Err(invalid(i + 1, format!("FLANNEL_IPMASQ: {value:?} is not true/false"))),
                    }
                }
                // Unknown keys are tolerated, as upstream does, so newer agents can add some.
                _ => {}
            }
        }
        let incomplete = |msg: &str| SubnetEnvError::Incomplete { path: path.to_path_buf(), msg: msg.to_string() };
        if env.network.is_some() != env.subnet.is_some() {
            return Err(incomplete("FLANNEL_NETWORK and FLANNEL_SUBNET must be set together"));
        }
        if env.ipv6_network.is_some() != env.ipv6_subnet.is_some() {
            return Err(incomplete("FLANNEL_IPV6_NETWORK and FLANNEL_IPV6_SUBNET must be set together"));
        }
        if env.subnet.is_none() && env.ipv6_subnet.is_none() {
            return Err(incomplete("neither FLANNEL_SUBNET nor FLANNEL_IPV6_SUBNET is set"));
        }
        if !have_mtu {
            return Err(incomplete("FLANNEL_MTU is not set"));
        }
        for (net, sub, name) in
            [(env.network, env.subnet, "FLANNEL_SUBNET"), (env.ipv6_network, env.ipv6_subnet, "FLANNEL_IPV6_SUBNET")]
        {
            if let (Some(net), Some(sub)) = (net, sub)
                && !net.contains_net(&sub)
            {
                return Err(incomplete(&format!("{name} {sub} is outside the network {net}")));
            }
        }
        Ok(env)
    }

    /// The text flanneld writes, in upstream's key order.
    pub fn render(&self) -> String {
        let mut s = String::new();
        if let (Some(n), Some(sn)) = (self.network, self.subnet) {
            s.push_str(&format!("FLANNEL_NETWORK={n}\nFLANNEL_SUBNET={sn}\n"));
        }
        if let (Some(n), Some(sn)) = (self.ipv6_network, self.ipv6_subnet) {
            s.push_str(&format!("FLANNEL_IPV6_NETWORK={n}\nFLANNEL_IPV6_SUBNET={sn}\n"));
        }
        s.push_str(&format!("FLANNEL_MTU={}\nFLANNEL_IPMASQ={}\n", self.mtu, self.ipmasq));
        s
    }

    /// Writes the file so that a reader sees the old or the new content, never a mix:
    /// a temp file in the same directory, fsynced, then renamed over the target.
    pub fn write_atomic(&self, path: &Path) -> io::Result<()> {
        write_file_atomic(path, self.render().as_bytes(), true)
    }
}

/// Writes `data` to `path` via a temp file and rename, creating parent directories.
/// With `durable`, the data is fsynced before the rename (survives a power cut);
/// without, a crash may leave the old file or an empty one, never a torn mix.
pub fn write_file_atomic(path: &Path, data: &[u8], durable: bool) -> io::Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let name = path.file_name().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let tmp = dir.join(format!(".{}.tmp.{}", name.to_string_lossy(), std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        if durable {
            f.sync_all()?;
        }
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    const UPSTREAM: &str =
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n";

    #[test]
    fn round_trips_upstream_bytes() {
        let env = SubnetEnv::parse(UPSTREAM, Path::new("x")).unwrap();
        assert_eq!(env.subnet.unwrap().to_string(), "10.244.1.1/24");
        assert_eq!(env.mtu, 1450);
        assert!(env.ipmasq);
        assert_eq!(env.render(), UPSTREAM);
    }

    #[test]
    fn rejects_bad_files_with_line_numbers() {
        let e = SubnetEnv::parse("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=banana\n", Path::new("f")).unwrap_err();
        assert!(e.to_string().contains("line 2"), "{e}");
        let e = SubnetEnv::parse(
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.9.1.1/24\nFLANNEL_MTU=1450\n",
            Path::new("f"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("outside"), "{e}");
        let e = SubnetEnv::parse("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\n", Path::new("f"))
            .unwrap_err();
        assert!(e.to_string().contains("FLANNEL_MTU"), "{e}");
    }

    #[test]
    fn atomic_write_replaces_content() {
        let dir = std::env::temp_dir().join(format!("subnetenv-test-{}", std::process::id()));
        let path = dir.join("subnet.env");
        let env = SubnetEnv::parse(UPSTREAM, Path::new("x")).unwrap();
        env.write_atomic(&path).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), UPSTREAM);
        let mut env2 = env.clone();
        env2.mtu = 1500;
        env2.write_atomic(&path).unwrap();
        assert_eq!(SubnetEnv::read(&path).unwrap().mtu, 1500);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1, "temp file left behind");
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(SubnetEnv::read(&path).unwrap_err().is_missing());
    }
}
