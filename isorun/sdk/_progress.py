"""Progress streams of image pulls/builds and sandbox creation (shared by both SDK faces):
NDJSON `{type: progress, ...}` records, then one final record or an error."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from isorun.sdk._answers import is_id, is_int, loads
from isorun.sdk._callbacks import call_back
from isorun.sdk.errors import error_for, stream_error


@dataclass(frozen=True)
class PullProgress:
    """One step of an image pull/build or sandbox start.

    phase: resolving | pulling | unpacking | building | converting | waiting | cached | done
    (image), then booting (sandbox creation only). `bytes_done`/`bytes_total` are set while
    pulling (compressed layer bytes); `digest` once known."""

    phase: str
    ref: str
    message: str = ""
    digest: str | None = None
    bytes_done: int | None = None
    bytes_total: int | None = None

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> PullProgress:
        def opt_int(k: str) -> int | None:
            v = rec.get(k)
            return v if is_int(v) else None

        digest = rec.get("digest")
        return cls(
            phase=str(rec.get("phase", "")),
            ref=str(rec.get("ref", "")),
            message=str(rec.get("message", "")),
            digest=digest if isinstance(digest, str) else None,
            bytes_done=opt_int("bytes_done"),
            bytes_total=opt_int("bytes_total"),
        )


ProgressCallback = Callable[[PullProgress], object]


@dataclass
class ProgressDecoder:
    """Feed it lines; progress goes to the callback, errors raise, `final` is the last record."""

    on_progress: ProgressCallback | None = None
    final: dict[str, Any] | None = None
    pending: list[Awaitable[object]] | None = None  # as StreamDecoder's
    # the sandbox a create stream said it boots, once it has: the one to destroy if the
    # create fails after that (a callback raised, ^C, the stream broke off)
    sandbox_id: str = ""

    def feed(self, line: str | bytes) -> None:
        if not line.strip():
            return
        try:
            rec = loads(line)
        except ValueError:
            raise error_for(
                502,
                {
                    "error": {
                        "code": "stream_malformed",
                        "message": "the progress stream had a line cut short or not JSON; retry",
                    }
                },
            ) from None
        if not isinstance(rec, dict):
            return
        kind = rec.get("type")
        if kind == "keepalive":
            return
        if kind == "progress":
            if is_id(rec.get("sandbox")):
                self.sandbox_id = rec["sandbox"]
            if self.on_progress is not None:
                event = PullProgress.from_record(rec)
                call_back("on_progress", self.on_progress, event, self.pending)
        elif kind == "error":
            raise stream_error(rec)
        else:
            self.final = rec
            if isinstance(rec.get("sandbox"), dict) and is_id(rec["sandbox"].get("id")):
                self.sandbox_id = rec["sandbox"]["id"]

    def result(self, key: str) -> dict[str, Any]:
        if self.final is None or not isinstance(self.final.get(key), dict):
            raise error_for(
                502,
                {
                    "error": {
                        "code": "stream_cut",
                        "message": f"the progress stream ended without a {key} record; retry",
                    }
                },
            )
        return dict(self.final[key])
