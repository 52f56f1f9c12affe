//! MAC addresses in the `aa:bb:cc:dd:ee:ff` form.

/// Formats a MAC as `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for b in out.iter_mut() {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_round_trip() {
        let m = parse_mac("0a:58:0a:f4:01:01").unwrap();
        assert_eq!(format_mac(&m), "0a:58:0a:f4:01:01");
        assert!(parse_mac("0a:58:0a:f4:01").is_none());
        assert!(parse_mac("0a:58:0a:f4:01:01:02").is_none());
        assert!(parse_mac("zz:58:0a:f4:01:01").is_none());
    }
}
