#!/usr/bin/env bash
# Fetch Debian sid packages and unpack them into a directory, without installing them: a private apt
# configuration (own sources list naming sid on the mirror this machine already uses, own lists and cache),
# so the system's apt state is untouched. Used by packaging/engine.sh and packaging/uml.sh.
#
#   packaging/sid.sh BASE ROOT PACKAGE...     (apt state under BASE/apt, .debs under BASE/debs, unpacked to ROOT)
set -euo pipefail

base=$1 root=$2
shift 2
a=$base/apt
mkdir -p "$a/lists/partial" "$a/cache/archives/partial" "$a/etc" "$base/debs"
url=$(grep -rhoE 'https?://[^ ]+/debian/?$' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null | head -1 || true)
url=${url:-http://deb.debian.org/debian}
echo "deb $url sid main" > "$a/etc/sources.list"
o=(-o APT::Sandbox::User=root -o "Dir::Etc::sourcelist=$a/etc/sources.list" -o Dir::Etc::sourceparts=/nonexistent
   -o "Dir::State::Lists=$a/lists" -o "Dir::Cache=$a/cache")
apt-get "${o[@]}" update -qq
rm -f "$base"/debs/*.deb
(cd "$base/debs" && apt-get "${o[@]}" download -qq "$@")
rm -rf "$root"
for f in "$base"/debs/*.deb; do dpkg-deb -x "$f" "$root"; done
