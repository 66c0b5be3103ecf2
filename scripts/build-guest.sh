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
# The links above are whatever any checkout on this machine built last. This checkout's
# own, by a hash of its path: its tests (tests/conftest.py) boot the agent built from its
# sources even while another checkout (another CI job) builds a different one.
repo="$(cd "$here/.." && pwd -P)"
own="$cache/guest/checkouts/$(printf '%s' "$repo" | sha256sum | cut -c1-16)"
mkdir -p "$own"
ln -sfn "$kernel" "$own/vmlinux"
ln -sfn "$initramfs" "$own/initramfs.cpio"
printf '%s\n' "$repo" > "$own/checkout"
"$here/prune-guest-builds.sh" "$cache/kernel" "$kernel"
"$here/prune-guest-builds.sh" "$cache/initramfs" "$initramfs"
echo "guest: kernel $kernel" >&2
echo "guest: initramfs $initramfs" >&2
