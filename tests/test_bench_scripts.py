"""The benchmarks in scripts/: their statistics, their side-process protocol, and smoke runs.

A skeptic's benchmark (issue 14) interleaves ours and the alternative, reports
the median and spread of pairs, keeps each side in its own process and names
the machine. The pure parts are checked exactly; each script is run once in
``--smoke`` mode (tiny sizes, 1 pair) to show it still runs end to end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

import bench_common  # noqa: E402


def test_spread_median_quartiles_and_range() -> None:
    s = bench_common.spread([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (s["n"], s["median"], s["min"], s["max"], s["q1"], s["q3"]) == (5, 3.0, 1.0, 5.0, 2.0, 4.0)
    one = bench_common.spread([2.5])
    assert one["median"] == one["q1"] == one["q3"] == 2.5
    with pytest.raises(ValueError):
        bench_common.spread([])


def test_pairs_summary_ratios_are_per_pair_not_of_medians() -> None:
    # Pair 1: alternative 2 s vs ours 1 s (2x); pair 2: 9 s vs 3 s (3x); pair 3: 4 s vs 4 s (1x).
    s = bench_common.pairs_summary([1.0, 3.0, 4.0], [2.0, 9.0, 4.0], work=12)
    assert s["ratio"]["median"] == 2.0 and s["ratio"]["min"] == 1.0 and s["ratio"]["max"] == 3.0
    assert s["ours_rate"]["median"] == 4.0  # 12 / 3 s
    assert s["alternative_rate"]["max"] == 6.0  # 12 / 2 s
    assert "note" in s, "fewer than 5 pairs must say it is a smoke check"
    assert "note" not in bench_common.pairs_summary([1.0] * 5, [2.0] * 5, work=1)
    with pytest.raises(ValueError, match="same number"):
        bench_common.pairs_summary([1.0], [1.0, 2.0], work=1)
    with pytest.raises(ValueError, match="no time"):
        bench_common.pairs_summary([0.0], [1.0], work=1)


def test_machine_names_cpu_torch_and_load() -> None:
    info = bench_common.machine("cpu")
    assert info["cpu_count"] == os.cpu_count() and info["cpu_model"]
    assert info["torch"] and len(info["load_average"]) == 3
    line = bench_common.machine_line(info)
    assert "CPUs" in line and "torch" in line and "load average" in line


def test_side_processes_interleave_in_order_and_report_failures(tmp_path: Path) -> None:
    """Two real side processes: runs alternate A B A B (one log file shows the order), noise on stdout is ignored."""
    log = tmp_path / "order.txt"
    script = tmp_path / "side.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO / 'scripts')!r})
        from bench_common import side_main
        name = sys.argv[1]
        def setup():
            print("a library printing to stdout")  # must not confuse the protocol
            def run(i):
                if name == "bad" and i == 1:
                    raise RuntimeError("boom")
                with open({str(log)!r}, "a") as fh:
                    fh.write(f"{{name}}{{i}} ")
                return {{"seconds": 0.01 * (i + 1), "name": name}}
            return run, {{"who": name}}
        raise SystemExit(side_main(setup))
    """))
    sides = [bench_common.SideProcess(n, [str(script), n]) for n in ("A", "B")]
    try:
        assert sides[0].ready["who"] == "A" and "setup_seconds" in sides[0].ready
        runs = bench_common.interleave(sides, 3)
    finally:
        for s in sides:
            s.close()
    assert log.read_text().split() == ["A0", "B0", "A1", "B1", "A2", "B2"]
    assert [r["seconds"] for r in runs["B"]] == [0.01, 0.02, 0.03]
    bad = bench_common.SideProcess("bad", [str(script), "bad"])
    try:
        bad.run(0)
        with pytest.raises(RuntimeError, match="boom"):
            bad.run(1)
    finally:
        bad.close()
    with pytest.raises(ValueError, match="pairs"):
        bench_common.interleave([], 0)


def test_side_that_fails_setup_is_reported(tmp_path: Path) -> None:
    script = tmp_path / "side.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO / 'scripts')!r})
        from bench_common import side_main
        def setup():
            raise FileNotFoundError("no model here")
        raise SystemExit(side_main(setup))
    """))
    with pytest.raises(RuntimeError, match="no model here"):
        bench_common.SideProcess("x", [str(script)])


def _smoke(cmd: list[str], timeout: int = 240) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, *cmd], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.strip().splitlines() if ln.startswith("{")][-1]
    return json.loads(line) if line.endswith("}") else json.loads(proc.stdout[proc.stdout.index("{"):])


def _check_result(res: dict, stage: str) -> None:
    assert res["stage"] == stage and res["pairs"] == 1 and res["smoke"] is True
    assert res["ratio"]["n"] == 1 and res["ours_rate"]["median"] > 0 and res["alternative_rate"]["median"] > 0
    assert res["machine"]["cpu_count"] and "note" in res
    assert all(v["ready"] for v in res["setup"].values())


@pytest.mark.slow
def test_bench_generate_smoke(tiny_models: Path) -> None:
    _check_result(_smoke(["scripts/bench_generate.py", "--smoke", "--json"]), "generate")


@pytest.mark.slow
def test_bench_train_smoke(tiny_models: Path) -> None:
    _check_result(_smoke(["scripts/bench_train.py", "--smoke", "--json"]), "train")


@pytest.mark.slow
def test_bench_curate_smoke(tiny_models: Path, realdata: Path) -> None:
    res = _smoke(["scripts/bench_curate.py", "--smoke", "--profile", "cpu-tiny"])
    _check_result(res, "curate")
    assert res["n_images"] == 25 and res["pool_counts"]["target"] == 20 and res["pool_counts"]["rear"] == 5


def test_curate_pool_is_labelled_one_character_gallery(tmp_path: Path, realdata: Path) -> None:
    from bench_curate import build_pool

    from likeness.generate.manifest import read_manifest

    labels = build_pool(realdata, 60, tmp_path / "pool")
    rows = read_manifest(tmp_path / "pool")
    assert len(rows) == len(labels) == 60 == len(list((tmp_path / "pool").glob("*.png")))
    assert {r.zoom for r in rows} == {"extreme closeup", "medium closeup", "closeup", "medium shot", "full body"}
    assert all(labels[r.id] == "rear" for r in rows if r.angle == "rear angle")
    face = [labels[r.id] for r in rows if r.angle != "rear angle"]
    assert face.count("target") > len(face) / 2, "the character must be the clear majority"
    # No two files are byte-identical (copies are shifted and scaled).
    blobs = {(tmp_path / "pool" / r.file).read_bytes() for r in rows}
    assert len(blobs) == len(rows)


def test_bench_all_rejects_unknown_stage() -> None:
    proc = subprocess.run([sys.executable, "scripts/bench_all.py", "--stages", "generate,paint"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "paint" in proc.stderr


def test_bench_all_table_marks_errors_and_spreads() -> None:
    from bench_all import table

    row = {"stage": "train", "unit": "steps/s", "pairs": 5, "alternative_name": "ref", "settings": "s",
           **bench_common.pairs_summary([1.0] * 5, [2.0, 2.0, 2.0, 3.0, 1.0], work=10)}
    text = table([row, {"stage": "curate", "error": "timed out after 5 s"}], markdown=True)
    assert "| train | 10 [10-10] steps/s | 5 [3.33-10] steps/s | 2 [1-3]x | 5 |" in text
    assert "| curate | error |" in text and "timed out" in text
