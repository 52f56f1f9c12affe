//! WireGuard keys: 32 bytes, written base64 as `wg` and upstream's lease data
//! write them; the node's private key kept in a file across restarts (so
//! peers need no update when flanneld restarts).

use std::fmt;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use boringtun::x25519;

/// Where the private key lives unless `WIREGUARD_KEY_FILE` says otherwise (as upstream).
pub const DEFAULT_KEY_FILE: &str = "/run/flannel/wgkey";

#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key(pub [u8; 32]);

impl Key {
    /// A base64 key as `wg genkey`/`wg genpsk` print it (44 characters).
    pub fn parse(s: &str) -> Result<Key, String> {
        let bytes = STANDARD.decode(s.trim()).map_err(|e| format!("{:?} is not base64: {e}", s.trim()))?;
        let arr: [u8; 32] =
            bytes.try_into().map_err(|b: Vec<u8>| format!("is {} bytes, a WireGuard key is 32", b.len()))?;
        Ok(Key(arr))
    }

    /// A new private key from the kernel's random source, clamped as `wg genkey` does.
    pub fn generate() -> std::io::Result<Key> {
        let mut k = [0u8; 32];
        getrandom(&mut k)?;
        k[0] &= 248;
        k[31] = (k[31] & 127) | 64;
        Ok(Key(k))
    }

    /// The public key of this private key.
    pub fn public(&self) -> Key {
        Key(x25519::PublicKey::from(&x25519::StaticSecret::from(self.0)).to_bytes())
    }

    /// A key as WireGuard's userspace API writes it (64 hex digits).
    pub fn from_hex(s: &str) -> Option<Key> {
        if s.len() != 64 {
            return None;
        }
        let mut k = [0u8; 32];
        for (i, b) in k.iter_mut().enumerate() {
            *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(Key(k))
    }

    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&STANDARD.encode(self.0))
    }
}

/// Never prints key material in full: private keys and PSKs end up in `{:?}` of configs.
impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({}…)", &self.to_string()[..6])
    }
}

fn getrandom(buf: &mut [u8]) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        // SAFETY: the pointer and length describe the unfilled part of `buf`.
        let n = unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), buf.len() - filled, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        filled += n as usize;
    }
    Ok(())
}

/// The key file `WIREGUARD_KEY_FILE` names, or [`DEFAULT_KEY_FILE`].
pub fn key_file() -> std::path::PathBuf {
    std::env::var_os("WIREGUARD_KEY_FILE").map_or_else(|| DEFAULT_KEY_FILE.into(), Into::into)
}

/// The private key in `path`; a new one written there (mode 0600, its folder
/// made) when the file does not exist. Whether it was created.
pub fn load_or_create(path: &Path) -> Result<(Key, bool), String> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let key = Key::parse(&text).map_err(|e| format!("private key file {}: {e}", path.display()))?;
            Ok((key, false))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = Key::generate().map_err(|e| format!("generating a private key: {e}"))?;
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
            }
            let write = || -> std::io::Result<()> {
                let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
                f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
                f.write_all(key.to_string().as_bytes())?;
                f.sync_all()
            };
            write().map_err(|e| format!("writing private key file {}: {e}", path.display()))?;
            Ok((key, true))
        }
        Err(e) => Err(format!("reading private key file {}: {e}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_as_wg_writes_them() {
        // RFC 7748's test vector (Alice): private and public key.
        let private = Key(*b"\x77\x07\x6d\x0a\x73\x18\xa5\x7d\x3c\x16\xc1\x72\x51\xb2\x66\x45\xdf\x4c\x2f\x87\xeb\xc0\x99\x2a\xb1\x77\xfb\xa5\x1d\xb9\x2c\x2a");
        let public = private.public();
        assert_eq!(public.hex(), "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a");
        assert_eq!(Key::parse(&public.to_string()).unwrap(), public);
        assert_eq!(Key::from_hex(&public.hex()), Some(public));
        assert_eq!(Key::from_hex("12"), None);
        assert!(Key::parse("c2hvcnQ=").unwrap_err().contains("is 5 bytes"));
        assert!(Key::parse("not base64!").unwrap_err().contains("not base64"));
        assert_ne!(Key::generate().unwrap(), Key::generate().unwrap());
    }

    #[test]
    fn the_key_file_is_created_0600_once_and_then_kept() {
        let dir = std::env::temp_dir().join(format!("flannel-wgkey-{}", std::process::id()));
        let path = dir.join("sub/wgkey");
        let (k1, created) = load_or_create(&path).unwrap();
        assert!(created);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let (k2, created) = load_or_create(&path).unwrap();
        assert!(!created);
        assert_eq!(k1, k2);
        std::fs::write(&path, "garbage").unwrap();
        let e = load_or_create(&path).unwrap_err();
        assert!(e.contains("private key file") && e.contains("not base64"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
