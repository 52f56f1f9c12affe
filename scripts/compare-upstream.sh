#!/usr/bin/env bash
# Upstream's own flanneld (v0.21.5) and ours side by side (root): `e2e
# compare-upstream` runs both on two nodes of one test-bed cluster per case and
# compares what each made, failing on a difference README.md does not list as
# intended. Upstream's binary lives outside the project, in
# ../shared/reference/upstream (or $FLANNEL_UPSTREAM_REFERENCE_DIR); this fails,
# naming that folder, when it is absent. Extra arguments go to the command
# (e.g. `--case host-gw,dual-stack`).
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${FLANNEL_UPSTREAM_REFERENCE_DIR:-../shared/reference/upstream}
if [ ! -x "$dir/flanneld-v0.21.5" ]; then
  echo "scripts/compare-upstream.sh: no flanneld-v0.21.5 in $dir" >&2
  echo "  the comparison needs upstream's own binaries from ../shared/reference/upstream" >&2
  echo "  (or FLANNEL_UPSTREAM_REFERENCE_DIR set to a folder holding flanneld-v0.21.5)" >&2
  exit 1
fi
SECONDS=0
# Debug builds: what `cargo test` already built in CI; the e2e binary runs the
# flanneld beside it (e2e::cluster::bin_path), so both come from one profile.
cargo build -p e2e -p flanneld --bins
build=$SECONDS
set +e
target/debug/e2e compare-upstream --upstream-dir "$dir" "$@"
rc=$?
set -e
echo "compare-upstream.sh: build ${build} s, comparison $((SECONDS - build)) s, exit $rc"
exit "$rc"
