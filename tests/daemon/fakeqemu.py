"""Stands in for a QEMU that a daemon re-adopts after a restart, whose guest's agent was
replaced by one that never answers: serves the run dir's console, a QMP monitor that
answers every command, and an agent socket that accepts and then says nothing.

usage: python fakeqemu.py RUN_DIR (the run dir is in its command line, as in QEMU's, so
the daemon's running_pid() takes it for the VM); prints "ready" once it serves."""

from __future__ import annotations

import json
import socket
import sys
import threading
from pathlib import Path

QEMU_VERSION = {"qemu": {"micro": 0, "minor": 2, "major": 8}, "package": ""}
GREETING = {"QMP": {"version": QEMU_VERSION, "capabilities": []}}


def _serve_qmp(conn: socket.socket) -> None:
    conn.sendall(json.dumps(GREETING).encode() + b"\r\n")
    decoder, buf = json.JSONDecoder(), ""
    while data := conn.recv(65536):
        buf += data.decode()
        while buf.strip():
            try:
                msg, end = decoder.raw_decode(buf.lstrip())
            except ValueError:
                break
            buf = buf.lstrip()[end:]
            answer = {"return": {"status": "running", "running": True}, "id": msg.get("id")}
            conn.sendall(json.dumps(answer).encode() + b"\r\n")


def _accept(sock: socket.socket, serve: bool) -> None:
    held = []  # kept open, never read (the console's reader and the silent agent)
    while True:
        conn, _ = sock.accept()
        if serve:
            threading.Thread(target=_serve_qmp, args=(conn,), daemon=True).start()
        else:
            held.append(conn)


def main(run_dir: Path) -> None:
    for name, serve in (("console.sock", False), ("qmp.sock", True), ("agent.sock", False)):
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(run_dir / name))
        sock.listen(16)
        threading.Thread(target=_accept, args=(sock, serve), daemon=True).start()
    print("ready", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
