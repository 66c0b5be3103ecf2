"""A raw byte stream (a file's bytes) that a failure in its middle breaks off cleanly.

Once its headers are out a response cannot turn into an error any more: the only honest
end is to stop before the final chunk, so that the client sees an incomplete body and never
mistakes a part for the whole. Raising from the body did that too, but uvicorn logged a
traceback for every guest that died mid-download; the body logs one line instead.
"""

from __future__ import annotations

from starlette.responses import StreamingResponse
from starlette.types import Send


class BrokenOff(Exception):
    """Raised by a body iterator that has logged why its stream cannot go on."""


class RawStream(StreamingResponse):
    media_type = "application/octet-stream"

    async def stream_response(self, send: Send) -> None:
        try:
            await super().stream_response(send)
        except BrokenOff:
            # no final chunk: the server closes the connection on a response left incomplete
            return
