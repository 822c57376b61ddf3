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
    # The bound ran beside both sides: its own process, interleaved, a rate and a ratio to naive.
    assert set(res["setup"]) == {"naive", "ours", "floor"}
    assert res["floor_rate"]["median"] > 0 and res["floor_ratio"]["n"] == 1 and len(res["floor_seconds"]) == 1


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
    # A stage that measured a bound (curate's floor side) names it beside its settings.
    bound = {**row, "stage": "curate", "floor_name": "decode + faces", "floor_ratio": bench_common.spread([1.5] * 5)}
    assert "| s; bound: decode + faces alone is 1.5 [1.5-1.5]x the alternative |" in table([bound], markdown=True)
    assert "bound" not in table([row], markdown=True)


# ---------------------------------------------------------------- scripts/bench_gpu.py


def test_physical_limit_figure_is_what_torch_counts_for_the_sd15_configs() -> None:
    """50.7 TFLOP per image = 60 UNet calls (30 steps x CFG) + one VAE decode, counted on the meta device."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    import bench_gpu
    from likeness.backends.sd15_config import UNET, VAE

    with torch.device("meta"):
        unet, vae = UNet2DConditionModel(**UNET), AutoencoderKL(**VAE)
        x = torch.randn(1, 4, 64, 64)
        with FlopCounterMode(display=False) as fc:
            unet(x, torch.tensor([500]), torch.randn(1, 77, 768))
        unet_gflop = fc.get_total_flops() / 1e9
        with FlopCounterMode(display=False) as fc:
            vae.decode(x)
        vae_tflop = fc.get_total_flops() / 1e12
    assert unet_gflop == pytest.approx(bench_gpu.UNET_GFLOP_PER_CALL, rel=0.005)
    assert vae_tflop == pytest.approx(bench_gpu.VAE_DECODE_TFLOP, rel=0.01)
    assert 60 * unet_gflop / 1e3 + vae_tflop == pytest.approx(bench_gpu.SD15_TFLOP_PER_IMAGE, rel=0.005)


def test_iresnet50_is_buffalo_l_sized() -> None:
    import torch

    import bench_gpu

    with torch.device("meta"):
        r50 = bench_gpu.IResNet()
    # insightface's w600k_r50 (buffalo_l recognition): 43.6 M parameters.
    assert sum(p.numel() for p in r50.parameters()) == 43_590_848
    tiny = bench_gpu.IResNet((1, 1, 1, 1), width=8, dim=16).eval()
    assert tiny(torch.randn(2, 3, 112, 112)).shape == (2, 16)


def _run_doc(tmp_path: Path, budget: float = 100.0):
    import argparse

    import bench_gpu

    out = tmp_path / "gpu.json"
    args = argparse.Namespace(budget=budget, smoke=True, device="cpu")
    return bench_gpu.Run(out, args), out


def test_phase_time_box_keeps_partial_results_and_later_phases_run(tmp_path: Path) -> None:
    import time

    import bench_gpu

    run, out = _run_doc(tmp_path)

    def slow(res, deadline):
        res["first"] = 1
        time.sleep(5)  # past the 1 s box
        res["never"] = 2

    def broken(res, deadline):
        res["before"] = "x"
        raise ValueError("bad shape")

    t0 = time.monotonic()
    assert bench_gpu.run_phase(run, "slow", slow, 1.0)["status"] == "timeout"
    assert time.monotonic() - t0 < 3, "the time box must interrupt the phase"
    assert bench_gpu.run_phase(run, "broken", broken, 5.0)["status"] == "error"
    assert bench_gpu.run_phase(run, "fine", lambda r, d: r.__setitem__("v", 3), 5.0)["status"] == "ok"
    doc = json.loads(out.read_text())
    by = {e["phase"]: e for e in doc["phases"]}
    assert by["slow"]["result"] == {"first": 1}
    assert by["broken"]["result"] == {"before": "x"} and "bad shape" in by["broken"]["error"]
    assert by["fine"]["result"] == {"v": 3}


def test_phase_skipped_when_budget_is_spent(tmp_path: Path) -> None:
    import bench_gpu

    run, out = _run_doc(tmp_path, budget=2.0)
    entry = bench_gpu.run_phase(run, "late", lambda r, d: r.__setitem__("v", 1), 60.0)
    assert entry["status"] == "skipped" and "budget" in entry["reason"]
    assert json.loads(out.read_text())["phases"][0]["status"] == "skipped"


def test_stock_flags_are_torch_defaults_and_restored() -> None:
    import torch

    import bench_gpu

    assert bench_gpu.STOCK_FLAGS["cudnn.benchmark"] is False
    assert bench_gpu.STOCK_FLAGS["cuda.matmul.allow_tf32"] is False
    before = bench_gpu.get_flags()
    try:
        bench_gpu.set_flags(bench_gpu.OURS_FLAGS)
        assert torch.backends.cudnn.benchmark is True and torch.backends.cuda.matmul.allow_tf32 is True
        bench_gpu.set_flags(bench_gpu.STOCK_FLAGS)
        assert bench_gpu.get_flags() == bench_gpu.STOCK_FLAGS
    finally:
        bench_gpu.set_flags(before)


@pytest.mark.slow
def test_bench_gpu_smoke_runs_every_phase_on_cpu(tiny_models: Path, tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, "scripts/bench_gpu.py", "--smoke", "--out", str(out)], cwd=REPO,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300)
    doc = json.loads(out.read_text())
    by = {e["phase"]: e for e in doc["phases"]}
    assert proc.returncode == 0, proc.stderr[-3000:] + json.dumps({k: v.get("error") for k, v in by.items()})
    import bench_gpu

    assert list(by) == list(bench_gpu.PHASES) and all(e["status"] == "ok" for e in by.values())
    assert by["machine"]["result"]["cpu_count"] and by["matmul"]["result"]["float16"]["tflops_median"] >= 0
    e2e = by["e2e"]["result"]
    assert e2e["ours_vs_stock"]["pairs"] == 1 and e2e["stock_load_seconds"] > 0
    assert e2e["ours_flags"] and by["train"]["result"]["ours_vs_reference"]["ratio"]["median"] > 0
    assert by["unet"]["result"]["gflop_per_sample_counted"] > 0 and "channels_last_b1" in by["vae"]["result"]
    assert by["recognition"]["result"]["nchw_b2"]["images_per_s"] > 0 and by["clip"]["result"]["b2"]["images_per_s"] > 0
    assert by["compile"]["result"]["unet_compile_seconds"] >= 0 and doc["summary"]


def test_quality_bench_oversampled_pools_are_the_one_pools_with_k_below_the_targets(tmp_path: Path,
                                                                                     realdata: Path) -> None:
    """bench_curate_quality's "oversampled" family: the "one" pool file for file, scored at K = targets - 1."""
    import random

    import numpy as np

    from bench_common import lfw_dir
    from bench_curate_quality import build_pool, main, pool_family, score

    root = lfw_dir(realdata)
    names = ["George_Clooney", "Halle_Berry", "Charles_Moose", "Andy_Roddick"]
    rng = np.random.default_rng(0)
    centroids = {n: v / np.linalg.norm(v) for n, v in zip(names, rng.normal(size=(len(names), 8)))}
    singles = sorted(p.name for p in root.iterdir() if p.is_dir())[:40]
    pools = {}
    for family in ("one", "oversampled"):
        r = random.Random(f"0:{pool_family(family)}:George_Clooney")
        pools[family] = build_pool(root, "George_Clooney", family, centroids, singles, tmp_path / family, r)
    (one, k_one), (over, k_over) = pools["one"], pools["oversampled"]
    assert k_one == k_over == len(list((root / "George_Clooney").glob("*.jpg")))
    assert [(i.id, i.label, i.zoom) for i in one] == [(i.id, i.label, i.zoom) for i in over]
    for i in one:
        assert (tmp_path / "one" / f"{i.id}.png").read_bytes() == (tmp_path / "oversampled" / f"{i.id}.png").read_bytes()
    # Scored at K - 1: every target but one kept fills K with full precision and recall.
    targets = [i.id for i in one if i.label == "target"]
    s = score(targets[:-1], one, k_one - 1)
    assert (s["precision"], s["recall"], s["k_filled"]) == (1.0, 1.0, 1.0)
    short = score(targets[:-2], one, k_one - 1)
    assert short["precision"] == 1.0 and short["k_filled"] == short["recall"] == (k_one - 2) / (k_one - 1)
    # A kept copy of a kept target is a mistake; a copy kept instead of its original is not.
    dup = next(i for i in one if i.label == "dup")
    assert dup.source in targets[:-1]
    assert score(targets[:-1] + [dup.id], one, k_one)["precision"] == (k_one - 1) / k_one
    assert score([dup.id], one, 1)["precision"] == 1.0
    with pytest.raises(SystemExit) as err:
        main(["--families", "one,twins"])
    assert err.value.code == 2
