#!/usr/bin/env bash
# Remove old guest builds from the cache: every source change builds a new kernel (~10 MB)
# or initramfs (~3 MB) under a new hash, and nothing else ever deletes one.
# Usage: prune-guest-builds.sh <cache dir of one kind> <the build in use> [keep=3]
# Keeps the build in use, the builds other checkouts on this machine boot (the links
# build-guest.sh keeps in <cache>/guest/checkouts/, while that checkout exists), and the
# `keep` newest others (switching back to a recent branch should not rebuild a kernel). A
# running VM is unaffected: QEMU reads both at start.
set -euo pipefail
dir="$1"
in_use="$(realpath -m "$2")"
keep="${3:-3}"
[ -d "$dir" ] || exit 0
kept=0
pinned=("$in_use")
for own in "$(dirname "$dir")"/guest/checkouts/*/; do
	[ -f "$own/checkout" ] || continue
	if [ ! -d "$(head -n 1 "$own/checkout")" ]; then
		rm -rf -- "$own"  # that checkout is gone: its builds may go too
		continue
	fi
	for link in "$own"vmlinux "$own"initramfs.cpio; do
		[ -L "$link" ] && pinned+=("$(realpath -m "$link")")
	done
done
# newest first; build dirs are named by hash (no spaces or newlines)
for build in $(ls -1t "$dir"); do
	path="$(realpath -m "$dir/$build")"
	[ -d "$path" ] || continue
	for pin in "${pinned[@]}"; do
		case "$pin/" in "$path"/*) continue 2 ;; esac # a build in use is inside it
	done
	if [ "$kept" -lt "$keep" ]; then
		kept=$((kept + 1))
		continue
	fi
	rm -rf -- "$path"
	echo "prune-guest-builds: removed $path" >&2
done
