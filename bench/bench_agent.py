"""Agent protocol costs in one real guest (TCG here), each against its in-guest floor:
- exec round trip of `true` vs the agent's own fork/exec/wait time for it (run_us);
- stdout throughput through the channel vs the same producer (dd, 64 KiB writes)
  writing to /dev/null in the guest;
- file upload and download MB/s (download also with the 256 KiB window other requests have).
Prints JSON lines; ratios compare numbers taken in this same run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from vmhelpers import build_busybox_rootfs

from isorun.agent import client as client_mod
from isorun.agent import mux
from isorun.vmm import MicroVM, VMSpec

ROUND_TRIPS = int(os.environ.get("BENCH_RUNS", "50"))
STREAM_MB = int(os.environ.get("BENCH_STREAM_MB", "64"))
FILE_MB = int(os.environ.get("BENCH_FILE_MB", "32"))


@contextlib.contextmanager
def _read_window(window: int) -> Iterator[None]:
    saved, client_mod.READ_WINDOW = client_mod.READ_WINDOW, window
    try:
        yield
    finally:
        client_mod.READ_WINDOW = saved


def emit(**kw: object) -> None:
    print(json.dumps(kw), flush=True)


async def main() -> None:
    vm = await MicroVM.boot(VMSpec(rootfs=build_busybox_rootfs(), memory_mib=512, scratch_mib=1024))
    try:
        rtt, run = [], []
        for _ in range(ROUND_TRIPS):
            t0 = time.perf_counter()
            r = await vm.agent.exec(argv=["true"])
            rtt.append((time.perf_counter() - t0) * 1e6)
            run.append(r.run_us)
        emit(
            name="exec_true_round_trip",
            accel=vm.accel.name,
            runs=ROUND_TRIPS,
            p50_us=round(statistics.median(rtt)),
            guest_run_p50_us=round(statistics.median(run)),
            overhead_p50_us=round(statistics.median(a - b for a, b in zip(rtt, run, strict=True))),
            ratio=round(statistics.median(rtt) / max(1, statistics.median(run)), 2),
        )

        nbytes = STREAM_MB * 2**20
        # dd with 64 KiB writes: busybox `head` writes 4 KiB at a time and is itself the
        # bottleneck under TCG (~18 MiB/s even into /dev/null).
        producer = f"dd if=/dev/zero bs=65536 count={nbytes // 65536} 2>/dev/null"
        # The floor's best of three: its first run is cold (dd read in, code translated by
        # TCG), which would make the channel look closer to it than it is.
        floors = [await vm.agent.exec(f"{producer} > /dev/null") for _ in range(3)]
        floor = min(floors, key=lambda f: f.run_us)
        got = 0

        def count(b: bytes) -> None:
            nonlocal got
            got += len(b)

        t0 = time.perf_counter()
        r = await vm.agent.exec(producer, on_stdout=count, capture=False)
        stream_s = time.perf_counter() - t0
        assert got == nbytes and r.exit_code == 0
        floor_s = max(floor.run_us / 1e6, 1e-6)
        emit(
            name="stdout_throughput",
            accel=vm.accel.name,
            mb=STREAM_MB,
            channel_mib_s=round(STREAM_MB / stream_s, 1),
            in_guest_dev_null_mib_s=round(STREAM_MB / floor_s, 1),
            ratio_channel_vs_dev_null=round(stream_s / floor_s, 2),
        )

        blob = os.urandom(FILE_MB * 2**20)
        t0 = time.perf_counter()
        await vm.agent.write_file("/tmp/blob", blob)
        up = time.perf_counter() - t0
        # Downloads with the wider READ_WINDOW, against the same with the window every other
        # request has (the best of 3 each, alternating).
        down, narrow = math.inf, math.inf
        for _ in range(3):
            for window in (client_mod.READ_WINDOW, mux.WINDOW):
                with _read_window(window):
                    t0 = time.perf_counter()
                    back = await vm.agent.read_bytes("/tmp/blob")
                    took = time.perf_counter() - t0
                assert back == blob
                if window == mux.WINDOW:
                    narrow = min(narrow, took)
                else:
                    down = min(down, took)
        emit(
            name="file_transfer",
            accel=vm.accel.name,
            mb=FILE_MB,
            upload_mib_s=round(FILE_MB / up, 1),
            download_mib_s=round(FILE_MB / down, 1),
            download_window_kib=client_mod.READ_WINDOW >> 10,
            download_with_256k_window_mib_s=round(FILE_MB / narrow, 1),
            ratio_download_vs_256k_window=round(narrow / down, 2),
            ratio_download_vs_stdout=round((FILE_MB / down) / (STREAM_MB / stream_s), 2),
        )
    finally:
        await vm.kill()


if __name__ == "__main__":
    asyncio.run(main())
