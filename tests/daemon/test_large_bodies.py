"""A large exec body (a long `stdin`) is parsed and decoded in slices, other requests running
in between (bench/bench_api.py measures that): the result must be exactly what one call
would give, for good input and bad."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemonhelpers import Daemon, running_daemon
from hypothesis import given, settings
from hypothesis import strategies as st

from isorun.daemon import routes_processes
from isorun.daemon.http import JSON_BODY_LIMIT

B64_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="


def _one_call(text: str) -> bytes | str:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):  # binascii.Error is a ValueError
        return "refused"


def _sliced(text: str, slice_chars: int = routes_processes.B64_SLICE_CHARS) -> bytes | str:
    try:
        return asyncio.run(routes_processes._b64decode(text, slice_chars))
    except (binascii.Error, ValueError):  # binascii.Error is a ValueError
        return "refused"


@settings(max_examples=400, deadline=None)
@given(
    text=st.one_of(
        st.text(alphabet=B64_CHARS, max_size=64),
        st.binary(max_size=48).map(lambda b: base64.b64encode(b).decode()),
        st.tuples(
            st.binary(max_size=24).map(lambda b: base64.b64encode(b).decode()),
            st.binary(max_size=24).map(lambda b: base64.b64encode(b).decode()),
        ).map("".join),  # padding, if any, in the middle
        st.text(max_size=24),  # anything: spaces, newlines, non-ASCII
    )
)
def test_sliced_base64_decodes_as_one_call_does(text: str) -> None:
    assert _sliced(text, 8) == _one_call(text), repr(text)  # many slices of short input


def test_sliced_base64_at_its_real_slice_size() -> None:
    data = bytes(range(256)) * ((3 << 20) // 256 + 7)
    text = base64.b64encode(data).decode()
    assert len(text) > 3 * routes_processes.B64_SLICE_CHARS
    assert _sliced(text) == data
    # a padded piece that ends a slice but not the text
    cut = routes_processes.B64_SLICE_CHARS
    bad = base64.b64encode(b"ab").decode().rjust(cut, "A") + text
    assert _one_call(bad) == _sliced(bad) == "refused"


@pytest.fixture
def daemon(tmp_path: Path, busybox_rootfs: Path) -> Iterator[Daemon]:
    with running_daemon(tmp_path / "d") as d:
        yield d


def test_a_large_body_is_parsed_as_a_small_one_is(daemon: Daemon) -> None:
    stdin = base64.b64encode(bytes(2 * JSON_BODY_LIMIT)).decode()
    with daemon.client() as c:
        # A lone surrogate's escape (a file name's byte that is not UTF-8) is taken: the
        # request gets as far as the sandbox, which does not exist.
        body = '{"cmd": "cat", "cwd": "/tmp/caf\\udce9", "stdin": "' + stdin + '"}'
        assert len(body) > JSON_BODY_LIMIT
        r = c.post("/v1/sandboxes/sb-x/exec", content=body.encode())
        assert r.status_code == 404, r.text
        # Not JSON: the same words as for a small body.
        for broken, says in (
            (body[:-1], "Expecting ',' delimiter"),
            (body + " x", "Extra data"),
        ):
            r = c.post("/v1/sandboxes/sb-x/exec", content=broken.encode())
            assert r.status_code == 400, r.text
            assert r.json()["error"]["code"] == "malformed_json"
            assert says in r.json()["error"]["message"]
        r = c.post("/v1/sandboxes/sb-x/exec", content=json.dumps([stdin]).encode())
        assert r.status_code == 400, r.text
        assert "must be a JSON object" in r.json()["error"]["message"]
        assert c.get("/v1/health").status_code == 200
