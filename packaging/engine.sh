#!/usr/bin/env bash
# The current Docker engine (28.x) for the test suite, without installing it: Debian's sid packages
# (docker.io, docker-cli, containerd, docker-compose) fetched and unpacked by packaging/sid.sh (the system's
# apt state is untouched). They run on Debian 12's libc; runc stays Debian 12's.
#
#   packaging/engine.sh [DIR]      (default /var/tmp/pyoverlay-engine/sid; prints DIR/root when ready)
#
# Idempotent: an engine already unpacked there is kept.
set -euo pipefail

suite=sid
base=${1:-/var/tmp/pyoverlay-engine/$suite}
root=$base/root
if [ -x "$root/usr/sbin/dockerd" ] && [ -x "$root/usr/bin/docker" ]; then
  echo "$root"
  exit 0
fi
echo "engine: fetching Docker's current engine (docker.io, docker-cli, containerd, docker-compose from Debian $suite)" >&2
"$(dirname "$0")/sid.sh" "$base" "$root.new" docker.io docker-cli containerd docker-compose
# sid's runc needs a newer glibc than Debian 12's: the engine uses the system's runc (from docker.io/runc).
rm -f "$root.new/usr/sbin/runc" "$root.new/usr/bin/runc"
rm -rf "$root" && mv "$root.new" "$root"
"$root/usr/sbin/dockerd" --version >&2
echo "$root"
