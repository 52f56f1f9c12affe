#!/usr/bin/env bash
# Builds the image manifests/kube-flannel.yml names, offline (root, Debian 12):
# release binaries, a minimal Debian root made by mmdebstrap from this machine's
# own apt sources (the essential set plus manifests/image-packages, then cut down
# to what runs by scripts/image-slim.sh), assembled by buildah into one layer. Writes target/image/flannel-rs.tar, an archive that
# `podman load` and `ctr -n k8s.io images import` both take, tagged with the
# manifest's image name; where podman is installed, also loads it under that name.
#   --no-deps    skip scripts/deps.sh (packages already there)
#   --no-load    do not load the archive into podman's default store
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "scripts/image.sh: mmdebstrap and buildah need root here" >&2
  exit 1
fi
deps=1 load=1
for a in "$@"; do
  case $a in
    --no-deps) deps=0 ;;
    --no-load) load=0 ;;
    *) echo "scripts/image.sh: unknown argument $a (--no-deps, --no-load)" >&2; exit 2 ;;
  esac
done
[ "$deps" = 0 ] || bash scripts/deps.sh

# The one name the manifest's containers use.
mapfile -t names < <(sed -n 's/^[[:space:]]*image:[[:space:]]*//p' manifests/kube-flannel.yml | tr -d "\"'" | sort -u)
if [ ${#names[@]} != 1 ]; then
  echo "scripts/image.sh: manifests/kube-flannel.yml names ${#names[@]} images (${names[*]}); expected one" >&2
  exit 1
fi
name=${names[0]}
out=target/image
archive=$out/flannel-rs.tar
mkdir -p "$out"

echo "== release binaries"
cargo build --release --bin flanneld --bin install-conf --bin flannel
# The image's copies without symbol tables (3 MB of flanneld's 16 MB); target/ keeps its own.
mkdir -p "$out/bin"
for b in flanneld install-conf flannel; do strip --strip-all -o "$out/bin/$b" "target/release/$b"; done

# Reproducible file times: the commit's, else now.
SOURCE_DATE_EPOCH=$(git log -1 --format=%ct 2>/dev/null || date +%s)
export SOURCE_DATE_EPOCH

packages=$(sed 's/#.*//' manifests/image-packages | xargs | tr ' ' ,)
srcs=()
for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
  [ ! -s "$f" ] || srcs+=("$f")
done
echo "== root file system: Debian bookworm essential + $packages"
# merged-usr hook: /usr merged by mmdebstrap itself (the usrmerge package would pull in perl).
# Docs, man pages, locales and iconv modules are never read by flanneld or iptables.
mmdebstrap --quiet --variant=essential --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
  --include="$packages" \
  --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
  --dpkgopt='path-exclude=/usr/share/info/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
  --dpkgopt='path-exclude=/usr/lib/x86_64-linux-gnu/gconv/*' \
  --customize-hook='mkdir -p "$1/opt/bin"' \
  --customize-hook="copy-in $out/bin/flanneld /opt/bin" \
  --customize-hook="copy-in $out/bin/install-conf /opt/bin" \
  --customize-hook="copy-in $out/bin/flannel /" \
  --customize-hook='bash scripts/image-slim.sh "$1"' \
  bookworm "$out/rootfs.tar" "${srcs[@]}"

echo "== image $name"
# A private store (vfs works on any file system, also on overlayfs) so the build
# neither needs nor touches the machine's container storage.
store=$out/.store
rm -rf "$store"
b() { buildah --root "$store/root" --runroot "$store/run" --storage-driver vfs "$@"; }
ctr=$(b from --quiet scratch)
b add --quiet "$ctr" "$out/rootfs.tar" /
b config --entrypoint '["/opt/bin/flanneld"]' --cmd '' \
  --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --os linux --arch amd64 \
  --label org.opencontainers.image.title=flannel-rs \
  --label org.opencontainers.image.version="${name##*:}" \
  --label org.opencontainers.image.revision="$(git rev-parse HEAD 2>/dev/null || echo unknown)" \
  "$ctr"
b commit --quiet --timestamp "$SOURCE_DATE_EPOCH" "$ctr" "$name" >/dev/null
rm -f "$archive"
b push --quiet "$name" "docker-archive:$archive:$name"
b rm "$ctr" >/dev/null
rm -rf "$store"

if [ "$load" = 1 ] && command -v podman >/dev/null; then
  podman load --quiet -i "$archive"
fi

raw=$(stat -c %s "$out/rootfs.tar")
gz=$(gzip -6 -c "$out/rootfs.tar" | wc -c)
rm -f "$out/rootfs.tar"
mb() { awk -v b="$1" 'BEGIN { printf "%.1f MB", b / 1e6 }'; }
echo "== $archive ($name): one layer, $(mb "$raw") uncompressed, $(mb "$gz") gzipped"
