//! IP prefixes for both families, with the arithmetic IPAM and the backends need.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// An address with a prefix length, e.g. `10.244.1.1/24` (gateway form) or
/// `10.244.1.0/24` (network form). The host bits are kept as given.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IpNetError {
    #[error("{0:?} is not in CIDR notation (address/prefix)")]
    NotCidr(String),
    #[error("{0:?} is not a valid IP address")]
    BadAddress(String),
    #[error("prefix length {prefix} is out of range for {addr}")]
    BadPrefix { addr: IpAddr, prefix: u8 },
}

fn bits(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u32::from(a) as u128,
        IpAddr::V6(a) => u128::from(a),
    }
}

fn width(ip: IpAddr) -> u8 {
    if ip.is_ipv4() { 32 } else { 128 }
}

fn from_bits(template: IpAddr, v: u128) -> IpAddr {
    match template {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::from(v as u32)),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::from(v)),
    }
}

impl IpNet {
    pub fn new(addr: IpAddr, prefix: u8) -> Result<Self, IpNetError> {
        if prefix > width(addr) {
            return Err(IpNetError::BadPrefix { addr, prefix });
        }
        Ok(IpNet { addr, prefix })
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    pub fn is_ipv4(&self) -> bool {
        self.addr.is_ipv4()
    }

    /// Number of host bits.
    pub fn host_bits(&self) -> u8 {
        width(self.addr) - self.prefix
    }

    fn host_mask(&self) -> u128 {
        let hb = self.host_bits() as u32;
        if hb >= 128 { u128::MAX } else { (1u128 << hb) - 1 }
    }

    /// The network address (host bits cleared).
    pub fn network_addr(&self) -> IpAddr {
        from_bits(self.addr, bits(self.addr) & !self.host_mask())
    }

    /// The same prefix in network form.
    pub fn network(&self) -> IpNet {
        IpNet { addr: self.network_addr(), prefix: self.prefix }
    }

    /// The last address of the prefix (the IPv4 broadcast address).
    pub fn last_addr(&self) -> IpAddr {
        from_bits(self.addr, bits(self.addr) | self.host_mask())
    }

    /// The address `n` positions after the network address, if it lies inside.
    pub fn nth(&self, n: u128) -> Option<IpAddr> {
        if n > self.host_mask() {
            return None;
        }
        Some(from_bits(self.addr, (bits(self.addr) & !self.host_mask()) + n))
    }

    /// Position of `ip` inside this prefix (inverse of [`IpNet::nth`]).
    pub fn offset_of(&self, ip: IpAddr) -> Option<u128> {
        self.contains(ip).then(|| bits(ip) & self.host_mask())
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.addr.is_ipv4() && (bits(ip) & !self.host_mask()) == (bits(self.addr) & !self.host_mask())
    }

    /// Whether `other` lies entirely inside this prefix.
    pub fn contains_net(&self, other: &IpNet) -> bool {
        other.prefix >= self.prefix && self.contains(other.addr)
    }

    pub fn overlaps(&self, other: &IpNet) -> bool {
        self.contains(other.addr) || other.contains(self.addr)
    }

    /// The same address with a different prefix length.
    pub fn with_prefix(&self, prefix: u8) -> Result<IpNet, IpNetError> {
        IpNet::new(self.addr, prefix)
    }

    /// The default route of this family (`0.0.0.0/0` or `::/0`).
    pub fn default_route(v4: bool) -> IpNet {
        if v4 {
            IpNet { addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED), prefix: 0 }
        } else {
            IpNet { addr: IpAddr::V6(Ipv6Addr::UNSPECIFIED), prefix: 0 }
        }
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for IpNet {
    type Err = IpNetError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (a, p) = s.split_once('/').ok_or_else(|| IpNetError::NotCidr(s.to_string()))?;
        let addr: IpAddr = a.parse().map_err(|_| IpNetError::BadAddress(a.to_string()))?;
        let prefix: u8 = p.parse().map_err(|_| IpNetError::NotCidr(s.to_string()))?;
        IpNet::new(addr, prefix)
    }
}

impl serde::Serialize for IpNet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for IpNet {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_masks() {
        let n: IpNet = "10.244.1.1/24".parse().unwrap();
        assert_eq!(n.network().to_string(), "10.244.1.0/24");
        assert_eq!(n.last_addr().to_string(), "10.244.1.255");
        assert_eq!(n.nth(2).unwrap().to_string(), "10.244.1.2");
        assert_eq!(n.nth(256), None);
        assert!(n.contains("10.244.1.77".parse().unwrap()));
        assert!(!n.contains("10.244.2.1".parse().unwrap()));
        assert_eq!(n.offset_of("10.244.1.9".parse().unwrap()), Some(9));
        let big: IpNet = "10.244.0.0/16".parse().unwrap();
        assert!(big.contains_net(&n));
        assert!(!n.contains_net(&big));
    }

    #[test]
    fn ipv6_and_errors() {
        let n: IpNet = "fd00:1::5/64".parse().unwrap();
        assert_eq!(n.network().to_string(), "fd00:1::/64");
        assert_eq!(n.nth(1).unwrap().to_string(), "fd00:1::1");
        assert!(!n.contains("10.0.0.1".parse().unwrap()));
        assert!("10.0.0.0".parse::<IpNet>().is_err());
        assert!("10.0.0.0/33".parse::<IpNet>().is_err());
        assert!("10.0.0.x/8".parse::<IpNet>().is_err());
        let all: IpNet = "::/0".parse().unwrap();
        assert!(all.contains("fd00::1".parse().unwrap()));
    }
}
