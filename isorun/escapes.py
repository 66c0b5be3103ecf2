"""Control characters shown as escapes (`\\x1b`), for text a guest wrote before it reaches
a log line or a terminal: a newline would forge a log record, ESC drive a terminal."""

from __future__ import annotations

# C0 and C1 controls, DEL, and the Unicode line and paragraph separators
_CONTROLS = (*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029)


def _table(keep: str) -> dict[int, str]:
    return {
        c: f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}" for c in _CONTROLS if chr(c) not in keep
    }


# for str.translate: one log record per line (tabs kept)
IN_A_LOG_LINE = _table("\t")
# for text shown on a terminal: its lines and tabs kept
ON_A_TERMINAL = _table("\t\n")
