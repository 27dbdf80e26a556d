#!/bin/sh
# Build a local Debian bookworm base image for the plugin (python3.11 + the OS packages the plugin uses) and
# load it into the Docker daemon the CLI targets (DOCKER_HOST), for machines that cannot pull from a registry.
#   packaging/local-base.sh IMAGE_TAG WORKDIR
set -eu
tag=$1
work=$2
rootfs=$work/base-rootfs
if ! docker image inspect "$tag" >/dev/null 2>&1; then
  if [ ! -f "$work/base.tar" ]; then
    command -v debootstrap >/dev/null || { echo "local-base: debootstrap is missing (apt-get install debootstrap)" >&2; exit 1; }
    rm -rf "$rootfs"
    mkdir -p "$rootfs"
    debootstrap --variant=minbase \
      --include=python3,python3-venv,iproute2,iptables,nftables,etcd-server,kmod,ca-certificates \
      bookworm "$rootfs" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
    rm -rf "$rootfs/var/cache/apt/archives/"*.deb "$rootfs/var/lib/apt/lists/"*
    tar -C "$rootfs" -cf "$work/base.tar.tmp" . && mv "$work/base.tar.tmp" "$work/base.tar"
    rm -rf "$rootfs"
  fi
  docker import -c 'CMD ["/bin/sh"]' "$work/base.tar" "$tag"
fi
