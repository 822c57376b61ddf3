from __future__ import annotations

import os

import pytest

from likeness.errors import InvalidInput
from likeness.files import atomic_save, atomic_write_bytes, atomic_write_json, check_name, read_json, safe_join


def test_atomic_writes_leave_no_temporaries_and_readable_modes(tmp_path):
    p = atomic_write_bytes(tmp_path / "a" / "x.bin", b"abc")
    assert p.read_bytes() == b"abc"
    atomic_write_json(tmp_path / "a" / "y.json", {"k": [1, 2]})
    assert read_json(tmp_path / "a" / "y.json") == {"k": [1, 2]}
    atomic_save(tmp_path / "a" / "z.txt", lambda t: open(t, "w").write("z"))
    assert sorted(os.listdir(tmp_path / "a")) == ["x.bin", "y.json", "z.txt"]
    mask = os.umask(0)
    os.umask(mask)
    # Reports and images are opened by people: not owner-only like mkstemp's default.
    assert (os.stat(p).st_mode & 0o777) == (0o666 & ~mask)


def test_failed_save_leaves_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "keep.txt"
    target.write_text("old")

    def boom(tmp):
        open(tmp, "w").write("half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        atomic_save(target, boom)
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["keep.txt"]


@pytest.mark.parametrize("name", ["../x", "a/b", "..", ".hidden", "", "x" * 200, "a b"],
                         ids=["parent", "slash", "dotdot", "hidden", "empty", "too-long", "space"])
def test_unsafe_names_are_refused(name):
    with pytest.raises(InvalidInput, match="not allowed"):
        check_name(name)


def test_safe_join_refuses_escape(tmp_path):
    assert safe_join(tmp_path, "a", "b.png") == (tmp_path / "a" / "b.png").resolve()
    with pytest.raises(InvalidInput, match="escapes"):
        safe_join(tmp_path, "..", "etc")


def test_folder_lock_refuses_a_second_writer_and_releases(tmp_path):
    from likeness.errors import FailedPrecondition
    from likeness.files import folder_lock

    with folder_lock(tmp_path, "generation"):
        with pytest.raises(FailedPrecondition, match="another generation is writing"):
            with folder_lock(tmp_path, "generation"):
                pass
    with folder_lock(tmp_path):  # released: a later run gets it
        pass


def test_output_paths_that_cannot_be_folders_are_invalid_input(tmp_path):
    from likeness.files import ensure_dir

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(InvalidInput, match="a file with that name is in the way"):
        ensure_dir(blocker)
    with pytest.raises(InvalidInput, match="cannot be created"):
        atomic_write_bytes(blocker / "x.bin", b"1")
    with pytest.raises(InvalidInput, match="cannot be created"):
        atomic_save(blocker / "deeper" / "x.pt", lambda tmp: None)
    with pytest.raises(InvalidInput, match="it is a folder"):
        atomic_write_bytes(tmp_path, b"1")
    assert blocker.read_text() == "x"


def test_folder_lock_needs_no_fcntl(tmp_path):
    # Issue 13: files.py imported fcntl, so nothing ran on native Windows. Simulated here by hiding
    # fcntl before anything imports it (filelock then uses its portable lock).
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['fcntl'] = None\n"
        "from likeness.files import folder_lock\n"
        f"with folder_lock({str(tmp_path)!r}, 'test'):\n"
        "    print('locked')\n"
    )
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "locked"


def test_folder_lock_of_a_killed_process_is_released(tmp_path):
    import signal
    import subprocess
    import sys

    from likeness.errors import FailedPrecondition
    from likeness.files import folder_lock

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom likeness.files import folder_lock\n"
         f"with folder_lock({str(tmp_path)!r}, 'generation'):\n    print('held', flush=True)\n    time.sleep(120)\n"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FailedPrecondition, match="another generation is writing"):
            with folder_lock(tmp_path, "generation"):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(30)
    with folder_lock(tmp_path, "generation"):  # the kernel dropped the dead process's lock
        pass
