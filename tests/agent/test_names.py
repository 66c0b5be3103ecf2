"""A file name from the guest is text in which each byte that is not UTF-8 is a lone
surrogate U+DC80..U+DCFF (the agent's "\\udcXX"; Python's surrogateescape). Any other lone
surrogate, or bytes escaped that are UTF-8, is no name a guest can have: a violation."""

from __future__ import annotations

import json
import os

import pytest

from isorun.agent.validate import parse_entry
from isorun.errors import ProtocolError


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
