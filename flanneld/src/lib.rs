//! flanneld's building blocks, each usable and tested on its own; the agent
//! binary that wires them to a subnet manager (etcd or Kubernetes) comes with
//! the etcd-mode issue.

pub mod iptables;
pub mod reconcile;
