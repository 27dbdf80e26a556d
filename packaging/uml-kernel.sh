#!/usr/bin/env bash
# A user-mode-linux kernel for the IPsec guest on hosts whose CPU has AMX, where Debian 12's own
# /usr/bin/linux.uml panics at its first process ("ptrace set fp regs failed, errno = 14": the host wants
# the whole ~11 KiB XSAVE area in PTRACE_SETREGSET, UML 6.1 gives 2,696 bytes).
#
# Built from the very source and config of the installed user-mode-linux package (linux-source-6.1 of the
# version in /usr/lib/uml/modules, fetched with `apt-get download`, not installed) plus one patch,
# packaging/uml-amx-xstate.patch, that moves the registers through a buffer of the host's size. No struct
# changes size, so the package's modules load into it unchanged (same version string, no MODVERSIONS).
#
#   packaging/uml-kernel.sh [DIR]     (default /var/tmp/pyoverlay-uml; prints the kernel's path when ready)
#
# Idempotent: a kernel already built there from the same version and patch is kept.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
patch_file=$here/uml-amx-xstate.patch
base=${1:-/var/tmp/pyoverlay-uml}
config=/usr/share/doc/user-mode-linux/config.gz

version=$(ls /usr/lib/uml/modules 2>/dev/null | sort -V | tail -n 1)
if [ -z "$version" ] || [ ! -r "$config" ]; then
  echo "uml-kernel: user-mode-linux is not installed (apt-get install user-mode-linux)" >&2
  exit 1
fi
stamp=$(sha256sum "$patch_file" | cut -c1-12)
out=$base/linux-$version-$stamp
if [ -x "$out/linux" ]; then
  echo "$out/linux"
  exit 0
fi

# The Debian version of linux-source-6.1 whose kernel is $version (6.1.176 -> 6.1.176-1, say).
deb_version=$(apt-cache madison linux-source-6.1 | awk -v v="$version" '$3 ~ "^"v"-" {print $3; exit}')
if [ -z "$deb_version" ]; then
  echo "uml-kernel: apt knows no linux-source-6.1 for kernel $version (apt-get update?)" >&2
  exit 1
fi

work=$(mktemp -d "$base.build.XXXXXX")
trap 'rm -rf "$work"' EXIT
echo "uml-kernel: building user-mode-linux $version with the AMX patch (linux-source-6.1=$deb_version)" >&2
(cd "$work" && apt-get download -q "linux-source-6.1=$deb_version" >&2)
dpkg-deb --fsys-tarfile "$work"/linux-source-6.1_*.deb | tar -x -C "$work" ./usr/src/linux-source-6.1.tar.xz
tar -x -C "$work" -f "$work/usr/src/linux-source-6.1.tar.xz"
src=$work/linux-source-6.1
patch -d "$src" -p1 --forward < "$patch_file" >&2
zcat "$config" > "$src/.config"
make -C "$src" -s ARCH=um olddefconfig >&2
# The modules must find the version they were built for.
got=$(make -C "$src" -s ARCH=um kernelrelease)
if [ "$got" != "$version" ]; then
  echo "uml-kernel: source says $got, the modules are $version" >&2
  exit 1
fi
make -C "$src" -s ARCH=um -j"$(( $(nproc) + 1 ))" linux >&2
mkdir -p "$out"
install -m 0755 "$src/linux" "$out/linux.new"
mv "$out/linux.new" "$out/linux"
echo "$out/linux"
