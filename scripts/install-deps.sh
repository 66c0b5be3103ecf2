#!/usr/bin/env bash
# System packages isorun needs on Debian 12 (bookworm), from Debian's registries only.
# Idempotent; safe to run on a fresh machine or again.
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "install-deps: run as root" >&2; exit 1; }
export DEBIAN_FRONTEND=noninteractive
src=/etc/apt/sources.list.d/isorun-backports.sources
if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
  cat > "$src" <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi
apt-get update -q
# QEMU 10 (bookworm's own is 7.2; DESIGN.md §4 measures 10).
apt-get install -y -q -t bookworm-backports qemu-system-x86 qemu-utils
apt-get install -y -q \
  linux-source-6.1 build-essential patch flex bison bc libelf-dev libssl-dev \
  cpio busybox-static e2fsprogs util-linux passwd python3-venv
# bookworm's golang-go is Go 1.19, which cannot even parse guest/agent/go.mod (go 1.26);
# bookworm-backports' (1.23) can, and fetches the one go.mod names (GOTOOLCHAIN=auto).
command -v go >/dev/null || apt-get install -y -q -t bookworm-backports golang-go
# Not optional: without these tools the image, daemon-pull and SDK-pull tests cannot run.
bash "$(dirname "$0")/install-deps-images.sh"
