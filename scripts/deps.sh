#!/usr/bin/env bash
# Installs the system packages the demo, the image build and the tests need
# (root, Debian 12). Loads br_netfilter if needed.
#   namespace test-bed: iproute2, iptables, nftables (nft), ping, tcpdump, conntrack
#   Debian's reference CNI plugins (portmap, the benchmark baseline)
#   etcd-client's build: protoc AND the well-known .proto files (libprotobuf-dev
#     is only a Recommends of protobuf-compiler, and we install without those)
#   the cluster: etcd-server, etcd-client (etcdctl); openssl for the TLS tests' CAs; curl, the client
#     of the real-kube-apiserver tests (scripts/test-kube-apiserver.sh)
#   the image (scripts/image.sh): mmdebstrap, buildah; podman runs the DaemonSet's
#     containers in the e2e test (crun, conmon come with it); containerd + runc
#     (ctr) take the same archive and are the e2e nodes' CRI runtime; busybox-static
#     is the root of podman's test containers
#   the wireguard tests: wireguard-go + wireguard-tools (wg), the reference WireGuard the
#     interop test and the throughput benchmark run beside ours (this kernel has no WireGuard)
set -euo pipefail

packages=(iproute2 iptables nftables iputils-ping tcpdump conntrack kmod procps
          containernetworking-plugins protobuf-compiler libprotobuf-dev
          etcd-server etcd-client openssl curl
          mmdebstrap buildah podman uidmap ca-certificates containerd runc busybox-static
          wireguard-go wireguard-tools)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "== installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# flanneld refuses to start without br_netfilter (built in on some kernels).
[ -e /proc/sys/net/bridge/bridge-nf-call-iptables ] || modprobe br_netfilter

# Container engines (podman, containerd's runc) need the cgroup hierarchies
# mounted. A machine has them; a bare chroot of one (the fresh-machine replay)
# does not: mount the machine's own layout there, one v1 hierarchy per
# controller the kernel has in use, name=systemd and the unified cgroup2, as
# this kind of machine (cgroups v1, hybrid) has them.
if ! grep -qE '^[^ ]+ /sys/fs/cgroup[/ ]' /proc/self/mounts; then
  echo "== mounting cgroup hierarchies (none mounted here)"
  mount -t tmpfs -o mode=755 tmpfs /sys/fs/cgroup
  while read -r name hier _ enabled; do
    [ "$name" != "#subsys_name" ] && [ "$hier" != 0 ] && [ "$enabled" = 1 ] || continue
    mkdir -p "/sys/fs/cgroup/$name"
    mount -t cgroup -o "$name" cgroup "/sys/fs/cgroup/$name"
  done </proc/cgroups
  mkdir -p /sys/fs/cgroup/systemd /sys/fs/cgroup/unified
  mount -t cgroup -o none,name=systemd cgroup /sys/fs/cgroup/systemd
  mount -t cgroup2 cgroup2 /sys/fs/cgroup/unified
fi
