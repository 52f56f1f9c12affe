#!/usr/bin/env bash
# flanneld's Kubernetes mode against the real kube-apiserver (root): the tests
# of e2e/tests/kube_apiserver.rs, ignored by `cargo test --workspace` because
# the binaries live outside the project, in ../shared/reference/kubernetes
# (or $FLANNEL_KUBE_REFERENCE_DIR). Fails, naming that folder, when it is absent.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${FLANNEL_KUBE_REFERENCE_DIR:-$(pwd)/../shared/reference/kubernetes}
if [ ! -x "$dir/kube-apiserver" ]; then
  echo "scripts/test-kube-apiserver.sh: no kube-apiserver in $dir" >&2
  echo "  these tests need the real Kubernetes binaries from ../shared/reference/kubernetes" >&2
  echo "  (or FLANNEL_KUBE_REFERENCE_DIR set to a folder holding kube-apiserver)" >&2
  exit 1
fi
FLANNEL_KUBE_REFERENCE_DIR=$(cd "$dir" && pwd)
export FLANNEL_KUBE_REFERENCE_DIR
# The tests run target/debug/flanneld, which `cargo test -p e2e` does not build.
cargo build -p flanneld --bins
cargo test -p e2e --test kube_apiserver -- --ignored --test-threads=1 "$@"
