"""A file name from the guest is text in which each byte that is not UTF-8 is a lone
surrogate U+DC80..U+DCFF (the agent's "\\udcXX"; Python's surrogateescape). Any other lone
surrogate, or bytes escaped that are UTF-8, is no name a guest can have: a violation."""

from __future__ import annotations

import asyncio
import json
import os

import pytest
from fakeguest import connect, read_frame

from isorun.agent import frames
from isorun.agent.frames import Kind
from isorun.agent.validate import parse_entry
from isorun.errors import GuestError, ProtocolError


def _entry(name_json: str) -> object:
    text = (
        f'{{"name":{name_json},"path":"/d/x","type":"symlink","size":1,"mode":420,'
        f'"link":{name_json}}}'
    )
    return json.loads(text)


def test_bytes_that_are_not_utf8_come_as_os_fsdecode_has_them() -> None:
    e = parse_entry(_entry('"caf\\udce9 \\u00e9"'))
    assert e.name == e.link == os.fsdecode(b"caf\xe9 \xc3\xa9")
    assert os.fsencode(e.name) == b"caf\xe9 \xc3\xa9"


@pytest.mark.parametrize(
    "name_json",
    ['"\\ud800"', '"\\udc00"', '"\\udfff x"', '"\\udcc3\\udca9"'],
    ids=["high", "low-not-a-byte", "last", "escaped-utf8"],
)
def test_other_surrogates_are_a_violation(name_json: str) -> None:
    with pytest.raises(ProtocolError, match="field 'name'"):
        parse_entry(_entry(name_json))


async def test_an_agent_from_before_such_names_is_sent_none() -> None:
    """An older agent would decode "\\udce9" as U+FFFD and act on another file: a request
    naming one is refused before it is sent, one in UTF-8 goes as before."""
    got: list[dict[str, object]] = []

    async def old_agent(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            req = await read_frame(r)
            got.append(req.json())
            entry = {"name": "é", "path": "/é", "type": "file", "size": 0, "mode": 420}
            w.write(frames.encode_json(req.chan, Kind.RESP, {"ok": True, "entry": entry}))
            await w.drain()

    client, task = await connect(old_agent, features=["watch_ready"])
    try:
        for call in (
            client.stat(os.fsdecode(b"/caf\xe9")),
            client.rename("/a", os.fsdecode(b"/\xff")),
            client.exec("true", cwd=os.fsdecode(b"/d\xe9")),
        ):
            with pytest.raises(GuestError, match="predates such names") as err:
                await asyncio.wait_for(call, 5)
            assert err.value.code == "unsupported"
        assert (await asyncio.wait_for(client.stat("/é"), 5)).path == "/é"
        assert [req["op"] for req in got] == ["stat"]
    finally:
        task.cancel()
        await client.conn.close()
