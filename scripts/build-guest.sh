#!/usr/bin/env bash
# Build kernel + initramfs (each cached by content hash) and point the guest cache at them.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cache="${ISORUN_CACHE:-/var/cache/isorun}"
kernel="$("$here/build-kernel.sh")"
initramfs="$("$here/build-initramfs.sh")"
mkdir -p "$cache/guest"
ln -sfn "$kernel" "$cache/guest/vmlinux"
ln -sfn "$initramfs" "$cache/guest/initramfs.cpio"
"$here/prune-guest-builds.sh" "$cache/kernel" "$kernel"
"$here/prune-guest-builds.sh" "$cache/initramfs" "$initramfs"
echo "guest: kernel $kernel" >&2
echo "guest: initramfs $initramfs" >&2
