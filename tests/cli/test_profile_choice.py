"""A command that picks its model profile itself says so: cpu-tiny is never a silent fallback.

Issue 13: `likeness generate` without --profile on a machine without a GPU fell back to
cpu-tiny (tiny random weights: the images are noise) without a word.
"""

from __future__ import annotations

import json

import pytest

from likeness.cli.main import main


@pytest.fixture(autouse=True)
def _no_gpu_and_loud_again():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the automatic choice is a real profile here")
    yield
    from likeness.cli.output import set_quiet

    set_quiet(False)


def _run(capsys, argv):
    rc = main(argv)
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    return rc, out.out, out.err


def test_generate_warns_when_it_picks_cpu_tiny_also_with_q(tmp_path, tiny_models, capsys):
    spec = tmp_path / "s.toml"
    spec.write_text('name = "Emily"\ntoken = "3m1ly"\nper_cell = 1\n')  # names no profile
    small = ["--zooms", "closeup", "--angles", "front shot", "--steps", "1", "--width", "64", "--height", "64"]
    rc, out, err = _run(capsys, ["generate", str(spec), "--out", str(tmp_path / "g"), *small, "-q"])
    assert rc == 0 and json.loads(out)["planned"] == 1
    # -q silences progress, not the news that the pictures will be noise.
    (line,) = err.strip().splitlines()
    assert line.startswith("warning: using profile 'cpu-tiny'") and "random weights" in line
    assert "no CUDA GPU found" in line and "--profile" in line
    # Named by the user: nothing was chosen for them, nothing to say.
    rc, _, err = _run(capsys, ["generate", str(spec), "--out", str(tmp_path / "g2"), *small, "--profile",
                               "cpu-tiny", "-q"])
    assert rc == 0 and err == ""


def test_curate_says_which_profile_it_picked(tmp_path, tiny_models, capsys):
    # curate resolved its profile inside curate_with_profile, without a word; the gallery here does
    # not exist, so the command fails after choosing (the choice is said before any image is read).
    missing = tmp_path / "no-gallery"
    rc, _, err = _run(capsys, ["curate", str(missing), "--out", str(tmp_path / "c"), "-q"])
    assert rc != 0
    lines = err.strip().splitlines()
    assert lines[0].startswith("warning: using profile 'cpu-tiny' because no CUDA GPU found: its face pack is real")
    assert "random weights" in lines[0] and lines[-1].startswith("error: ")
    # --no-clip uses only the face pack (real weights in cpu-tiny too): said, so silent with -q.
    rc, _, err = _run(capsys, ["curate", str(missing), "--out", str(tmp_path / "c"), "--no-clip", "-q"])
    assert rc != 0 and not any(x.startswith("warning:") for x in err.splitlines()) and err.startswith("error: ")
    rc, _, err = _run(capsys, ["curate", str(missing), "--out", str(tmp_path / "c"), "--no-clip"])
    assert err.startswith("using profile 'cpu-tiny' for its face pack (no CUDA GPU found)")


def test_the_automatic_choice_carries_its_reason_apart_from_the_sentence():
    from likeness.profiles import resolve_profile

    said = []
    assert resolve_profile(None, "", say=said.append).name == "cpu-tiny"
    assert said[0].startswith("using profile 'cpu-tiny'") and said[0].endswith("because " + said[0].reason)
    assert said[0].reason == "no CUDA GPU found"
    said.clear()
    resolve_profile("cpu-tiny", "", say=said.append)
    assert said == []  # named: nothing was chosen, nothing is said


def test_curate_says_when_the_set_is_short_of_k(tmp_path, jolie_photos, tiny_models, capsys):
    """9 photos of one person and 2 others, K=20: the set is one person, only smaller. Curation never
    fills K with a refused face, so it says so (also with -q) and still exits 0."""
    rc, out, err = _run(capsys, ["curate", str(jolie_photos), "--out", str(tmp_path / "c"), "--k", "20",
                                 "--no-clip", "--profile", "cpu-tiny", "-q"])
    got = json.loads(out)
    kept = len(got["selected"])
    assert rc == 0 and 0 < kept < 20 and not got["warnings"]
    short = got["summary"]["short_of_k"]
    assert (short["kept"], short["k"], short["missing"]) == (kept, 20, 20 - kept)
    (line,) = [x for x in err.splitlines() if "short" in x]
    assert line.startswith(f"likeness curate: note: kept {kept} of K=20: {20 - kept} short")
    assert "identity_outlier" in line and f"--k {kept}" in line
    # K filled: nothing to say.
    rc, out, err = _run(capsys, ["curate", str(jolie_photos), "--out", str(tmp_path / "c2"), "--k", "3",
                                 "--no-clip", "--profile", "cpu-tiny", "-q"])
    assert rc == 0 and json.loads(out)["summary"]["short_of_k"] is None and "short" not in err
