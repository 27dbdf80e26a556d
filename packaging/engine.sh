#!/usr/bin/env bash
# The current Docker engine (28.x) for the test suite, without installing it: Debian's sid packages
# (docker.io, docker-cli, containerd, docker-compose) fetched through a private apt configuration (the system's
# apt state is untouched) and unpacked into a directory. They run on Debian 12's libc; runc stays Debian 12's.
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
a=$base/apt
mkdir -p "$a/lists/partial" "$a/cache/archives/partial" "$a/etc" "$base/debs"
# The mirror this machine already uses, another suite.
url=$(grep -rhoE 'https?://[^ ]+/debian/?$' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null | head -1 || true)
url=${url:-http://deb.debian.org/debian}
echo "deb $url $suite main" > "$a/etc/sources.list"
o=(-o APT::Sandbox::User=root -o "Dir::Etc::sourcelist=$a/etc/sources.list" -o Dir::Etc::sourceparts=/nonexistent
   -o "Dir::State::Lists=$a/lists" -o "Dir::Cache=$a/cache")
echo "engine: fetching Docker's current engine (docker.io, docker-cli, containerd, docker-compose from Debian $suite)" >&2
apt-get "${o[@]}" update -qq
rm -f "$base"/debs/*.deb
(cd "$base/debs" && apt-get "${o[@]}" download -qq docker.io docker-cli containerd docker-compose)
rm -rf "$root.new"
for f in "$base"/debs/*.deb; do dpkg-deb -x "$f" "$root.new"; done
# sid's runc needs a newer glibc than Debian 12's: the engine uses the system's runc (from docker.io/runc).
rm -f "$root.new/usr/sbin/runc" "$root.new/usr/bin/runc"
rm -rf "$root" && mv "$root.new" "$root"
"$root/usr/sbin/dockerd" --version >&2
echo "$root"
