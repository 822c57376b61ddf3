#!/usr/bin/env python
"""Run the three stage benchmarks and print one table.

Each stage benchmark (scripts/bench_generate.py, bench_curate.py,
bench_train.py) runs our code and the obvious alternative in their own
processes, interleaved (A B A B ...), and reports the median and spread of
``--pairs`` pairs (scripts/bench_common.py). This script runs them one after
the other, collects their JSON, and prints the machine, its load before and
after, and one table: each side's throughput and the per-pair ratio as
median [min-max], and on CUDA the fraction of the physical limit for SD 1.5
generation (about 50.7 TFLOP per 512x512 image at 30 steps with CFG, 989
TFLOP/s dense fp16 on an H100/H200: ~51 ms per image).

    python scripts/bench_all.py                 # CPU: tiny models, real face pack, 5 pairs per stage
    python scripts/bench_all.py --smoke         # tiny sizes, 1 pair: checks that everything runs
    python scripts/bench_all.py --device cuda   # full-size SD 1.5 (random weights), buffalo_l if present
    python scripts/bench_all.py --markdown      # the README table, with the command and the machine
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

from bench_common import fmt_spread, load_average, machine, machine_line  # noqa: E402

STAGES = ("generate", "curate", "train")


def _run(cmd: list[str], timeout: int) -> tuple[str, str]:
    """(stdout, last error line) of one benchmark."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return "", f"timed out after {timeout} s"
    sys.stderr.write(proc.stderr)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        return "", lines[-1] if lines else f"exit {proc.returncode}"
    return proc.stdout, ""


def _json_tail(text: str) -> dict | None:
    """The last JSON document printed (one line, or an indented block at the end)."""
    text = text.strip()
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                break
    start = text.rfind("\n{")
    try:
        return json.loads(text[start + 1 :] if start >= 0 else text)
    except json.JSONDecodeError:
        return None


def stage_command(stage: str, args: argparse.Namespace) -> list[str]:
    """The command line bench_all runs for ``stage`` (printed with the table)."""
    cmd = [sys.executable, f"scripts/bench_{stage}.py", "--pairs", str(args.pairs)]
    if args.smoke:
        cmd.append("--smoke")
    if stage == "generate":
        cmd += ["--json", "--device", args.device] + (["--full-size"] if args.device == "cuda" else [])
    elif stage == "train":
        cmd += ["--json", "--device", args.device] + (["--full-size"] if args.device == "cuda" else [])
    elif stage == "curate":
        if args.curate_n:
            cmd += ["--n", str(args.curate_n)]
        if args.device == "cuda":
            cmd += ["--profile", "sd15"]
    return cmd


def run_stage(stage: str, args: argparse.Namespace) -> dict:
    out, err = _run(stage_command(stage, args), args.timeout)
    res = _json_tail(out) if out else None
    if not res:
        return {"stage": stage, "error": err or "no JSON result"}
    return res


def _bound(r: dict) -> str:
    """A stage's measured upper bound on its ratio, when its benchmark ran one (curate: the floor side)."""
    if "floor_ratio" not in r:
        return ""
    return f"; bound: {r['floor_name']} alone is {fmt_spread(r['floor_ratio'])}x the alternative"


def table(rows: list[dict], markdown: bool) -> str:
    head = ["stage", "ours", "alternative", "ratio ours/alt.", "pairs", "of physical limit", "alternative is", "settings"]
    lines = []
    for r in rows:
        if "error" in r:
            lines.append([r["stage"], "error", "", "", "", "", "", r["error"]])
            continue
        u = r["unit"]
        frac = f"{r['fraction_of_limit']:.1%}" if "fraction_of_limit" in r else "n/a"
        lines.append([r["stage"], f"{fmt_spread(r['ours_rate'])} {u}", f"{fmt_spread(r['alternative_rate'])} {u}",
                      f"{fmt_spread(r['ratio'])}x", str(r["pairs"]), frac, r["alternative_name"],
                      r["settings"] + _bound(r)])
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(line) + " |" for line in lines]
        return "\n".join(out)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*head)] + [fmt.format(*line) for line in lines])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--pairs", type=int, default=5, help="interleaved pairs per stage (5 or more for figures)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, 1 pair per stage: checks that everything runs")
    ap.add_argument("--curate-n", type=int, default=0, help="pool size for the curation benchmark (default: its own, 400)")
    ap.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset of " + ",".join(STAGES))
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per stage benchmark")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--json", default="", help="also write the machine and rows here")
    args = ap.parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise SystemExit(f"error: unknown stage(s) {unknown}; choose from {', '.join(STAGES)}")
    if args.smoke and "--pairs" not in " ".join(sys.argv[1:] if argv is None else argv):
        args.pairs = 1
    info = machine(args.device)
    load_before = load_average()
    rows = []
    for name in stages:
        print(f"running {name} benchmark: {' '.join(stage_command(name, args)[1:])}", file=sys.stderr, flush=True)
        rows.append(run_stage(name, args))
    load_after = load_average()
    when = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    command = "python scripts/bench_all.py " + " ".join(sys.argv[1:] if argv is None else argv)
    header = [f"One run of `{command.strip()}` on {when}.",
              machine_line(info) + f"; load before {load_before}, after {load_after}.",
              "Each cell: median [min-max] over the pairs; each side in its own process, interleaved."]
    if args.smoke or args.pairs < 5:
        header.append(f"{args.pairs} pair(s) per stage{' at smoke sizes' if args.smoke else ''}: checks that the "
                      "benchmarks run; NOT a performance figure.")
    sep = "\n\n" if args.markdown else "\n"
    print(sep.join(header))
    print()
    print(table(rows, args.markdown))
    if args.json:
        Path(args.json).write_text(json.dumps({"command": command, "when": when, "machine": info,
                                               "load_before": load_before, "load_after": load_after, "rows": rows},
                                              indent=2) + "\n", encoding="utf-8")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
