//! flanneld, the node agent: subnet leases (etcd; the Kubernetes API behind
//! the same trait), the VXLAN and host-gw data paths, masquerade and forward
//! rules, health and metrics.

pub mod agent;
pub mod backend;
pub mod backoff;
pub mod config;
pub mod doctor;
pub mod firewall;
pub mod health;
pub mod kernel;
pub mod metrics;
pub mod peers;
pub mod preflight;
pub mod reconcile;
pub mod subnet;
