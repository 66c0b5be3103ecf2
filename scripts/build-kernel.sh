#!/usr/bin/env bash
# Build the isorun guest kernel (uncompressed vmlinux, PVH-bootable) from Debian's
# linux-source-6.1 plus the patches in guest/kernel/patches, cached outside the repo by hash
# of (config fragment, patches, source version, this script, compiler version).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
self="$here/scripts/build-kernel.sh"
fragment="$here/guest/kernel/isorun.config"
shopt -s nullglob
patches=("$here"/guest/kernel/patches/*.patch)
shopt -u nullglob
# absolute: the build below runs in its own work tree (a relative one would land there)
cache="$(realpath -ms -- "${ISORUN_CACHE:-/var/cache/isorun}")/kernel"
src_tar=/usr/src/linux-source-6.1.tar.xz
[ -f "$src_tar" ] || { echo "build-kernel: $src_tar missing: apt-get install linux-source-6.1" >&2; exit 1; }
src_version="$(dpkg-query -W -f='${Version}' linux-source-6.1)"
cc_version="$(gcc --version 2>/dev/null | head -1 || true)"
# Every input of the build: a change to the build steps below must not reuse an old kernel.
key="$( (cat "$fragment" "${patches[@]}" "$self"; echo "$src_version"; echo "$cc_version") |
  sha256sum | cut -c1-16)"
out="$cache/$key"
# --key: the cache key alone (tests seed a cache with it instead of building for minutes)
if [ "${1:-}" = --key ]; then echo "$key"; exit 0; fi
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
# ... before the (long) build, and never into the cache: a cached kernel is reused for good.
[ "$missing" = 0 ] || { echo "build-kernel: options above did not stick; fix $fragment" >&2; exit 1; }
make -s -j"$(nproc)" vmlinux >&2
# A temp dir of this build's own, renamed into place: another build of the same key may be
# finishing now, and a VM may be booting from the $out it renamed.
mkdir -p "$cache"
staged="$(mktemp -d "$cache/.$key.XXXXXX")"
cp vmlinux .config "$staged/"
chmod 755 "$staged"
if ! mv -T "$staged" "$out" 2>/dev/null; then
  rm -rf "$staged"
  [ -f "$out/vmlinux" ] || { echo "build-kernel: cannot move the build into $out" >&2; exit 1; }
fi
echo "$out/vmlinux"
