"""Durable state of the service: SQLite (WAL) for characters, builds, stage state and events.

One file, ``<data_dir>/likeness.db``; artifacts live beside it under
``<data_dir>/builds/<build_id>/`` (see docs/service.md). Every write is one
transaction, so a SIGKILL leaves either the old or the new row, never half.
Event numbers are 1, 2, 3, ... per build and never reused, which is what lets
``WatchBuild`` clients reconnect with the last number they saw.

Thread-safe: one connection guarded by a lock (SQLite serialises writers
anyway), plus a condition variable that wakes in-process watchers when an
event lands.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

from likeness.errors import AlreadyExists, FailedPrecondition, InvalidInput, NotFound
from likeness.files import check_name

BuildState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
DB_NAME = "likeness.db"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS characters (
    name TEXT PRIMARY KEY,
    spec_json TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS builds (
    id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    character TEXT NOT NULL DEFAULT '',
    spec_json TEXT NOT NULL,
    options_json TEXT NOT NULL,
    state TEXT NOT NULL,
    stage TEXT NOT NULL DEFAULT '',
    round INTEGER NOT NULL DEFAULT 0,
    error TEXT NOT NULL DEFAULT '',
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    device TEXT NOT NULL DEFAULT '',
    owner TEXT NOT NULL DEFAULT '',
    result_json TEXT NOT NULL DEFAULT '{}',
    created_at REAL NOT NULL,
    started_at REAL NOT NULL DEFAULT 0,
    finished_at REAL NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS builds_by_state ON builds(state, seq);
CREATE INDEX IF NOT EXISTS builds_by_character ON builds(character, seq);
CREATE TABLE IF NOT EXISTS stages (
    build_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    stage TEXT NOT NULL,
    state TEXT NOT NULL,
    result_json TEXT NOT NULL DEFAULT '{}',
    updated_at REAL NOT NULL,
    PRIMARY KEY (build_id, round, stage)
);
CREATE TABLE IF NOT EXISTS events (
    build_id TEXT NOT NULL,
    number INTEGER NOT NULL,
    time REAL NOT NULL,
    kind TEXT NOT NULL,
    stage TEXT NOT NULL DEFAULT '',
    round INTEGER NOT NULL DEFAULT 0,
    done INTEGER NOT NULL DEFAULT 0,
    total INTEGER NOT NULL DEFAULT 0,
    message TEXT NOT NULL DEFAULT '',
    metrics_json TEXT NOT NULL DEFAULT '{}',
    state TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (build_id, number)
);
CREATE TABLE IF NOT EXISTS nightly_runs (
    night TEXT NOT NULL,
    character TEXT NOT NULL,
    spec_file TEXT NOT NULL DEFAULT '',
    spec_sha256 TEXT NOT NULL DEFAULT '',
    build_id TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL,
    scores_json TEXT NOT NULL DEFAULT '{}',
    error TEXT NOT NULL DEFAULT '',
    started_at REAL NOT NULL,
    finished_at REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (night, character)
);
CREATE INDEX IF NOT EXISTS nightly_runs_by_character ON nightly_runs(character, night);
"""



