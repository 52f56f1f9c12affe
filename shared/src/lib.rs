//! Formats and kernel plumbing that both binaries speak: IP prefixes,
//! `subnet.env`, network-namespace entry and a thin netlink layer.

pub mod attachment;
pub mod firewall;
pub mod ip;
pub mod lease;
pub mod mac;
pub mod netconf;
pub mod netlink;
pub mod netns;
pub mod subnet_env;

pub use ip::IpNet;
pub use mac::Mac;
