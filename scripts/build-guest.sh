#!/usr/bin/env bash
# Build kernel + initramfs (each cached by content hash) and point the guest cache at them.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# absolute, so the links below resolve from anywhere (the build scripts print absolute paths)
cache="$(realpath -ms -- "${ISORUN_CACHE:-/var/cache/isorun}")"
export ISORUN_CACHE="$cache"
kernel="$("$here/build-kernel.sh")"
initramfs="$("$here/build-initramfs.sh")"
mkdir -p "$cache/guest"
ln -sfn "$kernel" "$cache/guest/vmlinux"
ln -sfn "$initramfs" "$cache/guest/initramfs.cpio"
"$here/prune-guest-builds.sh" "$cache/kernel" "$kernel"
"$here/prune-guest-builds.sh" "$cache/initramfs" "$initramfs"
echo "guest: kernel $kernel" >&2
echo "guest: initramfs $initramfs" >&2
