"""Daemon state in SQLite (WAL): tenants and their API keys, sandboxes, usage records.

Every write is one transaction, so a crash or a full disk leaves the last committed state
intact. `StateFullError` names the disk-full case so the API can answer 507.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from isorun.errors import IsorunError

SCHEMA = """
CREATE TABLE IF NOT EXISTS tenants (
  id TEXT PRIMARY KEY, name TEXT NOT NULL, created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS api_keys (
  id TEXT PRIMARY KEY, tenant_id TEXT NOT NULL REFERENCES tenants(id),
  hash TEXT NOT NULL, name TEXT NOT NULL, created REAL NOT NULL, revoked REAL
);
CREATE TABLE IF NOT EXISTS sandboxes (
  id TEXT PRIMARY KEY, tenant_id TEXT NOT NULL, image TEXT NOT NULL, image_digest TEXT,
  vcpus INTEGER NOT NULL, memory_mib INTEGER NOT NULL, disk_mib INTEGER NOT NULL,
  env TEXT NOT NULL, metadata TEXT NOT NULL, state TEXT NOT NULL,
  created REAL NOT NULL, started REAL, timeout_s INTEGER NOT NULL, expires REAL NOT NULL,
  ended REAL, end_reason TEXT, error TEXT,
  vm_id TEXT, run_dir TEXT, pid INTEGER,
  cpu_ms INTEGER, mem_peak_bytes INTEGER, uptime_ms INTEGER
);
CREATE INDEX IF NOT EXISTS sandboxes_tenant ON sandboxes(tenant_id, state);
CREATE TABLE IF NOT EXISTS usage (
  id INTEGER PRIMARY KEY AUTOINCREMENT, tenant_id TEXT NOT NULL, sandbox_id TEXT NOT NULL,
  vcpus INTEGER NOT NULL, memory_mib INTEGER NOT NULL, started REAL NOT NULL,
  ended REAL NOT NULL, cpu_ms INTEGER NOT NULL, mem_peak_bytes INTEGER NOT NULL,
  uptime_ms INTEGER NOT NULL, billed_seconds INTEGER NOT NULL, cost_usd REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS usage_tenant ON usage(tenant_id, ended);
"""

# Schema changes after the first release, applied in order to databases whose
# `PRAGMA user_version` is below their number. Each step is idempotent (IF NOT EXISTS), so a
# crash between a step and the version bump just repeats it.
MIGRATIONS: list[tuple[int, str]] = [
    (
        1,
        # Background processes started with an open stdin pipe that was not closed yet: a
        # restarted daemon must still accept POST .../stdin for them.
        """
        CREATE TABLE IF NOT EXISTS proc_stdin (
          sandbox_id TEXT NOT NULL, proc_id TEXT NOT NULL, created REAL NOT NULL,
          PRIMARY KEY (sandbox_id, proc_id)
        );
        """,
    ),
    (
        2,
        # The tail of an ended sandbox's console (why did it die?): the VM and its run dir
        # are gone by then. One row per sandbox that ended with a console to keep.
        """
        CREATE TABLE IF NOT EXISTS consoles (
          sandbox_id TEXT PRIMARY KEY, text TEXT NOT NULL
        );
        """,
    ),
    (
        3,
        # An ended sandbox's env (API keys, up to 32 KiB) is of no more use: older daemons
        # kept it for good (end_sandbox clears it now).
        "UPDATE sandboxes SET env = '{}' WHERE state = 'ended' AND env != '{}';",
    ),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]
# Per sandbox; the guest itself keeps only its 256 latest processes.
MAX_STDIN_PROCS = 1024
# Ended sandboxes whose console tail is kept (the newest; each at most CONSOLE_KEPT, 64 KiB):
# a daemon ending thousands of sandboxes a day would otherwise grow its database by
# gigabytes. ~64 MiB at most; their usage records are kept regardless.
KEPT_CONSOLES = 1000

LIVE_STATES = ("creating", "running")
LOCAL_TENANT = "local"


class StateError(IsorunError):
    """The daemon's state database could not be read or written."""


class StateFullError(StateError):
    """The disk holding the state database is full; nothing stored was lost."""


@dataclass
class SandboxRow:
    id: str
    tenant_id: str
    image: str
    vcpus: int
    memory_mib: int
    disk_mib: int
    env: dict[str, str]
    metadata: dict[str, str]
    state: str
    created: float
    timeout_s: int
    expires: float
    image_digest: str | None = None
    started: float | None = None
    ended: float | None = None
    end_reason: str | None = None
    error: str | None = None
    vm_id: str | None = None
    run_dir: str | None = None
    pid: int | None = None
    cpu_ms: int | None = None
    mem_peak_bytes: int | None = None
    uptime_ms: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_db(cls, r: sqlite3.Row) -> SandboxRow:
        """A row read back, without its env (_READ): the guest was given it at create, and
        nothing after reads it, so no lookup or listing parses it."""
        d = dict(r)
        d["env"] = {}
        d["metadata"] = json.loads(d["metadata"])
        return cls(**d)

    def public(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "image": self.image,
            "image_digest": self.image_digest,
            "state": self.state,
            "vcpus": self.vcpus,
            "memory_mib": self.memory_mib,
            "disk_mib": self.disk_mib,
            "metadata": self.metadata,
            "created_at": self.created,
            "started_at": self.started,
            "sandbox_timeout": self.timeout_s,
            "expires_at": self.expires,
            "ended_at": self.ended,
            "end_reason": self.end_reason,
            "error": self.error,
        }
        if self.state == "ended":
            out["usage"] = {
                "cpu_ms": self.cpu_ms or 0,
                "mem_peak_bytes": self.mem_peak_bytes or 0,
                "uptime_ms": self.uptime_ms or 0,
            }
        return out


_COLUMNS = [
    "id",
    "tenant_id",
    "image",
    "image_digest",
    "vcpus",
    "memory_mib",
    "disk_mib",
    "env",
    "metadata",
    "state",
    "created",
    "started",
    "timeout_s",
    "expires",
    "ended",
    "end_reason",
    "error",
    "vm_id",
    "run_dir",
    "pid",
    "cpu_ms",
    "mem_peak_bytes",
    "uptime_ms",
]
# What lookups and listings read: every column but env.
_READ = ", ".join(c for c in _COLUMNS if c != "env")


def _keep_private(path: Path) -> None:
    """The database and its -wal and -shm (which SQLite makes with the database's mode)
    readable by their owner alone: they hold sandboxes' env, where API keys are passed.
    Older daemons left them 0644."""
    if not path.exists():
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
    for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        with contextlib.suppress(FileNotFoundError):
            if p.stat().st_mode & 0o077:
                os.chmod(p, 0o600)


class Store:
    def __init__(self, path: Path, kept_consoles: int = KEPT_CONSOLES) -> None:
        self.path = path
        self.kept_consoles = kept_consoles
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            _keep_private(path)
            self.db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
            self.db.row_factory = sqlite3.Row
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute("PRAGMA busy_timeout=5000")
            self.db.executescript(SCHEMA)
            self._migrate()
            self.db.execute(
                "INSERT OR IGNORE INTO tenants(id, name, created) VALUES (?, ?, ?)",
                (LOCAL_TENANT, "local unix-socket user", time.time()),
            )
        except (sqlite3.Error, OSError) as exc:
            raise StateError(f"cannot open the state database {path}: {exc}") from exc

    def close(self) -> None:
        self.db.close()

    def _migrate(self) -> None:
        version = int(self.db.execute("PRAGMA user_version").fetchone()[0])
        for number, script in MIGRATIONS:
            if number > version:
                self.db.executescript(script)
                self.db.execute(f"PRAGMA user_version = {int(number)}")

    @property
    def schema_version(self) -> int:
        return int(self.db.execute("PRAGMA user_version").fetchone()[0])

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        try:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            if "full" in str(exc).lower():
                raise StateFullError(
                    f"the disk holding {self.path} is full: free space there; "
                    "nothing already stored was lost"
                ) from exc
            raise StateError(f"state database error: {exc}") from exc

    # --- tenants and keys ----------------------------------------------------------

    def add_tenant(self, tenant_id: str, name: str) -> None:
        with self.tx() as db:
            db.execute(
                "INSERT OR IGNORE INTO tenants(id, name, created) VALUES (?, ?, ?)",
                (tenant_id, name, time.time()),
            )

    def add_key(self, key_id: str, tenant_id: str, key_hash: str, name: str) -> None:
        with self.tx() as db:
            db.execute(
                "INSERT INTO api_keys(id, tenant_id, hash, name, created) VALUES (?,?,?,?,?)",
                (key_id, tenant_id, key_hash, name, time.time()),
            )

    def get_key(self, key_id: str) -> sqlite3.Row | None:
        row: sqlite3.Row | None = self.db.execute(
            "SELECT * FROM api_keys WHERE id = ? AND revoked IS NULL", (key_id,)
        ).fetchone()
        return row

    def list_keys(self, tenant_id: str | None = None) -> list[dict[str, Any]]:
        q = "SELECT id, tenant_id, name, created, revoked FROM api_keys"
        args: tuple[Any, ...] = ()
        if tenant_id is not None:
            q += " WHERE tenant_id = ?"
            args = (tenant_id,)
        return [dict(r) for r in self.db.execute(q + " ORDER BY created", args)]

    def revoke_key(self, key_id: str) -> bool:
        with self.tx() as db:
            cur = db.execute(
                "UPDATE api_keys SET revoked = ? WHERE id = ? AND revoked IS NULL",
                (time.time(), key_id),
            )
            return cur.rowcount > 0

    # --- sandboxes -------------------------------------------------------------------

    def insert_sandbox(self, row: SandboxRow) -> None:
        values = []
        for c in _COLUMNS:
            v = getattr(row, c)
            values.append(json.dumps(v) if c in ("env", "metadata") else v)
        with self.tx() as db:
            db.execute(
                f"INSERT INTO sandboxes({', '.join(_COLUMNS)}) "
                f"VALUES ({', '.join('?' * len(_COLUMNS))})",
                values,
            )

    def update_sandbox(self, sandbox_id: str, **fields: Any) -> None:
        if not fields:
            return
        bad = set(fields) - set(_COLUMNS)
        if bad:
            raise ValueError(f"unknown sandbox columns {bad}")
        sets = ", ".join(f"{k} = ?" for k in fields)
        vals = [json.dumps(v) if k in ("env", "metadata") else v for k, v in fields.items()]
        with self.tx() as db:
            db.execute(f"UPDATE sandboxes SET {sets} WHERE id = ?", [*vals, sandbox_id])

    def forget_sandbox(self, sandbox_id: str) -> None:
        """Remove a sandbox that never was: its create was refused before any VM existed."""
        with self.tx() as db:
            db.execute("DELETE FROM proc_stdin WHERE sandbox_id = ?", (sandbox_id,))
            db.execute("DELETE FROM sandboxes WHERE id = ?", (sandbox_id,))

    def get_sandbox(self, sandbox_id: str) -> SandboxRow | None:
        r = self.db.execute(f"SELECT {_READ} FROM sandboxes WHERE id = ?", (sandbox_id,)).fetchone()
        return SandboxRow.from_db(r) if r is not None else None

    def list_sandboxes(
        self, tenant_id: str | None = None, states: tuple[str, ...] | None = None
    ) -> list[SandboxRow]:
        q = f"SELECT {_READ} FROM sandboxes WHERE 1=1"
        args: list[Any] = []
        if tenant_id is not None:
            q += " AND tenant_id = ?"
            args.append(tenant_id)
        if states:
            q += f" AND state IN ({', '.join('?' * len(states))})"
            args.extend(states)
        return [SandboxRow.from_db(r) for r in self.db.execute(q + " ORDER BY created", args)]

    def end_sandbox(
        self,
        row: SandboxRow,
        reason: str,
        usage: tuple[int, int, int],
        price_per_vcpu_hour: float,
        error: str | None = None,
        ended: float | None = None,
        console: str = "",
    ) -> dict[str, Any]:
        """Mark ended (at `ended`, or now) and write the usage record and the tail of its
        `console`, in one transaction; its env (secrets, of no more use) is cleared. A
        sandbox ends once: if its row says ended already, that end and its record stand
        (and `row` is given them)."""
        cpu_ms, mem_peak, uptime_ms = usage
        now = time.time() if ended is None else ended
        billed = -(-uptime_ms // 1000)  # per second, rounded up
        cost = round(billed * row.vcpus * price_per_vcpu_hour / 3600.0, 9)
        with self.tx() as db:
            changed = db.execute(
                "UPDATE sandboxes SET state='ended', ended=?, end_reason=?, env='{}',"
                " error=COALESCE(?, error),"
                " cpu_ms=?, mem_peak_bytes=?, uptime_ms=? WHERE id=? AND state != 'ended'",
                (now, reason, error, cpu_ms, mem_peak, uptime_ms, row.id),
            ).rowcount
            if not changed:
                return self._ended_already(db, row)
            db.execute("DELETE FROM proc_stdin WHERE sandbox_id = ?", (row.id,))
            if console:
                db.execute(
                    "INSERT OR REPLACE INTO consoles(sandbox_id, text) VALUES (?, ?)",
                    (row.id, console),
                )
                # the newest have the highest rowids (a replaced row gets a new one)
                db.execute(
                    "DELETE FROM consoles WHERE rowid <= (SELECT rowid FROM consoles"
                    " ORDER BY rowid DESC LIMIT 1 OFFSET ?)",
                    (self.kept_consoles,),
                )
            db.execute(
                "INSERT INTO usage(tenant_id, sandbox_id, vcpus, memory_mib, started, ended,"
                " cpu_ms, mem_peak_bytes, uptime_ms, billed_seconds, cost_usd)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (
                    row.tenant_id,
                    row.id,
                    row.vcpus,
                    row.memory_mib,
                    row.started or row.created,
                    now,
                    cpu_ms,
                    mem_peak,
                    uptime_ms,
                    billed,
                    cost,
                ),
            )
        row.state, row.ended, row.end_reason = "ended", now, reason
        row.cpu_ms, row.mem_peak_bytes, row.uptime_ms = cpu_ms, mem_peak, uptime_ms
        return {"billed_seconds": billed, "cost_usd": cost}

    def console(self, sandbox_id: str) -> str:
        """The console tail kept when the sandbox ended ("" if none was, or it was among
        the oldest past the newest `kept_consoles`)."""
        r = self.db.execute(
            "SELECT text FROM consoles WHERE sandbox_id = ?", (sandbox_id,)
        ).fetchone()
        return str(r[0]) if r is not None else ""

    @staticmethod
    def _ended_already(db: sqlite3.Connection, row: SandboxRow) -> dict[str, Any]:
        stored = db.execute(f"SELECT {_READ} FROM sandboxes WHERE id = ?", (row.id,)).fetchone()
        if stored is not None:
            was = SandboxRow.from_db(stored)
            row.state, row.ended, row.end_reason = was.state, was.ended, was.end_reason
            row.cpu_ms, row.mem_peak_bytes, row.uptime_ms = (
                was.cpu_ms,
                was.mem_peak_bytes,
                was.uptime_ms,
            )
        bill = db.execute(
            "SELECT billed_seconds, cost_usd FROM usage WHERE sandbox_id = ?"
            " ORDER BY ended DESC LIMIT 1",
            (row.id,),
        ).fetchone()
        return {"billed_seconds": bill[0], "cost_usd": bill[1]} if bill else {}

    # --- open stdin pipes of background processes ---------------------------------------

    def add_stdin_proc(self, sandbox_id: str, proc_id: str) -> None:
        with self.tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO proc_stdin(sandbox_id, proc_id, created) VALUES (?,?,?)",
                (sandbox_id, proc_id, time.time()),
            )
            db.execute(
                "DELETE FROM proc_stdin WHERE sandbox_id = ? AND rowid NOT IN (SELECT rowid"
                " FROM proc_stdin WHERE sandbox_id = ? ORDER BY created DESC LIMIT ?)",
                (sandbox_id, sandbox_id, MAX_STDIN_PROCS),
            )

    def has_stdin_proc(self, sandbox_id: str, proc_id: str) -> bool:
        r = self.db.execute(
            "SELECT 1 FROM proc_stdin WHERE sandbox_id = ? AND proc_id = ?", (sandbox_id, proc_id)
        ).fetchone()
        return r is not None

    def drop_stdin_proc(self, sandbox_id: str, proc_id: str) -> None:
        with self.tx() as db:
            db.execute(
                "DELETE FROM proc_stdin WHERE sandbox_id = ? AND proc_id = ?", (sandbox_id, proc_id)
            )

    # --- usage -----------------------------------------------------------------------

    def usage(self, tenant_id: str, since: float | None, until: float | None) -> dict[str, Any]:
        q = "SELECT * FROM usage WHERE tenant_id = ?"
        args: list[Any] = [tenant_id]
        if since is not None:
            q += " AND ended >= ?"
            args.append(since)
        if until is not None:
            q += " AND ended < ?"
            args.append(until)
        records = [dict(r) for r in self.db.execute(q + " ORDER BY ended", args)]
        for r in records:
            r.pop("tenant_id", None)
        return {
            "records": records,
            "total": {
                "sandboxes": len(records),
                "cpu_ms": sum(r["cpu_ms"] for r in records),
                "billed_seconds": sum(r["billed_seconds"] for r in records),
                "vcpu_seconds": sum(r["billed_seconds"] * r["vcpus"] for r in records),
                "cost_usd": round(sum(r["cost_usd"] for r in records), 9),
            },
        }
