"""The CLI as a new user meets it: against a server, and the commands issue 13 found rough.

Builds run on a real Runtime + gRPC server with stand-in stages (plumbing only, as in
tests/serve/test_server.py); training and face comparison use the tiny models and real photos.
"""

from __future__ import annotations

import csv
import json
import socket
from pathlib import Path

import pytest

from likeness.cli.main import main
from likeness.serve.auth import AuthConfig
from likeness.serve.runtime import Runtime
from likeness.serve.servicer import create_server

TOKEN = "cli-s3cret"


@pytest.fixture()
def server(tmp_path, tiny_models, stand_in_stages, monkeypatch):
    monkeypatch.delenv("LIKENESS_TOKEN", raising=False)
    rt = Runtime(tmp_path / "served", devices=["cpu"], default_profile="cpu-tiny", stages=stand_in_stages())
    srv, port, _ = create_server("127.0.0.1:0", rt, auth=AuthConfig(token=TOKEN))
    srv.start()
    rt.start(load_models=False)
    yield rt, f"127.0.0.1:{port}"
    srv.stop(0)
    rt.stop()


def _run(capsys, argv):
    rc = main(argv)
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    return rc, out.out, out.err


def _spec(tmp_path: Path, token: str = "3m1ly") -> Path:
    path = tmp_path / f"{token}.toml"
    path.write_text(f'name = "Emily"\ntoken = "{token}"\nper_cell = 1\n')
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_version(capsys):
    from likeness import __version__

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"likeness {__version__}"


def test_server_errors_are_one_line_with_the_status_and_a_nonzero_exit(server, tmp_path, capsys):
    # Issue 13: each of these was a raw Python traceback.
    _, addr = server
    rc, _, err = _run(capsys, ["builds", "list", "--server", addr])  # no token
    assert rc == 8 and err.startswith("error: UNAUTHENTICATED: ")
    rc, _, err = _run(capsys, ["builds", "list", "--server", f"127.0.0.1:{_free_port()}"])  # nobody there
    assert rc == 1 and err.startswith("error: UNAVAILABLE: ") and "likeness serve" in err
    rc, _, err = _run(capsys, ["builds", "show", "b-nope", "--server", addr, "--token", TOKEN])
    assert rc == 3 and err.startswith("error: NOT_FOUND: ")
    rc, _, err = _run(capsys, ["build", str(_spec(tmp_path)), "--server", addr, "--token", TOKEN,
                               "--profile", "no-such-profile", "--detach"])
    assert rc == 2 and err.startswith("error: INVALID_ARGUMENT: ") and "cpu-tiny" in err
    assert len(err.strip().splitlines()) == 1


def test_builds_show_has_one_shape_embedded_and_remote_and_list_is_compact(server, tmp_path, capsys):
    rt, addr = server
    remote = ["--server", addr, "--token", TOKEN]
    rc, out, _ = _run(capsys, ["build", str(_spec(tmp_path)), *remote, "--no-progress"])
    assert rc == 0
    build_id = json.loads(out)["id"]
    _, shown_remote, _ = _run(capsys, ["builds", "show", build_id, *remote])
    # The same build read embedded from the server's own data folder: the same document.
    _, shown_local, _ = _run(capsys, ["builds", "show", build_id, "--data", str(rt.store.data_dir)])
    a, b = json.loads(shown_remote), json.loads(shown_local)
    assert a == b
    assert isinstance(a["last_event"], int) and a["last_event"] > 0 and "create_time" in a and "created_at" not in a
    assert a["state"] == "succeeded" and a["spec"]["token"] == "3m1ly"
    # `builds list`: one line per build, the fields that tell builds apart.
    _run(capsys, ["build", str(_spec(tmp_path)), *remote, "--no-progress"])
    for argv in (["builds", "list", *remote], ["builds", "list", "--data", str(rt.store.data_dir)]):
        _, listed, _ = _run(capsys, argv)
        lines = listed.strip().splitlines()
        assert len(lines) == 2 + 2 and lines[0] == "[" and lines[-1] == "]"
        rows = json.loads(listed)
        assert {r["state"] for r in rows} == {"succeeded"} and "spec" not in rows[0] and "stages" not in rows[0]


