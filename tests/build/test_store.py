"""The SQLite store: characters, builds, stage state, event numbering, durability across reopen."""

from __future__ import annotations

import threading

import pytest

from likeness.errors import AlreadyExists, FailedPrecondition, InvalidInput, NotFound
from likeness.build.store import Store

SPEC = {"name": "Emily", "token": "3m1ly"}


def test_characters_roundtrip(tmp_path):
    s = Store(tmp_path)
    s.create_character("Emily", SPEC)
    with pytest.raises(AlreadyExists):
        s.create_character("Emily", SPEC)
    with pytest.raises(InvalidInput, match="not allowed"):
        s.create_character("../evil", SPEC)
    assert s.get_character("Emily").spec == SPEC
    assert [c.name for c in s.list_characters()] == ["Emily"]
    assert s.delete_character("Emily")
    with pytest.raises(NotFound, match="create it first"):
        s.get_character("Emily")


def test_build_lifecycle_and_events(tmp_path):
    s = Store(tmp_path)
    s.create_character("Emily", SPEC)
    b = s.create_build(SPEC, {"k": 5}, character="Emily")
    assert b.state == "queued" and b.last_event == 1
    with pytest.raises(FailedPrecondition, match="cancel it first"):
        s.delete_character("Emily")
    claimed = s.claim_next("cpu")
    assert claimed.id == b.id and claimed.state == "running" and claimed.device == "cpu"
    assert s.claim_next("cpu") is None
    s.set_stage(b.id, 0, "generate", "running")
    s.add_event(b.id, "progress", stage="generate", done=1, total=2)
    s.set_stage(b.id, 0, "generate", "done", {"scores": {"n": 2}})
    s.finish_build(b.id, "succeeded", result={"scores": {"identity": 0.7}})
    evs = s.events(b.id)
    assert [e.number for e in evs] == list(range(1, len(evs) + 1))
    assert [e.kind for e in evs] == ["state", "state", "stage_started", "progress", "stage_done", "state"]
    assert evs[-1].state == "succeeded" and evs[-1].metrics == {"identity": 0.7}
    assert [e.number for e in s.events(b.id, after=3)] == [4, 5, 6]
    assert s.stage(b.id, 0, "generate").result == {"scores": {"n": 2}}
    assert s.get_character("Emily").latest_build_id == b.id
    # Watching a finished build replays and ends.
    assert [e.number for e in s.watch(b.id, after=4)] == [5, 6]


def test_restart_requeues_running_and_honours_cancel(tmp_path):
    s = Store(tmp_path)
    a = s.create_build(SPEC, {})
    c = s.create_build(SPEC, {})
    s.claim_next("cpu")
    s.close()
    s2 = Store(tmp_path)  # "restart": the running build goes back to the queue
    assert s2.requeue_interrupted() == [a.id]
    assert s2.get_build(a.id).state == "queued"
    assert s2.claim_next("cpu").id == a.id  # oldest first
    s2.request_cancel(a.id)
    assert s2.get_build(a.id).cancel_requested
    s2.request_cancel(c.id)  # queued: cancelled at once
    assert s2.get_build(c.id).state == "cancelled"
    s2.close()
    s3 = Store(tmp_path)
    s3.requeue_interrupted()  # cancel was asked before the kill: it stays cancelled
    assert s3.get_build(a.id).state == "cancelled"


