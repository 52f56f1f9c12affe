//! Names both binaries derive from a pod attachment: the plugin creates the
//! host-side veth under it, and `flanneld doctor` finds it again from an IP
//! store reservation alone.

use sha2::{Digest, Sha512};

/// The host-side veth name: deterministic per attachment (container ID and
/// ifname), so DEL and CHECK find it without saved state. `veth` + 8 hex
/// digits, like upstream's.
pub fn host_veth_name(container_id: &str, ifname: &str) -> String {
    let mut h = Sha512::new();
    h.update(container_id.as_bytes());
    h.update(b"\0");
    h.update(ifname.as_bytes());
    let d = h.finalize();
    format!("veth{:02x}{:02x}{:02x}{:02x}", d[0], d[1], d[2], d[3])
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_are_stable_and_fit_ifnamsiz() {
        let n = super::host_veth_name("c1", "eth0");
        assert_eq!(n, super::host_veth_name("c1", "eth0"));
        assert_ne!(n, super::host_veth_name("c1", "eth1"));
        assert!(n.starts_with("veth") && n.len() == 12, "{n}");
    }
}
