//! MAC addresses: one type for the kernel's six bytes and the
//! `aa:bb:cc:dd:ee:ff` text leases carry (`VtepMAC`), as Go's
//! `net.HardwareAddr` writes it.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Mac(pub [u8; 6]);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a MAC address (aa:bb:cc:dd:ee:ff)")]
pub struct MacError(pub String);

impl Mac {
    /// `aa:bb:cc:dd:ee:ff` (hex digits in either case), else `None`.
    pub fn parse(s: &str) -> Option<Mac> {
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for b in out.iter_mut() {
            let p = parts.next()?;
            if p.len() != 2 {
                return None;
            }
            *b = u8::from_str_radix(p, 16).ok()?;
        }
        parts.next().is_none().then_some(Mac(out))
    }

    /// From a netlink attribute: exactly six bytes.
    pub fn from_slice(b: &[u8]) -> Option<Mac> {
        <[u8; 6]>::try_from(b).ok().map(Mac)
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = &self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5])
    }
}

impl fmt::Debug for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Mac {
    type Err = MacError;
    fn from_str(s: &str) -> Result<Mac, MacError> {
        Mac::parse(s).ok_or_else(|| MacError(s.to_string()))
    }
}

impl From<[u8; 6]> for Mac {
    fn from(b: [u8; 6]) -> Mac {
        Mac(b)
    }
}

impl Serialize for Mac {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Mac {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Mac, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_round_trip_and_bad_forms() {
        let m: Mac = "0a:58:0A:f4:01:01".parse().unwrap();
        assert_eq!(m, Mac([0x0a, 0x58, 0x0a, 0xf4, 1, 1]));
        assert_eq!(m.to_string(), "0a:58:0a:f4:01:01");
        for bad in ["0a:58:0a:f4:01", "0a:58:0a:f4:01:01:02", "zz:58:0a:f4:01:01", "0a58:0a:f4:01:01", ""] {
            assert!(Mac::parse(bad).is_none(), "{bad}");
        }
        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(json, r#""0a:58:0a:f4:01:01""#);
        assert_eq!(serde_json::from_str::<Mac>(&json).unwrap(), m);
        let e = serde_json::from_str::<Mac>(r#""nope""#).unwrap_err().to_string();
        assert!(e.contains("\"nope\" is not a MAC address"), "{e}");
        assert_eq!(Mac::from_slice(&[1, 2, 3, 4, 5, 6]), Some(Mac([1, 2, 3, 4, 5, 6])));
        assert_eq!(Mac::from_slice(&[1, 2, 3]), None);
    }
}
