"""The daemon's log keeps one record per line whatever text a record carries: messages hold
guest text (an agent's error for a download it broke off), and a guest wrote a forged
second line and terminal escapes into the log that way."""

from __future__ import annotations

import io
import logging

from isorun.daemon.main import OneLineFormatter


def test_guest_text_cannot_forge_a_log_line_or_drive_a_terminal() -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(OneLineFormatter("%(levelname)s %(message)s"))
    log = logging.getLogger("test-log-lines")
    log.addHandler(handler)
    log.propagate = False
    guest_error = (
        "cancelled\n2099-01-01 00:00:00 CRITICAL isorund.api: escaped\x1b[2K\x1b[1A"
        "\x1b]0;pwned\x07\r\u2028\x85 tab\tand é stay"
    )
    try:
        log.warning("GET files %s broken off: %s", "/tmp/x", guest_error)
        try:
            raise RuntimeError("the daemon's own")
        except RuntimeError:
            log.exception("unhandled")
    finally:
        log.removeHandler(handler)
    first, *rest = out.getvalue().splitlines()
    assert first == (
        "WARNING GET files /tmp/x broken off: cancelled\\x0a2099-01-01 00:00:00 CRITICAL "
        "isorund.api: escaped\\x1b[2K\\x1b[1A\\x1b]0;pwned\\x07\\x0d\\u2028\\x85 tab\tand é stay"
    )
    assert rest[0] == "ERROR unhandled" and rest[1].startswith("Traceback")  # kept as is
