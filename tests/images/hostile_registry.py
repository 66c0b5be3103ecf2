"""A registry that sends its clients elsewhere: every request gets 401 with a bearer token
realm read from a file at that moment (the test writes where to). Run as a script, inside a
test's network namespace: `python3 hostile_registry.py ADDR PORT REALM_FILE`."""

from __future__ import annotations

import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class SendElsewhere(BaseHTTPRequestHandler):
    realm_file: Path

    def do_GET(self) -> None:
        realm = self.realm_file.read_text().strip()
        self.send_response(401)
        self.send_header("WWW-Authenticate", f'Bearer realm="{realm}",service="hostile"')
        self.send_header("Docker-Distribution-API-Version", "registry/2.0")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_HEAD = do_GET

    def log_message(self, format: str, *args: object) -> None:
        pass


if __name__ == "__main__":
    addr, port, realm_file = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    SendElsewhere.realm_file = realm_file
    ThreadingHTTPServer((addr, port), SendElsewhere).serve_forever()
