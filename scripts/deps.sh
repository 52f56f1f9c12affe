#!/usr/bin/env bash
# Installs the system packages the demo and the tests need (root, Debian 12):
# iproute2/iptables/ping/tcpdump for the namespace test-bed, Debian's reference
# CNI plugins (portmap, and the benchmark baseline), protoc for the etcd
# client's build, etcd-server/etcd-client (etcdctl) for the cluster, openssl
# for the throwaway CA of the etcd TLS test. Loads br_netfilter if needed.
set -euo pipefail

packages=(iproute2 iptables iputils-ping tcpdump conntrack kmod procps
          containernetworking-plugins protobuf-compiler etcd-server etcd-client openssl)
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
