#!/usr/bin/env bash
# Installs the system packages the demo, the image build and the tests need
# (root, Debian 12). Loads br_netfilter if needed.
#   namespace test-bed: iproute2, iptables, ping, tcpdump, conntrack
#   Debian's reference CNI plugins (portmap, the benchmark baseline)
#   etcd-client's build: protoc AND the well-known .proto files (libprotobuf-dev
#     is only a Recommends of protobuf-compiler, and we install without those)
#   the cluster: etcd-server, etcd-client (etcdctl); openssl for the TLS test's CA
#   the image (scripts/image.sh): mmdebstrap, buildah; podman runs the DaemonSet's
#     containers in the e2e test (crun, conmon come with it); containerd + runc
#     (ctr) take the same archive
set -euo pipefail

packages=(iproute2 iptables iputils-ping tcpdump conntrack kmod procps
          containernetworking-plugins protobuf-compiler libprotobuf-dev
          etcd-server etcd-client openssl
          mmdebstrap buildah podman uidmap ca-certificates containerd runc)
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
