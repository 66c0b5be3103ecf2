#!/usr/bin/env bash
# Build the isorun guest kernel (uncompressed vmlinux, PVH-bootable) from Debian's
# linux-source-6.1 plus the patches in guest/kernel/patches, cached outside the repo by hash
# of (config fragment, patches, source version).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
fragment="$here/guest/kernel/isorun.config"
patches=("$here"/guest/kernel/patches/*.patch)
cache="${ISORUN_CACHE:-/var/cache/isorun}/kernel"
src_tar=/usr/src/linux-source-6.1.tar.xz
[ -f "$src_tar" ] || { echo "build-kernel: $src_tar missing: apt-get install linux-source-6.1" >&2; exit 1; }
src_version="$(dpkg-query -W -f='${Version}' linux-source-6.1)"
key="$( (cat "$fragment" "${patches[@]}"; echo "$src_version") | sha256sum | cut -c1-16)"
out="$cache/$key"
if [ -f "$out/vmlinux" ]; then echo "$out/vmlinux"; exit 0; fi
work="$(mktemp -d "${TMPDIR:-/tmp}/isorun-kernel.XXXXXX")"
trap 'rm -rf "$work"' EXIT
echo "build-kernel: building $key in $work (several minutes)" >&2
tar -C "$work" -xf "$src_tar"
cd "$work"/linux-source-6.1
for p in "${patches[@]}"; do patch -s -p1 < "$p" >&2; done
make -s tinyconfig >&2
./scripts/kconfig/merge_config.sh -m .config "$fragment" >&2
make -s olddefconfig >&2
# fail loudly if a requested option did not stick (a dependency was missing)
missing=0
while IFS= read -r line; do
  opt="${line%%=*}"
  case "$line" in
    CONFIG_*=y) grep -qx "$opt=y" .config || { echo "build-kernel: $opt=y did not stick" >&2; missing=1; } ;;
    CONFIG_*=n) if grep -q "^$opt=" .config; then echo "build-kernel: $opt=n did not stick (selected by another option)" >&2; missing=1; fi ;;
  esac
done < "$fragment"
make -s -j"$(nproc)" vmlinux >&2
mkdir -p "$out.tmp"
cp vmlinux .config "$out.tmp/"
rm -rf "$out"; mv "$out.tmp" "$out"
echo "$out/vmlinux"
[ "$missing" = 0 ] || echo "build-kernel: warning: some options did not stick (see above)" >&2
