//! CNI errors: every failure leaves the plugin as `{"code","msg","details"}` on stdout.

use std::fmt;

/// Error codes. 1-99 are the CNI spec's; 100 and up are this plugin's own.
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const INVALID_ENV: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODE_FAILURE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const NOT_AVAILABLE: u32 = 50;
    /// A kernel (netlink) operation failed.
    pub const KERNEL_FAILURE: u32 = 100;
    /// The node subnet has no free address left.
    pub const NO_ADDRESSES: u32 = 101;
    /// CHECK found the attachment differs from what ADD set up.
    pub const CHECK_FAILED: u32 = 102;
    /// A firewall command (ipMasq: iptables or nft) failed.
    pub const IPTABLES_FAILURE: u32 = 103;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        CniError { code, msg: msg.into(), details: String::new() }
    }

    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    pub fn to_json(&self, cni_version: &str) -> String {
        let wire = WireError { cni_version, code: self.code, msg: &self.msg, details: &self.details };
        serde_json::to_string(&wire).expect("an error always serializes")
    }
}

/// The spec's error object.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct WireError<'a> {
    cni_version: &'a str,
    code: u32,
    msg: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    details: &'a str,
}

impl fmt::Display for CniError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.msg)?;
        if !self.details.is_empty() {
            write!(f, ": {}", self.details)?;
        }
        Ok(())
    }
}

impl From<flannel_shared::netlink::NetlinkError> for CniError {
    fn from(e: flannel_shared::netlink::NetlinkError) -> Self {
        CniError::new(code::KERNEL_FAILURE, e.to_string())
    }
}

pub type Result<T> = std::result::Result<T, CniError>;

/// Shorthand for an I/O failure with context.
pub fn io_err(what: impl fmt::Display, e: std::io::Error) -> CniError {
    CniError::new(code::IO_FAILURE, format!("{what}: {e}"))
}
