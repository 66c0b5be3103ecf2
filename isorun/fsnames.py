"""File names that are not UTF-8, as every layer holds them: a byte that is not part of
valid UTF-8 is the lone surrogate U+DC80+byte (Python's surrogateescape, as os.fsdecode
makes it; "\\udcXX" in JSON, where the guest agent turns it back into the byte)."""

from __future__ import annotations


def holds_surrogate(text: str) -> bool:
    """Whether `text` holds a lone surrogate: a name with bytes that are not UTF-8."""
    return not text.isascii() and any("\ud800" <= c <= "\udfff" for c in text)


def surrogate_problem(text: str) -> str | None:
    """What is wrong with `text`'s lone surrogates as such a name, or None: one that
    stands for no byte, or bytes that are UTF-8 escaped one by one (another spelling of a
    name, which the guest never sends)."""
    if text.isascii():
        return None
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return (
            "holds a lone surrogate that stands for no byte (only U+DC80..U+DCFF do: the "
            "bytes of a name that is not UTF-8, as os.fsdecode holds them)"
        )
    if raw.decode("utf-8", "surrogateescape") != text:
        return "escapes bytes that are UTF-8 one by one (write the character)"
    return None
