#!/usr/bin/env python
"""Run the three stage benchmarks and print one table.

Each stage benchmark runs our code and the obvious alternative in one run
(scripts/bench_generate.py, bench_curate.py, bench_train.py); this script runs
them as subprocesses, collects their JSON, and prints: our throughput, the
alternative's, the ratio, and on CUDA the fraction of the physical limit for
SD 1.5 generation (about 50.7 TFLOP per 512x512 image at 30 steps with CFG,
989 TFLOP/s dense fp16 on an H100: ~51 ms per image).

    python scripts/bench_all.py                 # CPU: tiny models, real face pack
    python scripts/bench_all.py --device cuda   # full-size SD 1.5 (random weights), buffalo_l if present
    python scripts/bench_all.py --markdown      # the README table
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# SD 1.5 UNet at 512x512 (64x64 latents): ~0.845 TFLOP per forward; 30 steps x 2 (CFG),
# plus text encoder and VAE decode: ~50.7 TFLOP per image (the figure).
SD15_TFLOP_PER_IMAGE = 50.7
H100_DENSE_FP16_TFLOPS = 989.0


def _run(cmd: list[str], timeout: int) -> str:
    """The benchmark's stdout, or its last error line (which then parses as no JSON)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout} s"
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        return lines[-1] if lines else f"exit {proc.returncode}"
    return proc.stdout


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


def bench_generate(device: str, timeout: int) -> dict:
    cmd = [sys.executable, "scripts/bench_generate.py", "--json", "--device", device]
    if device == "cuda":
        cmd.append("--full-size")
    out = _run(cmd, timeout)
    res = _json_tail(out)
    if not res:
        return {"stage": "generate", "error": out[-300:]}
    row = {"stage": "generate", "unit": "images/s", "ours": res["likeness_images_per_s"],
           "alternative": res["plain_images_per_s"], "alternative_name": "plain diffusers loop",
           "settings": f"{res['model']}, {res['sampler']}, {res['steps']} steps, {res['size']}px, batch {res['batch_size']}",
           "device": res["device"]}
    if device == "cuda" and res.get("size") == 512 and res.get("steps") == 30:
        limit = H100_DENSE_FP16_TFLOPS / SD15_TFLOP_PER_IMAGE  # images/s at 100% of peak
        row["fraction_of_limit"] = res["likeness_images_per_s"] / limit
    return row


def bench_curate(device: str, timeout: int, n: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out_json = Path(tmp) / "curate.json"
        cmd = [sys.executable, "scripts/bench_curate.py", "--n", str(n), "--json", str(out_json)]
        if device == "cuda":
            cmd += ["--profile", "sd15"]
        out = _run(cmd, timeout)
        res = json.loads(out_json.read_text()) if out_json.exists() else _json_tail(out)
    if not res:
        return {"stage": "curate", "error": out[-300:]}
    return {"stage": "curate", "unit": "images/s", "ours": res["ours"]["images_per_s"],
            "alternative": res["naive"]["images_per_s"],
            "alternative_name": "FaceAnalysis.get per image + sklearn clustering",
            "settings": f"{res['n_images']} real photos, k={res['k']}, profile {res['profile']}",
            "device": "cuda" if res.get("gpu_faces") else "cpu"}


def bench_train(device: str, timeout: int) -> dict:
    cmd = [sys.executable, "scripts/bench_train.py", "--json", "--device", device]
    if device == "cuda":
        cmd.append("--full-size")
    out = _run(cmd, timeout)
    res = _json_tail(out)
    if not res:
        return {"stage": "train", "error": out[-300:]}
    return {"stage": "train", "unit": "steps/s", "ours": res["ours_steps_per_s"],
            "alternative": res["reference_steps_per_s"],
            "alternative_name": "diffusers textual_inversion-style loop (VAE encode every step)",
            "settings": f"model: {res['model']}; batch {res['batch_size']}; {res['resolution']}x{res['resolution']}",
            "device": res["device"]}


def table(rows: list[dict], markdown: bool) -> str:
    head = ["stage", "ours", "alternative", "ratio", "of physical limit", "alternative is", "settings"]
    lines = []
    for r in rows:
        if "error" in r:
            lines.append([r["stage"], "error", "", "", "", "", r["error"]])
            continue
        ratio = r["ours"] / r["alternative"] if r.get("alternative") else float("nan")
        frac = f"{r['fraction_of_limit']:.1%}" if "fraction_of_limit" in r else "n/a"
        lines.append([r["stage"], f"{r['ours']:.3g} {r['unit']}", f"{r['alternative']:.3g} {r['unit']}",
                      f"{ratio:.2f}x", frac, r["alternative_name"], r["settings"]])
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
    ap.add_argument("--curate-n", type=int, default=400, help="pool size for the curation benchmark")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per stage benchmark")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--json", default="", help="also write the rows here")
    args = ap.parse_args(argv)
    rows = []
    for name, fn in (("generate", lambda: bench_generate(args.device, args.timeout)),
                     ("curate", lambda: bench_curate(args.device, args.timeout, args.curate_n)),
                     ("train", lambda: bench_train(args.device, args.timeout))):
        print(f"running {name} benchmark ...", file=sys.stderr, flush=True)
        rows.append(fn())
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; device {args.device}")
    print(table(rows, args.markdown))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
