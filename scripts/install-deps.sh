#!/usr/bin/env bash
# System packages isorun needs on Debian 12 (bookworm), from Debian's registries only.
# Idempotent; safe to run on a fresh machine or again.
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "install-deps: run as root" >&2; exit 1; }
export DEBIAN_FRONTEND=noninteractive
here="$(cd "$(dirname "$0")" && pwd)"
# Ask apt, not the files: a commented-out line or a file apt ignores (*.disabled) may
# mention bookworm-backports. n= is the codename (a= is oldstable-backports since trixie).
backports_enabled() { apt-cache policy 2>/dev/null | grep -Eq '[ ,][an]=bookworm-backports(,|$)'; }
apt-get update -q
if ! backports_enabled; then
  # where this apt reads sources from (/etc/apt/sources.list.d unless APT_CONFIG says else)
  eval "$(apt-config shell parts Dir::Etc::sourceparts/d)"
  cat > "${parts:?apt-config names no sources.list.d}isorun-backports.sources" <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  apt-get update -q
  backports_enabled || { echo "install-deps: bookworm-backports still not available to apt" >&2; exit 1; }
fi
# QEMU 10 (bookworm's own is 7.2; DESIGN.md §4 measures 10).
apt-get install -y -q -t bookworm-backports qemu-system-x86 qemu-utils
apt-get install -y -q \
  linux-source-6.1 build-essential patch flex bison bc libelf-dev libssl-dev \
  cpio busybox-static e2fsprogs util-linux passwd python3-venv
# guest/agent/go.mod names a newer Go than any Debian 12 package. Go >= 1.21 fetches the
# one it names (GOTOOLCHAIN=auto); bookworm's own golang-go (1.19) cannot even parse it, so
# an existing old go (bookworm's, or an old /usr/local/go) is no reason to skip this.
# scripts/find-go.sh picks the new one for the build even when the old one is first on PATH.
if ! "$here/find-go.sh" >/dev/null 2>&1; then
  apt-get install -y -q -t bookworm-backports golang-go
  "$here/find-go.sh" >/dev/null
fi
# Not optional: without these tools the image, daemon-pull and SDK-pull tests cannot run.
bash "$here/install-deps-images.sh"
