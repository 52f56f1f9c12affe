#!/usr/bin/env bash
# The project's test command (root): unit tests plus the namespace tests that
# run the real binaries (flanneld, the plugin, etcd, containerd, podman, the
# image from scripts/image.sh). Same as what .ci/run runs after its checks.
# Ends with one line totalling every test binary's result.
set -euo pipefail
cd "$(dirname "$0")/.."
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace "$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$rc"
