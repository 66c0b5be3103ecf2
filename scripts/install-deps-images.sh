#!/usr/bin/env bash
# System packages isorun.images and its tests need. Idempotent; run as root.
#   skopeo        registry pulls/pushes, blob digest verification (containers/image)
#   umoci         applies OCI layers (whiteouts, hard links, xattrs, devices) safely
#   e2fsprogs     mkfs.ext4 -d (rootfs images), debugfs (tests inspect images with it)
#   mmdebstrap    builds the base/python/node templates from Debian packages
#   docker-registry  loopback registry the tests push to and pull from
#   apache2-utils htpasswd -B for the registry-with-auth test fixture
#   zstd          tests craft zstd-compressed layers with it
#   busybox-static  the musl/alpine-like test image is built from /bin/busybox
#   qemu-utils    qemu-img, used by bench/bench_images.py for per-sandbox overlays
#   iproute2      `ip netns`: the tests' registries on a public address live in a netns
set -euo pipefail
PKGS=(skopeo umoci e2fsprogs mmdebstrap docker-registry apache2-utils zstd busybox-static
      qemu-utils ca-certificates iproute2)
missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
# docker-registry's Debian package starts a system service on :5000; tests run their own.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet docker-registry 2>/dev/null; then
    systemctl stop docker-registry || true
fi
echo "images deps ok: ${PKGS[*]}"
