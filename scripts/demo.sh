#!/usr/bin/env bash
# The main job on a fresh machine (root, Debian 12): installs what the demo
# needs, builds the release binaries and runs the multi-node demo.
# Arguments go to the demo: --backend vxlan|host-gw|wireguard, --nodes N, --keep.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "scripts/demo.sh: the demo creates network namespaces and must run as root" >&2
  exit 1
fi
bash scripts/deps.sh
cargo build --release
exec target/release/e2e demo "$@"