def test_concurrent_event_numbers_are_unique(tmp_path):
    s = Store(tmp_path)
    b = s.create_build(SPEC, {})

    def add():
        for _ in range(25):
            s.add_event(b.id, "log", message="x")

    threads = [threading.Thread(target=add) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    nums = [e.number for e in s.events(b.id)]
    assert nums == list(range(1, 102))


def test_watch_sees_live_events(tmp_path):
    s = Store(tmp_path)
    b = s.create_build(SPEC, {})
    s.claim_next("cpu")
    seen = []

    def watch():
        for ev in s.watch(b.id, poll=0.05):
            seen.append(ev.number)

    t = threading.Thread(target=watch)
    t.start()
    for i in range(5):
        s.add_event(b.id, "progress", done=i, total=5)
    s.finish_build(b.id, "failed", error="boom")
    t.join(10)
    assert not t.is_alive()
    assert seen == list(range(1, 9))
    assert s.get_build(b.id).error == "boom"
    with pytest.raises(InvalidInput):
        s.finish_build(b.id, "running")


def test_locked_database_fails_the_write_and_frees_the_store(tmp_path):
    """Another process holding the write lock past the busy timeout: that write fails, nothing hangs."""
    import sqlite3

    s = Store(tmp_path, busy_timeout=0.1)
    other = sqlite3.connect(str(tmp_path / "likeness.db"), isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        s.create_character("Emily", SPEC)
    other.execute("ROLLBACK")
    other.close()
    # The store's own lock was released: a write from another thread goes through.
    t = threading.Thread(target=lambda: s.create_character("Emily", SPEC), daemon=True)
    t.start()
    t.join(30)
    assert not t.is_alive() and s.get_character("Emily").spec == SPEC


def test_an_embedded_build_is_created_claimed_so_no_worker_takes_it(tmp_path):
    """`likeness build` on a server's data dir: the build is never queued where the server's worker could claim it."""
    s = Store(tmp_path)
    b = s.create_build(SPEC, {}, running_on="embedded")
    assert b.state == "running" and b.device == "embedded" and b.started_at > 0
    assert s.claim_next("cpu") is None
    assert [(e.kind, e.state) for e in s.events(b.id)] == [("state", "queued"), ("state", "running")]


def _own(store: Store, build_id: str, owner: str) -> None:
    with store._tx() as c:
        c.execute("UPDATE builds SET owner=? WHERE id=?", (owner, build_id))


def test_a_build_running_in_another_live_process_is_neither_requeued_nor_claimed(tmp_path):
    """A server starting beside an embedded `likeness build` on the same data dir must not run it too."""
    import socket
    import subprocess
    import sys

    s = Store(tmp_path)
    live = s.create_build(SPEC, {}, running_on="embedded")
    dead = s.create_build(SPEC, {}, running_on="embedded")
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    gone = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    gone.kill()  # killed but not yet reaped: a zombie counts as gone
    import time

    time.sleep(0.5)
    try:
        host = socket.gethostname()
        _own(s, live.id, f"{host}:{other.pid}")
        _own(s, dead.id, f"{host}:{gone.pid}")
        assert s.requeue_interrupted() == [dead.id]  # its process died: resume it
        assert s.get_build(live.id).state == "running"  # still being built elsewhere: hands off
        with pytest.raises(FailedPrecondition, match="running in another process"):
            s.claim(live.id, "embedded")
    finally:
        other.kill()
        other.wait()
        gone.wait()
    # Once that process is gone, `likeness build --resume` takes the build over.
    assert s.claim(live.id, "embedded").state == "running"
    with s._tx() as c:
        owner = c.execute("SELECT owner FROM builds WHERE id=?", (live.id,)).fetchone()["owner"]
    assert owner.endswith(f":{__import__('os').getpid()}")


def test_a_data_dir_from_before_build_owners_is_migrated(tmp_path):
    import sqlite3

    s = Store(tmp_path)
    b = s.create_build(SPEC, {})
    s.close()
    conn = sqlite3.connect(tmp_path / "likeness.db")
    conn.execute("ALTER TABLE builds DROP COLUMN owner")
    conn.commit()
    conn.close()
    s2 = Store(tmp_path)
    assert s2.claim(b.id, "cpu").state == "running"


def test_nightly_history_lives_in_the_store(tmp_path):
    """The nightly runner's per-night rows are the store's (one owner of likeness.db): a row goes
    running -> build recorded -> finished, survives reopening, and the queries the runner uses
    (previous success before a night, the series up to a night) skip failures and later nights."""
    s = Store(tmp_path)
    assert s.nightly_run("2026-01-01", "Emily") is None
    s.start_nightly("2026-01-01", "Emily", "emily.toml", "ab" * 32)
    s.set_nightly_build("2026-01-01", "Emily", "b-1")
    row = s.nightly_run("2026-01-01", "Emily")
    assert (row.state, row.build_id, row.scores) == ("running", "b-1", {})
    s.finish_nightly("2026-01-01", "Emily", "succeeded", "b-1", {"curated_overall": 0.8}, "")
    s.start_nightly("2026-01-02", "Emily", "emily.toml", "cd" * 32)
    s.finish_nightly("2026-01-02", "Emily", "failed", "b-2", {}, "boom " * 2000)
    s.start_nightly("2026-01-03", "Emily", "emily.toml", "cd" * 32)
    s.finish_nightly("2026-01-03", "Emily", "succeeded", "b-3", {"curated_overall": 0.7}, "")
    s.close()
    s = Store(tmp_path)  # reopened: the history is durable
    failed = s.nightly_run("2026-01-02", "Emily")
    assert failed.state == "failed" and len(failed.error) == 4000
    assert s.previous_nightly_success("Emily", "2026-01-03").build_id == "b-1"
    assert s.previous_nightly_success("Emily", "2026-01-01") is None
    assert [r.night for r in s.nightly_series("Emily", "2026-01-03")] == ["2026-01-01", "2026-01-03"]
    assert [r.scores["curated_overall"] for r in s.nightly_series("Emily", "2026-01-02")] == [0.8]
    assert s.nightly_series("Bob", "2026-01-03") == []
    # A restart of the night's build marks it running again and clears the old error.
    s.start_nightly("2026-01-02", "Emily", "emily.toml", "cd" * 32)
    again = s.nightly_run("2026-01-02", "Emily")
    assert again.state == "running" and again.error == "" and again.build_id == "b-2"
