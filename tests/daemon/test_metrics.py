"""GET .../metrics: the host's figures (CPU, memory peak, uptime) and the guest's own. The
host's never depend on the guest: guest root can break what the agent reads its figures
from (/proc), and the route then still answers, saying why the guest's are missing."""

from __future__ import annotations

from daemonhelpers import Daemon


def test_metrics_has_the_hosts_figures_even_when_the_guests_fail(
    daemon: Daemon, image: str
) -> None:
    with daemon.client() as c:
        r = c.post("/v1/sandboxes", json={"image": image})
        assert r.status_code == 201, r.text
        sid = r.json()["id"]
        try:
            m = c.get(f"/v1/sandboxes/{sid}/metrics").json()
            assert m["cpu_ms"] > 0 and m["mem_peak_bytes"] > 0 and m["uptime_ms"] > 0, m
            assert m["guest"]["mem_total_bytes"] > 0 and m["guest"]["uptime_s"] > 0, m
            # the agent shares the guest's mount namespace with what it starts
            r = c.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": "umount -l /proc"})
            assert r.status_code == 200 and '"exit_code":0' in r.text, r.text
            r = c.get(f"/v1/sandboxes/{sid}/metrics")
            assert r.status_code == 200, r.text
            m = r.json()
            assert m["cpu_ms"] > 0 and m["mem_peak_bytes"] > 0 and m["uptime_ms"] > 0, m
            assert m["guest"] is None and "/proc/meminfo" in m["guest_error"], m
        finally:
            c.delete(f"/v1/sandboxes/{sid}")