def process_owner() -> str:
    """This process as a build owner: ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


def owner_alive(owner: str) -> bool:
    """Whether the owning process still runs (only knowable for this host; others count as gone).

    A process that died (kill -9, crash, reboot) leaves its builds to be resumed.
    """
    host, _, pid = owner.rpartition(":")
    if not owner or host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    try:  # a killed process its parent has not reaped yet (a zombie) is gone too
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True

@dataclass(frozen=True)
class CharacterRow:
    name: str
    spec: dict[str, Any]
    created_at: float
    latest_build_id: str = ""


@dataclass(frozen=True)
class BuildRow:
    id: str
    character: str
    spec: dict[str, Any]
    options: dict[str, Any]
    state: str
    stage: str
    round: int
    error: str
    cancel_requested: bool
    device: str
    result: dict[str, Any]
    created_at: float
    started_at: float
    finished_at: float
    last_event: int = 0

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL


@dataclass(frozen=True)
class StageRow:
    round: int
    stage: str
    state: str
    result: dict[str, Any]
    updated_at: float


@dataclass(frozen=True)
class EventRow:
    build_id: str
    number: int
    time: float
    kind: str
    stage: str = ""
    round: int = 0
    done: int = 0
    total: int = 0
    message: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    state: str = ""


@dataclass(frozen=True)
class NightlyRow:
    """One character's build of one night (``likeness nightly``)."""

    night: str
    character: str
    spec_file: str
    spec_sha256: str
    build_id: str
    # "running" while the night's build runs, then the build's final state.
    state: str
    # report.json summary.scores of a succeeded build (higher is better).
    scores: dict[str, float | None]
    error: str
    started_at: float
    finished_at: float


def new_build_id() -> str:
    """Sortable, unguessable, safe as a folder name: b-<utc time>-<random>."""
    return "b-" + time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(4)


