#!/usr/bin/env bash
# Build the guest initramfs: the static Go agent as /init plus the empty
# mount points it needs, packed as an uncompressed newc cpio (the kernel has
# no decompressors configured: unpacking is fastest under emulation).
# Cached under ${ISORUN_CACHE:-/var/cache/isorun}/initramfs/<hash>/ keyed on
# the agent sources and go.sum. Prints the cpio path on stdout, logs on stderr.
set -euo pipefail

log() { echo "build-initramfs: $*" >&2; }
die() { log "error: $*"; exit 1; }

self="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
repo="$(dirname "$(dirname "$self")")"
src="$repo/guest/agent"
# absolute: go build runs in $src, where a relative output path would land
cache="$(realpath -ms -- "${ISORUN_CACHE:-/var/cache/isorun}")/initramfs"

# the first go >= 1.21 (it fetches the toolchain go.mod names), even behind an older one
go_bin="$("$(dirname "$self")/find-go.sh")" ||
	die "no Go >= 1.21 found: run scripts/install-deps.sh (bookworm-backports' golang-go) or install one from https://go.dev/dl/"
export PATH="$(dirname "$go_bin"):$PATH"
command -v cpio >/dev/null 2>&1 || die "'cpio' not found in PATH: install GNU cpio (apt-get install cpio)"
[ -f "$src/go.mod" ] || die "agent sources not found at $src"

# what the agent is built for: amd64 unless GOARCH says otherwise
build_env=(CGO_ENABLED=0 GOOS=linux GOARCH="${GOARCH:-amd64}")

# hash of every source file (name + content), go.mod, go.sum, this script and the go env
# settings that change the binary (an arm64 or GOAMD64=v3 build is another initramfs)
hash="$(
	cd "$src"
	{
		find . -type f \( -name '*.go' -o -name 'go.mod' -o -name 'go.sum' \) ! -name '*_test.go' -print0 |
			LC_ALL=C sort -z | xargs -0 sha256sum
		sha256sum < "$self"
		env "${build_env[@]}" go env GOVERSION GOOS GOARCH GOAMD64 GOARM64 GOFLAGS GOEXPERIMENT
	} | sha256sum | cut -c1-16
)"
out="$cache/$hash/initramfs.cpio"
if [ -s "$out" ]; then
	log "cached: $out"
	echo "$out"
	exit 0
fi

mkdir -p "$cache"
work="$(mktemp -d "$cache/.build.XXXXXX")"
trap 'rm -rf "$work"' EXIT
stage="$work/root"
mkdir -p "$stage"/{dev,proc,sys,run,tmp,mnt}
chmod 1777 "$stage/tmp"
# /dev/console lets the kernel open fds 0-2 for init (needs root to mknod;
# without it the agent opens the console itself after mounting devtmpfs)
if [ "$(id -u)" = 0 ]; then
	mknod -m 600 "$stage/dev/console" c 5 1 || true
fi

log "building agent (go $(go env GOVERSION))"
(
	cd "$src"
	env "${build_env[@]}" go build -trimpath -ldflags='-s -w' -o "$stage/init" .
) >&2 || die "go build failed"
# a cached initramfs is trusted for good: never pack one without its init
[ -x "$stage/init" ] || die "go build wrote no $stage/init"

(cd "$stage" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) > "$work/initramfs.cpio" ||
	die "cpio failed"
mkdir -p "$cache/$hash"
# one rename from this build's own work dir (same file system): a concurrent build of the
# same hash replaces it with an identical file, and a reader never sees a partial one
mv -T "$work/initramfs.cpio" "$out"
log "built: $out ($(stat -c %s "$out") bytes)"
echo "$out"
