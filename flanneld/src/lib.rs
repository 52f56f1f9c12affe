//! flanneld's building blocks (the agent binary is assembled in the etcd-mode issue).
//! manager (etcd or Kubernetes); each piece is usable and tested on its own.

pub mod reconcile;