class Store:
    """The SQLite store; safe to share between threads."""

    def __init__(self, data_dir: str | Path, *, busy_timeout: float = 30.0) -> None:
        """``busy_timeout``: seconds a write waits for another process (a CLI on the same data dir)."""
        self.data_dir = Path(data_dir).resolve()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.data_dir / DB_NAME
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._conn = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None,
                                     timeout=busy_timeout)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        # FULL: a committed event survives even an OS crash, not only a process kill.
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        with self._lock:
            self._conn.executescript(_SCHEMA)
            cols = {r["name"] for r in self._conn.execute("PRAGMA table_info(builds)")}
            if "owner" not in cols:  # data dirs made before builds had an owner process
                self._conn.execute("ALTER TABLE builds ADD COLUMN owner TEXT NOT NULL DEFAULT ''")

    # ------------------------------------------------------------ plumbing
    class _Tx:
        def __init__(self, store: "Store") -> None:
            self.store = store

        def __enter__(self) -> sqlite3.Connection:
            self.store._lock.acquire()
            try:
                self.store._conn.execute("BEGIN IMMEDIATE")
            except BaseException:
                # "database is locked" (another process held it past the busy timeout): without
                # this the lock stayed taken and every later store call in this process hung.
                self.store._lock.release()
                raise
            return self.store._conn

        def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
            try:
                self.store._conn.execute("ROLLBACK" if exc_type else "COMMIT")
            finally:
                self.store._lock.release()

    def _tx(self) -> "Store._Tx":
        return Store._Tx(self)

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, args).fetchall()

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def build_dir(self, build_id: str) -> Path:
        """``<data_dir>/builds/<build_id>`` (the id is checked: it becomes a folder name)."""
        return self.data_dir / "builds" / check_name(build_id, "build id")

    # ---------------------------------------------------------- characters
    def create_character(self, name: str, spec: dict[str, Any]) -> CharacterRow:
        check_name(name, "character name")
        now = time.time()
        with self._tx() as c:
            if c.execute("SELECT 1 FROM characters WHERE name=?", (name,)).fetchone():
                raise AlreadyExists(f"character {name!r} already exists; delete it first or pick another name")
            c.execute("INSERT INTO characters(name, spec_json, created_at) VALUES (?,?,?)",
                      (name, json.dumps(spec), now))
        return CharacterRow(name, spec, now)

    def get_character(self, name: str) -> CharacterRow:
        rows = self._query("SELECT * FROM characters WHERE name=?", (name,))
        if not rows:
            raise NotFound(f"character {name!r} does not exist; create it first (CreateCharacter / likeness build SPEC)")
        return self._character(rows[0])

    def list_characters(self) -> list[CharacterRow]:
        return [self._character(r) for r in self._query("SELECT * FROM characters ORDER BY name")]

    def delete_character(self, name: str) -> bool:
        with self._tx() as c:
            busy = c.execute(
                "SELECT id FROM builds WHERE character=? AND state IN ('queued','running')", (name,)
            ).fetchone()
            if busy:
                raise FailedPrecondition(f"character {name!r} has an unfinished build {busy['id']}; cancel it first")
            cur = c.execute("DELETE FROM characters WHERE name=?", (name,))
        return cur.rowcount > 0

    def _character(self, r: sqlite3.Row) -> CharacterRow:
        latest = self._query(
            "SELECT id FROM builds WHERE character=? AND state='succeeded' ORDER BY seq DESC LIMIT 1", (r["name"],)
        )
        return CharacterRow(r["name"], json.loads(r["spec_json"]), r["created_at"], latest[0]["id"] if latest else "")

    # -------------------------------------------------------------- builds
    def create_build(self, spec: dict[str, Any], options: dict[str, Any], character: str = "",
                     build_id: str | None = None, running_on: str = "") -> BuildRow:
        """A queued build, with its first event ("queued").

        ``running_on`` (a device name) creates it already claimed, in the same transaction:
        an embedded run on a data dir a server also serves must not leave the build queued
        for an instant, or the server's worker could take it and both would run it.
        """
        build_id = check_name(build_id or new_build_id(), "build id")
        now = time.time()
        with self._tx() as c:
            if c.execute("SELECT 1 FROM builds WHERE id=?", (build_id,)).fetchone():
                raise AlreadyExists(f"build {build_id!r} already exists")
            seq = c.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM builds").fetchone()[0]
            c.execute(
                "INSERT INTO builds(id, seq, character, spec_json, options_json, state, created_at) "
                "VALUES (?,?,?,?,?,?,?)",
                (build_id, seq, character, json.dumps(spec), json.dumps(options), "queued", now),
            )
            self._add_event(c, build_id, "state", message="queued", state="queued")
            if running_on:
                self._set_running(c, build_id, running_on)
        self._notify()
        return self.get_build(build_id)

    def get_build(self, build_id: str) -> BuildRow:
        rows = self._query(
            "SELECT b.*, (SELECT COALESCE(MAX(number), 0) FROM events e WHERE e.build_id=b.id) AS last_event "
            "FROM builds b WHERE id=?", (build_id,)
        )
        if not rows:
            raise NotFound(f"build {build_id!r} does not exist; list builds with `likeness builds list`")
        return self._build(rows[0])

    def list_builds(self, character: str = "", limit: int = 100, states: tuple[str, ...] = ()) -> list[BuildRow]:
        """Newest first."""
        sql = ("SELECT b.*, (SELECT COALESCE(MAX(number), 0) FROM events e WHERE e.build_id=b.id) AS last_event "
               "FROM builds b WHERE 1=1")
        args: list[Any] = []
        if character:
            sql += " AND character=?"
            args.append(character)
        if states:
            sql += f" AND state IN ({','.join('?' * len(states))})"
            args.extend(states)
        sql += " ORDER BY seq DESC LIMIT ?"
        args.append(int(limit))
        return [self._build(r) for r in self._query(sql, tuple(args))]

    def _build(self, r: sqlite3.Row) -> BuildRow:
        return BuildRow(
            id=r["id"], character=r["character"], spec=json.loads(r["spec_json"]),
            options=json.loads(r["options_json"]), state=r["state"], stage=r["stage"], round=r["round"],
            error=r["error"], cancel_requested=bool(r["cancel_requested"]), device=r["device"],
            result=json.loads(r["result_json"]), created_at=r["created_at"], started_at=r["started_at"],
            finished_at=r["finished_at"], last_event=r["last_event"],
        )

    def claim_next(self, device: str) -> BuildRow | None:
        """Atomically move the oldest queued build to running on ``device``."""
        with self._tx() as c:
            row = c.execute("SELECT id FROM builds WHERE state='queued' ORDER BY seq LIMIT 1").fetchone()
            if row is None:
                return None
            self._set_running(c, row["id"], device)
        self._notify()
        return self.get_build(row["id"])

    def claim(self, build_id: str, device: str) -> BuildRow:
        """Take one build to run in this process (embedded runs, ``--resume``).

        A queued build moves to running; a running build whose process died is
        taken over; one still running in another live process is refused, so a
        build never runs twice.
        """
        with self._tx() as c:
            row = c.execute("SELECT state, owner FROM builds WHERE id=?", (build_id,)).fetchone()
            if row is None:
                raise NotFound(f"build {build_id!r} does not exist")
            if row["state"] == "running" and row["owner"] != process_owner() and owner_alive(row["owner"]):
                raise FailedPrecondition(
                    f"build {build_id} is running in another process ({row['owner']}); wait for it, "
                    "or cancel it (likeness builds cancel) before resuming it here"
                )
            if row["state"] == "queued" or (row["state"] == "running" and row["owner"] != process_owner()):
                self._set_running(c, build_id, device)
        self._notify()
        return self.get_build(build_id)

    def _set_running(self, c: sqlite3.Connection, build_id: str, device: str) -> None:
        c.execute(
            "UPDATE builds SET state='running', device=?, owner=?, "
            "started_at=CASE WHEN started_at=0 THEN ? ELSE started_at END WHERE id=?",
            (device, process_owner(), time.time(), build_id),
        )
        self._add_event(c, build_id, "state", message=f"running on {device}", state="running")

    def requeue_interrupted(self) -> list[str]:
        """After a restart: builds that were running go back to the queue (to resume),
        and builds whose cancel was requested are marked cancelled.

        A build still running in another live process on this machine (an embedded
        `likeness build` or nightly on the same data dir) is left alone: it is not
        interrupted, and taking it would run it twice.
        """
        with self._tx() as c:
            ids = [r["id"] for r in c.execute(
                "SELECT id, cancel_requested FROM builds WHERE state IN ('running','queued') ORDER BY seq")]
            resumed = []
            for bid in ids:
                cancel = c.execute("SELECT cancel_requested, state, owner FROM builds WHERE id=?", (bid,)).fetchone()
                if (cancel["state"] == "running" and cancel["owner"] != process_owner()
                        and owner_alive(cancel["owner"])):
                    continue
                if cancel["cancel_requested"]:
                    self._finish(c, bid, "cancelled", "cancelled on request")
                elif cancel["state"] == "running":
                    c.execute("UPDATE builds SET state='queued' WHERE id=?", (bid,))
                    self._add_event(c, bid, "state", message="server restarted: resuming from the last completed unit",
                                    state="queued")
                    resumed.append(bid)
        self._notify()
        return resumed

    def set_stage(self, build_id: str, round_: int, stage: str, state: str,
                  result: dict[str, Any] | None = None, message: str = "") -> None:
        """Record a stage's state (``running``/``done``) and the matching event, atomically."""
        with self._tx() as c:
            c.execute(
                "INSERT INTO stages(build_id, round, stage, state, result_json, updated_at) VALUES (?,?,?,?,?,?) "
                "ON CONFLICT(build_id, round, stage) DO UPDATE SET state=excluded.state, "
                "result_json=excluded.result_json, updated_at=excluded.updated_at",
                (build_id, round_, stage, state, json.dumps(result or {}), time.time()),
            )
            c.execute("UPDATE builds SET stage=?, round=? WHERE id=?", (stage, round_, build_id))
            kind = "stage_done" if state == "done" else "stage_started"
            metrics = {k: float(v) for k, v in (result or {}).get("scores", {}).items()} if result else {}
            self._add_event(c, build_id, kind, stage=stage, round_=round_, message=message or f"{stage} {state}",
                            metrics=metrics)
        self._notify()

    def stages(self, build_id: str) -> list[StageRow]:
        rows = self._query("SELECT * FROM stages WHERE build_id=? ORDER BY round, updated_at", (build_id,))
        return [StageRow(r["round"], r["stage"], r["state"], json.loads(r["result_json"]), r["updated_at"]) for r in rows]

    def stage(self, build_id: str, round_: int, stage: str) -> StageRow | None:
        rows = self._query("SELECT * FROM stages WHERE build_id=? AND round=? AND stage=?", (build_id, round_, stage))
        if not rows:
            return None
        r = rows[0]
        return StageRow(r["round"], r["stage"], r["state"], json.loads(r["result_json"]), r["updated_at"])

    def request_cancel(self, build_id: str) -> BuildRow:
        """Queued builds are cancelled at once; running ones when the worker sees the flag."""
        with self._tx() as c:
            row = c.execute("SELECT state FROM builds WHERE id=?", (build_id,)).fetchone()
            if row is None:
                raise NotFound(f"build {build_id!r} does not exist")
            if row["state"] == "queued":
                self._finish(c, build_id, "cancelled", "cancelled on request before it started")
            elif row["state"] == "running":
                c.execute("UPDATE builds SET cancel_requested=1 WHERE id=?", (build_id,))
                self._add_event(c, build_id, "log", message="cancel requested; stopping after the current batch")
        self._notify()
        return self.get_build(build_id)

    def finish_build(self, build_id: str, state: str, error: str = "", result: dict[str, Any] | None = None) -> None:
        if state not in TERMINAL:
            raise InvalidInput(f"finish_build: {state!r} is not a final state; use one of {sorted(TERMINAL)}")
        with self._tx() as c:
            self._finish(c, build_id, state, error, result)
        self._notify()

    def _finish(self, c: sqlite3.Connection, build_id: str, state: str, error: str,
                result: dict[str, Any] | None = None) -> None:
        if result is not None:
            c.execute("UPDATE builds SET result_json=? WHERE id=?", (json.dumps(result), build_id))
        c.execute("UPDATE builds SET state=?, error=?, finished_at=? WHERE id=?", (state, error, time.time(), build_id))
        scores = (result or {}).get("scores", {})
        self._add_event(c, build_id, "state", message=error or state, state=state,
                        metrics={k: float(v) for k, v in scores.items()})

    # -------------------------------------------------------------- events
    def add_event(self, build_id: str, kind: str, *, stage: str = "", round_: int = 0, done: int = 0,
                  total: int = 0, message: str = "", metrics: dict[str, float] | None = None) -> int:
        with self._tx() as c:
            n = self._add_event(c, build_id, kind, stage=stage, round_=round_, done=done, total=total,
                                message=message, metrics=metrics)
        self._notify()
        return n

    def _add_event(self, c: sqlite3.Connection, build_id: str, kind: str, *, stage: str = "", round_: int = 0,
                   done: int = 0, total: int = 0, message: str = "", metrics: dict[str, float] | None = None,
                   state: str = "") -> int:
        n = c.execute("SELECT COALESCE(MAX(number), 0) + 1 FROM events WHERE build_id=?", (build_id,)).fetchone()[0]
        if not state:
            row = c.execute("SELECT state FROM builds WHERE id=?", (build_id,)).fetchone()
            state = row["state"] if row else ""
        c.execute(
            "INSERT INTO events(build_id, number, time, kind, stage, round, done, total, message, metrics_json, state) "
            "VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (build_id, n, time.time(), kind, stage, round_, int(done), int(total), message,
             json.dumps(metrics or {}), state),
        )
        return n

    def events(self, build_id: str, after: int = 0, limit: int = 1000) -> list[EventRow]:
        rows = self._query(
            "SELECT * FROM events WHERE build_id=? AND number>? ORDER BY number LIMIT ?", (build_id, int(after), limit)
        )
        return [EventRow(r["build_id"], r["number"], r["time"], r["kind"], r["stage"], r["round"], r["done"],
                         r["total"], r["message"], json.loads(r["metrics_json"]), r["state"]) for r in rows]

    def _notify(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def wait_for_change(self, timeout: float) -> None:
        """Block until any event lands (in this process) or ``timeout`` passes."""
        with self._changed:
            self._changed.wait(timeout)

    # ------------------------------------------------------------- nightly
    # The nightly runner's history: one row per (night, character), in the same file and
    # under the same transaction rules as builds (the store is the one owner of likeness.db).
    def nightly_run(self, night: str, character: str) -> NightlyRow | None:
        rows = self._query("SELECT * FROM nightly_runs WHERE night=? AND character=?", (night, character))
        return self._nightly(rows[0]) if rows else None

    def start_nightly(self, night: str, character: str, spec_file: str, spec_sha256: str) -> None:
        """Mark the character's build of ``night`` running (again, after a failure or a kill)."""
        with self._tx() as c:
            c.execute(
                "INSERT INTO nightly_runs(night, character, spec_file, spec_sha256, state, started_at) "
                "VALUES (?,?,?,?, 'running', ?) ON CONFLICT(night, character) DO UPDATE SET state='running', "
                "spec_file=excluded.spec_file, spec_sha256=excluded.spec_sha256, error='', "
                "started_at=excluded.started_at", (night, character, spec_file, spec_sha256, time.time()))

    def set_nightly_build(self, night: str, character: str, build_id: str) -> None:
        """Record the build as soon as it exists, so a killed run resumes it instead of starting over."""
        with self._tx() as c:
            c.execute("UPDATE nightly_runs SET build_id=? WHERE night=? AND character=?", (build_id, night, character))

    def finish_nightly(self, night: str, character: str, state: str, build_id: str,
                       scores: dict[str, Any], error: str) -> None:
        with self._tx() as c:
            c.execute("UPDATE nightly_runs SET state=?, build_id=?, scores_json=?, error=?, finished_at=? "
                      "WHERE night=? AND character=?",
                      (state, build_id, json.dumps(scores), error[:4000], time.time(), night, character))

    def previous_nightly_success(self, character: str, night: str) -> NightlyRow | None:
        """The character's last succeeded nightly build before ``night``."""
        rows = self._query("SELECT * FROM nightly_runs WHERE character=? AND night<? AND state='succeeded' "
                           "ORDER BY night DESC LIMIT 1", (character, night))
        return self._nightly(rows[0]) if rows else None

    def nightly_series(self, character: str, until: str) -> list[NightlyRow]:
        """The character's succeeded nightly builds up to and including ``until``, oldest first."""
        return [self._nightly(r) for r in self._query(
            "SELECT * FROM nightly_runs WHERE character=? AND night<=? AND state='succeeded' ORDER BY night",
            (character, until))]

    @staticmethod
    def _nightly(r: sqlite3.Row) -> NightlyRow:
        return NightlyRow(night=r["night"], character=r["character"], spec_file=r["spec_file"],
                          spec_sha256=r["spec_sha256"], build_id=r["build_id"], state=r["state"],
                          scores=json.loads(r["scores_json"]), error=r["error"], started_at=r["started_at"],
                          finished_at=r["finished_at"])

    def watch(self, build_id: str, after: int = 0, *, poll: float = 0.5,
              active: Any = None) -> Iterator[EventRow]:
        """Every event after ``after``, then live ones, until the build is final and drained.

        ``active`` (a callable) stops the watch early when it returns False (a gone client).
        Polls as well as waiting on the in-process condition, so another process's writes
        (a CLI watching a server's database) are seen too.
        """
        self.get_build(build_id)
        last = int(after)
        while active is None or active():
            batch = self.events(build_id, last)
            for ev in batch:
                last = ev.number
                yield ev
            if batch:
                continue
            if self.get_build(build_id).terminal and not self.events(build_id, last, 1):
                return
            self.wait_for_change(poll)