def test_builds_list_where_nothing_ran_makes_no_data_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LIKENESS_DATA", raising=False)
    rc, out, _ = _run(capsys, ["builds", "list"])
    assert rc == 0 and json.loads(out) == []
    rc, _, err = _run(capsys, ["builds", "show", "b-x"])
    assert rc == 3 and "holds no builds" in err
    assert list(tmp_path.iterdir()) == []


def test_generate_with_a_gpu_profile_on_a_cpu_refuses_before_writing_a_plan(tmp_path, tiny_models, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: sd15 may run here")
    out = tmp_path / "g"
    rc, _, err = _run(capsys, ["generate", str(_spec(tmp_path)), "--out", str(out), "--profile", "sd15", "-q"])
    assert rc == 6 and "needs a CUDA GPU" in err and "--profile cpu-tiny" in err
    assert not (out / "plan.json").exists()
    # The retry the message suggests is not refused as "planned with other settings".
    rc, _, _ = _run(capsys, ["generate", str(_spec(tmp_path)), "--out", str(out), "--profile", "cpu-tiny",
                             "--per-cell", "1", "--zooms", "closeup", "--angles", "front shot", "--steps", "1",
                             "--width", "64", "--height", "64", "-q"])
    assert rc == 0 and (out / "plan.json").is_file()


def test_train_writes_the_chosen_embedding_at_the_top_of_out(tmp_path, tiny_models, capsys):
    import numpy as np
    from PIL import Image

    from likeness.embeddings import load_embedding

    data = tmp_path / "ds"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(data / f"img{i}.png")
        (data / f"img{i}.txt").write_text("3m1ly, gray background\n")
    spec = tmp_path / "e.toml"
    spec.write_text('name = "Emily"\ntoken = "3m1ly"\nprofile = "cpu-tiny"\n')
    out = tmp_path / "T"
    rc, stdout, err = _run(capsys, ["train", str(data), "--spec", str(spec), "--steps", "2", "--out", str(out),
                                    "--resolution", "64", "--batch-size", "1", "--no-validate"])
    assert rc == 0
    result = json.loads(stdout)
    top = out / "3m1ly.safetensors"
    assert result["embedding"] == str(top) and top.is_file() and str(top) in err
    chosen = Path(result["checkpoint_embedding"])
    assert chosen.parent.name == f"step-{result['best_step']}" and top.read_bytes() == chosen.read_bytes()
    assert load_embedding(top).token == "3m1ly"


def test_faces_compare_pairs_counts_a_missing_file_as_an_error(tmp_path, face_pack, realdata, capsys):
    # Issue 13: a missing file with label "different people" was counted as a correct answer.
    f = realdata / "faces"
    pairs = tmp_path / "pairs.csv"
    with open(pairs, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["a", "b", "same"])
        w.writerow([f / "Jeff_Bezos/deepface_img20.jpg", f / "Elon_Musk/deepface_img18.jpg", "no"])
        w.writerow(["missing.jpg", f / "Elon_Musk/deepface_img18.jpg", "no"])
    rc, out, err = _run(capsys, ["faces", "compare", "--pairs", str(pairs), "--profile", "cpu-tiny"])
    # Every pair is listed, and the run exits non-zero: its answer is incomplete (it exited 0).
    assert rc == 1
    lines = [json.loads(x) for x in out.strip().splitlines()]
    assert len(lines) == 2 and lines[0]["correct"] is True
    assert lines[1]["correct"] is None and "not found" in lines[1]["error"]
    assert "0 disagree" in err and "1 could not be compared" in err
