"""Image pipeline benchmark: pull+convert vs the registry copy alone, cache hits, sharing.

    python bench/bench_images.py [--mib 100] [--sandboxes 10] [--runs 3]

Starts Debian's docker-registry on loopback, pushes a generated ~100 MB image (3 layers,
half incompressible), then in the same run measures:
  floor:      `skopeo copy docker://… oci:dir` alone (the registry copy we cannot beat)
  ensure:     ImageStore.ensure on an empty store (pull + unpack + mkfs.ext4)
  hit:        a second ensure of the same tag (cache hit, no network)
  hit_always: ensure with pull="always" (re-resolves the tag, no conversion)
  disk:       N sandboxes = the shared read-only rootfs + N sparse scratch disks, vs N copies
Prints one JSON object per line. Needs root (like isorund) and scripts/install-deps-images.sh.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "images"))

import ocibuild as ob

from isorun.images import ImageStore, StoreConfig

MiB = 1 << 20


def emit(**kw: object) -> None:
    print(json.dumps(kw), flush=True)


def start_registry(tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = {
        "version": 0.1,
        "log": {"level": "error", "accesslog": {"disabled": True}},
        "storage": {"filesystem": {"rootdirectory": str(tmp / "storage")}},
        "http": {"addr": f"127.0.0.1:{port}"},
    }
    (tmp / "config.yml").write_text(json.dumps(cfg))
    proc = subprocess.Popen(
        ["docker-registry", "serve", str(tmp / "config.yml")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(300):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=1)
            break
        except urllib.error.HTTPError:
            break
        except OSError:
            time.sleep(0.05)
    return proc, f"127.0.0.1:{port}"


def make_image(tmp: Path, mib: int) -> Path:
    rng = random.Random(42)
    words = [bytes(rng.choice(b"abcdefghijklmnop ") for _ in range(8)) for _ in range(500)]
    layers: list[list[ob.Entry]] = [ob.busybox_tree()]
    per_layer = mib * MiB // 2
    for n in range(2):
        entries: list[ob.Entry] = [ob.dir_(f"data{n}")]
        size, i = 0, 0
        while size < per_layer:
            flen = rng.choice([4096, 16384, 65536, 262144])
            if i % 2:
                data = rng.randbytes(flen)  # incompressible (binaries, media)
            else:
                data = b" ".join(rng.choice(words) for _ in range(flen // 9))[:flen]
            entries.append(ob.file(f"data{n}/f{i:05d}", data))
            size += flen
            i += 1
        layers.append(entries)
    lay = ob.Layout(tmp / "layout")
    lay.tag(lay.manifest(layers), "bench")
    return lay.path


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=100)
    ap.add_argument("--sandboxes", type=int, default=10)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-images-"))
    reg, host = start_registry(tmp)
    try:
        layout = make_image(tmp, args.mib)
        ref = f"{host}/bench/img:1"
        subprocess.run(
            [
                "skopeo",
                "copy",
                "--quiet",
                "--dest-tls-verify=false",
                f"oci:{layout}:bench",
                f"docker://{ref}",
            ],
            check=True,
        )
        blobs = sum(p.stat().st_size for p in (layout / "blobs/sha256").iterdir())
        emit(bench="image", compressed_bytes=blobs)

        floors, ensures, hits, always = [], [], [], []
        img = None
        for run in range(args.runs):
            dest = tmp / f"floor{run}"
            t0 = time.perf_counter()
            subprocess.run(
                [
                    "skopeo",
                    "copy",
                    "--quiet",
                    "--src-tls-verify=false",
                    f"docker://{ref}",
                    f"oci:{dest}:img",
                ],
                check=True,
            )
            floors.append(time.perf_counter() - t0)
            shutil.rmtree(dest)
            store = ImageStore(tmp / f"store{run}", StoreConfig(auth_file=None))
            t0 = time.perf_counter()
            img = await store.ensure(ref)
            ensures.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            await store.ensure(ref)
            hits.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            await store.ensure(ref, pull="always")
            always.append(time.perf_counter() - t0)
            if run < args.runs - 1:
                shutil.rmtree(store.root)
        f, e = statistics.median(floors), statistics.median(ensures)
        emit(
            bench="pull_convert",
            skopeo_copy_s=round(f, 3),
            ensure_s=round(e, 3),
            ratio=round(e / f, 2),
            runs=args.runs,
        )
        emit(
            bench="cache_hit",
            ensure_hit_s=round(statistics.median(hits), 5),
            ensure_pull_always_s=round(statistics.median(always), 3),
        )
        assert img is not None
        # Disk: each sandbox = shared read-only rootfs + its own sparse scratch disk (the
        # writable CoW layer the VMM formats), vs giving each sandbox a private copy.
        scratch_dir = tmp / "scratch"
        scratch_dir.mkdir()
        scratch_total = 0
        for i in range(args.sandboxes):
            s = scratch_dir / f"sb{i}.ext4"
            subprocess.run(
                ["mkfs.ext4", "-q", "-F", "-O", "^has_journal", str(s), "2G"],
                check=True,
                capture_output=True,
            )
            scratch_total += allocated(s)
        one = allocated(img.rootfs)
        shared = one + scratch_total
        emit(
            bench="disk",
            sandboxes=args.sandboxes,
            rootfs_bytes=one,
            scratch_bytes_each=scratch_total // args.sandboxes,
            shared_total_bytes=shared,
            private_copies_bytes=args.sandboxes * one + scratch_total,
            shared_vs_one=round(shared / one, 2),
        )
    finally:
        reg.terminate()
        reg.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
