"""`-q` on every command (issue 13): progress and messages off, the JSON result and errors kept.

The option is one shared definition (likeness.cli.output.add_quiet_option) that build_parser
puts on every parser; the first test walks the parser, so a command added without it fails.
The others run real commands with -q (tiny models, real photos) and read stdout and stderr.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from likeness.cli.main import build_parser, iter_parsers, main

CLI = Path(__file__).resolve().parents[2] / "service" / "likeness" / "cli"


def _leaves(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """prog name -> parser of every command that has no subcommands (what a user runs)."""
    return {p.prog: p for p in iter_parsers(parser)
            if not any(isinstance(a, argparse._SubParsersAction) for a in p._actions)}  # noqa: SLF001


def test_every_command_has_the_one_quiet_option():
    parser = build_parser()
    leaves = _leaves(parser)
    # The walk reaches the nested ones (faces compare) and every top-level command.
    assert {"likeness faces compare", "likeness faces calibrate", "likeness builds", "likeness serve",
            "likeness nightly", "likeness train", "likeness import"} <= set(leaves)
    assert len(leaves) >= 17
    for prog, p in [("likeness", parser), *leaves.items()]:
        action = p._option_string_actions.get("-q")  # noqa: SLF001
        assert action is not None, f"{prog} has no -q"
        assert action is p._option_string_actions["--quiet"] and action.dest == "quiet", prog  # noqa: SLF001
        assert action.default is argparse.SUPPRESS, prog  # the shared definition, not a command's own
    # Before or after the command name, the same thing.
    assert parser.parse_args(["-q", "profiles"]).quiet is True
    assert parser.parse_args(["profiles", "-q"]).quiet is True
    assert parser.parse_args(["faces", "compare", "a", "b", "-q"]).quiet is True
    assert getattr(parser.parse_args(["profiles"]), "quiet", False) is False


def test_commands_speak_only_through_the_output_module():
    # A command that made its own tqdm bar or printed to stderr would ignore -q.
    for path in sorted((CLI / "commands").glob("*.py")):
        text = path.read_text(encoding="utf-8")
        for banned in ("TqdmProgress(", "print(", "sys.stderr"):
            assert banned not in text, f"{path.name} uses {banned}; use likeness.cli.output (progress_bar, say, warn)"


def _run(capsys, argv):
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(autouse=True)
def _loud_again():
    yield
    from likeness.cli.output import set_quiet

    set_quiet(False)


def test_quiet_commands_print_only_their_json(tmp_path, tiny_models, capsys):
    spec = tmp_path / "s.toml"
    spec.write_text('name = "Emily"\ntoken = "3m1ly"\nper_cell = 1\n')
    for argv in (["profiles"], ["prompt", "a (red:1.2) hat"], ["spec", "check", str(spec)],
                 ["generate", str(spec), "--out", str(tmp_path / "g"), "--profile", "cpu-tiny", "--zooms", "closeup",
                  "--angles", "front shot", "--steps", "1", "--width", "64", "--height", "64"]):
        rc, out, err = _run(capsys, [*argv, "-q"])
        assert rc == 0 and json.loads(out) and err == "", (argv, err)
    # Without -q the same generate run speaks (its summary line), so the silence above is -q's doing.
    rc, out, err = _run(capsys, ["generate", str(spec), "--out", str(tmp_path / "g"), "--profile", "cpu-tiny",
                                 "--zooms", "closeup", "--angles", "front shot", "--steps", "1", "--width", "64",
                                 "--height", "64"])
    assert rc == 0 and "images planned" in err
    # import: a progress bar and a summary line without -q, nothing with it.
    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(src / "a.png")
    rc, out, err = _run(capsys, ["import", str(src), "--out", str(tmp_path / "i1")])
    assert rc == 0 and "imported 1 images" in err
    rc, out, err = _run(capsys, ["import", str(src), "--out", str(tmp_path / "i2"), "-q"])
    assert rc == 0 and json.loads(out)["imported"] == 1 and err == ""


def test_quiet_keeps_errors_and_warnings(tmp_path, tiny_models, face_pack, realdata, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LIKENESS_DATA", raising=False)
    rc, out, err = _run(capsys, ["builds", "show", "b-x", "-q"])
    assert rc == 3 and out == "" and err.startswith("error: ") and "holds no builds" in err
    # faces compare --pairs: every pair on stdout, the incomplete answer on stderr and in the status.
    f = realdata / "faces"
    pairs = tmp_path / "pairs.csv"
    with open(pairs, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["a", "b", "same"])
        w.writerow([f / "Jeff_Bezos/deepface_img20.jpg", f / "Jeff_Bezos/deepface_img21.jpg", "yes"])
        w.writerow([f / "_negative_no_face/skimage_rocket.jpg", f / "Jeff_Bezos/deepface_img21.jpg", "no"])
    rc, out, err = _run(capsys, ["faces", "compare", "--pairs", str(pairs), "--profile", "cpu-tiny", "-q"])
    lines = [json.loads(x) for x in out.strip().splitlines()]
    assert rc == 1 and len(lines) == 2
    assert lines[0]["correct"] is True and lines[1]["correct"] is None and "no face" in lines[1]["error"]
    assert err.strip().startswith("error: 2 pairs") and "1 could not be compared" in err
    # Every pair compared: exit 0, and with -q nothing on stderr.
    with open(pairs, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["a", "b", "same"])
        w.writerow([f / "Jeff_Bezos/deepface_img20.jpg", f / "Jeff_Bezos/deepface_img21.jpg", "yes"])
    rc, out, err = _run(capsys, ["faces", "compare", "--pairs", str(pairs), "--profile", "cpu-tiny", "-q"])
    assert rc == 0 and json.loads(out)["correct"] is True and err == ""


def test_training_on_uncaptioned_images_warns_also_when_quiet(tmp_path, tiny_models, capsys):
    data = tmp_path / "ds"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(data / f"img{i}.png")
    (data / "img0.txt").write_text("3m1ly, gray background\n")
    spec = tmp_path / "e.toml"
    spec.write_text('name = "Emily"\ntoken = "3m1ly"\nprofile = "cpu-tiny"\n')
    args = ["train", str(data), "--spec", str(spec), "--steps", "1", "--resolution", "64", "--batch-size", "1",
            "--no-validate", "-q"]
    rc, out, err = _run(capsys, [*args, "--out", str(tmp_path / "T")])
    assert rc == 0 and json.loads(out)["best_step"] == 1
    assert err.startswith("warning: 2 of 3 images") and "likeness caption" in err
    assert len(err.strip().splitlines()) == 1  # the warning only: no bar, no "training ..." line
    for i in (1, 2):
        (data / f"img{i}.txt").write_text("3m1ly, white background\n")
    rc, out, err = _run(capsys, [*args, "--out", str(tmp_path / "T2")])
    assert rc == 0 and err == ""
