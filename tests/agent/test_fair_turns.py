"""A guest sending costly frames as fast as it can holds the daemon's event loop (every
other sandbox's) a bounded turn at a time: what the host handles per turn, JSON decoding
included, is counted here, not timed."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from fakeguest import connect, read_frame

from isorun.agent import frames, mux
from isorun.agent.frames import Kind

# 300 empty objects: a few hundred bytes, ~600 values to decode (strictly, in Python)
COSTLY = b',"x":[' + b",".join([b"{}"] * 300) + b"]}"


@pytest.fixture
def decoded(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Counts the host's JSON decodes of guest payloads (the real decoder still runs)."""
    count = [0]
    real = frames.decode_json

    def counting(payload: bytes) -> dict[str, object]:
        count[0] += 1
        return real(payload)

    monkeypatch.setattr(frames, "decode_json", counting)
    yield count


def _most_per_turn(payload: bytes) -> int:
    """The most events of `payload` one turn of the reader or a consumer may decode: each
    charged its values' decoding, the turn ends once a budget is spent."""
    charge = frames.json_cost(payload) * mux.JSON_VALUE_COST + len(payload)
    return -(-mux.DISPATCH_BUDGET // charge)


async def _per_turn(decoded: list[int], work: asyncio.Task[object]) -> list[int]:
    """How many decodes each turn of the event loop saw while `work` ran."""
    seen: list[int] = []
    last = decoded[0]
    while not work.done():
        await asyncio.sleep(0)
        seen.append(decoded[0] - last)
        last = decoded[0]
    await work
    return seen


async def test_a_listings_costly_events_are_decoded_a_budget_per_turn(decoded: list[int]) -> None:
    # A listing's events are decoded in the reader as they come: counted by bytes only, the
    # reader decoded ~200 of these a turn (or as many as 5 ms took).
    event = b'{"event":"entries","entries":[]' + COSTLY
    events = 400

    async def guest(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        req = await read_frame(r)
        w.write(frames.encode(req.chan, Kind.EVENT, event) * events)
        w.write(frames.encode_json(req.chan, Kind.RESP, {"ok": True}))
        await w.drain()
        await asyncio.sleep(3600)

    client, task = await connect(guest)
    per_turn = await _per_turn(decoded, asyncio.create_task(client.list("/")))
    assert max(per_turn) <= _most_per_turn(event) + 1, per_turn  # + the answer
    assert sum(per_turn) == events + 1  # each once, and the answer
    task.cancel()
    await client.conn.close()


async def test_an_event_is_decoded_once_and_a_backlog_a_budget_per_turn(
    decoded: list[int],
) -> None:
    # Each event was decoded twice (checked by the reader, then again by its consumer), and
    # a consumer emptying a backlog decoded as many as 5 ms let it per turn.
    event = b'{"event":"x"' + COSTLY
    events = 200

    async def guest(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        req = await read_frame(r)
        w.write(frames.encode(req.chan, Kind.EVENT, event) * events)
        w.write(frames.encode_json(req.chan, Kind.RESP, {"ok": True, "exit_code": 0}))
        await w.drain()
        await asyncio.sleep(3600)

    client, task = await connect(guest)
    per_turn = await _per_turn(decoded, asyncio.create_task(client.exec("flood")))
    assert sum(per_turn) == events + 1
    assert max(per_turn) <= _most_per_turn(event) + 1, per_turn  # + the answer
    task.cancel()
    await client.conn.close()
