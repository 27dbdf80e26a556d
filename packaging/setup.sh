#!/usr/bin/env bash
# What `make run`, `make test` and `make plugin` need on a fresh Debian 12 machine: the apt packages that are
# missing are named, then installed; `test` also unpacks the current Docker engine (packaging/engine.sh).
#
#   packaging/setup.sh run|test|plugin
set -euo pipefail
cd "$(dirname "$0")/.."

mode=${1:?usage: packaging/setup.sh run|test|plugin}
case $mode in
  # the plugin itself: Python's venv, netlink/iptables/nftables tools, the embedded single-host etcd
  run)    packages=(python3-venv iproute2 iptables nftables etcd-server kmod) ;;
  # the suite: Docker 20.10 (Debian 12's) and its runc for the rig's hosts, a real etcd and its client,
  # busybox-static for test images, tools the tests look with, user-mode-linux for the ESP-capable guest,
  # debootstrap for the managed plugin's local base image
  test)   packages=(python3-venv iproute2 iptables nftables etcd-server etcd-client kmod docker.io busybox-static
                    iputils-ping tcpdump iperf3 util-linux make user-mode-linux debootstrap) ;;
  # `make plugin` where no registry is reachable: the base image is built locally
  plugin) packages=(debootstrap) ;;
  *) echo "usage: packaging/setup.sh run|test|plugin" >&2; exit 2 ;;
esac
# On a CPU with AMX, Debian 12's user-mode-linux cannot boot: the suite builds its own from the same source
# with one patch (packaging/uml-kernel.sh), which takes a compiler and the package's build dependencies.
amx=0
grep -qw amx_tile /proc/cpuinfo && amx=1
if [ "$mode" = test ] && [ $amx = 1 ]; then
  packages+=(gcc make flex bison bc libc6-dev libelf-dev libvdeplug-dev patch xz-utils)
fi

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: missing ${missing[*]}; run as root (sudo make $mode) to have them installed" >&2
    exit 1
  fi
  echo "setup: installing ${missing[*]} (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

if [ "$mode" = run ] && ! command -v dockerd >/dev/null && ! command -v docker >/dev/null; then
  echo "setup: no Docker engine found on this machine; pyoverlay is a plugin for one (install docker.io or" \
       "Docker CE): the plugin starts anyway and Docker finds it once it runs" >&2
fi
if [ "$mode" = test ] && ! packaging/engine.sh >/dev/null; then
  # The suite's default engine is Debian 12's; Docker 28 is for PYOVERLAY_ENGINE=28 runs.
  echo "setup: could not unpack Docker 28 (packaging/engine.sh); the rig runs Docker 20.10" >&2
fi
if [ "$mode" = test ] && [ $amx = 1 ] && ! packaging/uml-kernel.sh >/dev/null; then
  echo "setup: could not build the user-mode-linux kernel for this AMX CPU (packaging/uml-kernel.sh);" \
       "the IPsec guest tests will fail" >&2
fi
exit 0
