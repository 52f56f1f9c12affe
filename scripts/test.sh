#!/usr/bin/env bash
# The project's test command (root): unit tests plus the namespace tests that
# run the real binaries. Same as what .ci/run runs after its checks.
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo test --workspace "$@"
