"""What every benchmark in scripts/ shares: interleaved pairs, robust summaries, the machine.

A skeptic's rules (issue 14), in one place:

* **Interleaved pairs**: ours and the alternative run A B A B ...; a shared
  machine's load then hits both sides alike, and each pair gives one ratio.
* **Median and spread** of >= 5 pairs (``--pairs``; smoke runs use 1-2): the
  median ratio, and min/max and the quartiles, of the per-pair ratios and of
  each side's rate -- never the best run.
* **The stock side stays stock**: each side runs in its **own process**
  (:class:`SideProcess`), so nothing one side sets process-wide (cuDNN
  autotuning, TF32, thread counts, onnxruntime or OpenCV settings) reaches the
  other; both processes are started before the first pair and take turns, so
  only one computes at a time.
* **The machine and its load** are printed beside every result (:func:`machine`).

Protocol between a benchmark and its side processes: the child prints
``@@bench {json}`` lines on stdout (anything else a library prints there is
ignored): first ``{"ready": true, ...setup facts}``, then one
``{"seconds": s, ...}`` per ``run`` line it reads on stdin; ``quit`` ends it.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

REPO = Path(__file__).resolve().parent.parent
MARK = "@@bench "
# Fewer pairs than this and the summary says so: a median of 1-2 pairs is a smoke check, not a figure.
MIN_PAIRS_FOR_CLAIMS = 5


# ---------------------------------------------------------------- the machine


def lfw_dir(realdata: Path) -> Path:
    """LFW devtrain's image folder in the shared real data; exits with how to point at it when absent."""
    root = realdata / "lfw_view1_devtrain" / "lfw-deepfunneled"
    if not root.is_dir():
        raise SystemExit(f"LFW devtrain images not found at {root}; set LIKENESS_REALDATA to the shared realdata folder")
    return root


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not on Linux
        return []


def machine(device: str = "cpu") -> dict[str, Any]:
    """CPU model and count, memory, load average, Python, torch (+ CUDA build), accelerator name."""
    info: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": _mem_gib(),
        "load_average": load_average(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_cuda"] = torch.version.cuda
        info["torch_threads"] = torch.get_num_threads()
        if device.startswith("cuda") and torch.cuda.is_available():
            idx = torch.device(device).index or 0
            props = torch.cuda.get_device_properties(idx)
            info["device"] = torch.cuda.get_device_name(idx)
            info["device_memory_gib"] = round(props.total_memory / 2**30, 1)
            info["device_capability"] = f"{props.major}.{props.minor}"
            try:
                info["driver"] = torch.cuda.driver_version() if hasattr(torch.cuda, "driver_version") else None
            except Exception:  # noqa: BLE001 - informative only
                info["driver"] = None
        else:
            info["device"] = "cpu"
    except ImportError:  # pragma: no cover - torch is a dependency
        info["torch"] = None
        info["device"] = device
    return info


def machine_line(info: dict[str, Any]) -> str:
    """One line: what ran where, and how loaded the machine was."""
    dev = info.get("device", "cpu")
    if dev != "cpu":
        dev = f"{dev} ({info.get('device_memory_gib')} GiB)"
    la = info.get("load_average") or []
    load = "/".join(f"{x:.2f}" for x in la) if la else "n/a"
    return (f"machine: {info['cpu_model']}, {info['cpu_count']} CPUs ({info['cpus_usable']} usable), "
            f"{info.get('memory_gib')} GiB; device {dev}; torch {info.get('torch')} "
            f"(CUDA {info.get('torch_cuda') or 'none'}, {info.get('torch_threads')} threads); "
            f"load average {load} (1/5/15 min)")


# ---------------------------------------------------------------- statistics


def spread(values: Sequence[float]) -> dict[str, Any]:
    """Median, min, max and quartiles (inclusive method) of ``values``."""
    v = sorted(float(x) for x in values)
    if not v:
        raise ValueError("no values to summarise")
    q1, q3 = (statistics.quantiles(v, n=4, method="inclusive")[i] for i in (0, 2)) if len(v) >= 2 else (v[0], v[0])
    return {"n": len(v), "median": statistics.median(v), "min": v[0], "max": v[-1], "q1": q1, "q3": q3}


def pairs_summary(ours_seconds: Sequence[float], alt_seconds: Sequence[float], work: float) -> dict[str, Any]:
    """Rates (``work`` units per second) of each side and the per-pair ratio ours/alternative.

    ``ours_seconds[i]`` and ``alt_seconds[i]`` are pair ``i`` (run back to back);
    the ratio of a pair is ``alt_seconds[i] / ours_seconds[i]`` (> 1: ours is faster).
    """
    if len(ours_seconds) != len(alt_seconds) or not ours_seconds:
        raise ValueError(f"need the same number (>= 1) of runs per side, got {len(ours_seconds)} and {len(alt_seconds)}")
    if min(ours_seconds) <= 0 or min(alt_seconds) <= 0:
        raise ValueError("a run took no time; the timer or the work is wrong")
    ratios = [a / o for o, a in zip(ours_seconds, alt_seconds)]
    out = {
        "pairs": len(ratios),
        "work_per_run": work,
        "ours_rate": spread([work / s for s in ours_seconds]),
        "alternative_rate": spread([work / s for s in alt_seconds]),
        "ratio": spread(ratios),
        "ours_seconds": [round(s, 4) for s in ours_seconds],
        "alternative_seconds": [round(s, 4) for s in alt_seconds],
    }
    if len(ratios) < MIN_PAIRS_FOR_CLAIMS:
        out["note"] = f"only {len(ratios)} pair(s): a smoke check, not a figure (use --pairs {MIN_PAIRS_FOR_CLAIMS} or more)"
    return out


def fmt_spread(s: dict[str, Any], digits: int = 3) -> str:
    """``median [min-max]`` with ``digits`` significant digits."""
    return f"{s['median']:.{digits}g} [{s['min']:.{digits}g}-{s['max']:.{digits}g}]"


# ---------------------------------------------------------------- side processes


class SideProcess:
    """One benchmark side in its own Python process (see the module docstring for the protocol)."""

    def __init__(self, name: str, argv: list[str], *, env: dict[str, str] | None = None,
                 setup_timeout: float = 1800.0) -> None:
        self.name = name
        full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                    "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, *argv], cwd=REPO, env=full_env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=None, text=True, bufsize=1,
        )
        self.ready = self._read(setup_timeout)
        if not self.ready.get("ready"):
            raise RuntimeError(f"side {name!r} failed to start: {self.ready.get('error', self.ready)}")

    def _read(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                code = self.proc.wait()
                return {"error": f"side {self.name!r} exited with {code} (its stderr is above)"}
            if line.startswith(MARK):
                return json.loads(line[len(MARK):])
        self.close()
        return {"error": f"side {self.name!r} gave no answer within {timeout:.0f} s"}

    def run(self, index: int, timeout: float = 3600.0) -> dict[str, Any]:
        """One timed run; its result (``seconds`` and whatever the side reports)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"run {index}\n")
        self.proc.stdin.flush()
        res = self._read(timeout)
        if "seconds" not in res:
            raise RuntimeError(f"side {self.name!r} run {index} failed: {res.get('error', res)}")
        return res

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


def interleave(sides: Sequence[SideProcess], pairs: int, log: Callable[[str], None] | None = None) -> dict[str, list[dict]]:
    """Run ``pairs`` rounds of A B (C ...) in order; each side's run results in pair order."""
    if pairs < 1:
        raise ValueError(f"--pairs must be >= 1, got {pairs}")
    out: dict[str, list[dict]] = {s.name: [] for s in sides}
    for i in range(pairs):
        for s in sides:
            out[s.name].append(s.run(i))
        if log:
            log(f"pair {i + 1}/{pairs}: " + ", ".join(f"{s.name} {out[s.name][-1]['seconds']:.3f} s" for s in sides)
                + f"; load {load_average()[:1]}")
    return out


def side_main(setup: Callable[[], tuple[Callable[[int], dict[str, Any] | float], dict[str, Any]]]) -> int:
    """The child's loop: ``setup()`` -> (run(i) -> seconds or a dict with ``seconds``, facts); then serve runs."""

    def say(doc: dict[str, Any]) -> None:
        sys.stdout.write(MARK + json.dumps(doc) + "\n")
        sys.stdout.flush()

    try:
        t0 = time.perf_counter()
        run, facts = setup()
        say({"ready": True, "setup_seconds": round(time.perf_counter() - t0, 3), **facts})
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which stops
        traceback.print_exc()
        say({"ready": False, "error": f"{type(exc).__name__}: {exc}"})
        return 1
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        try:
            res = run(int(cmd[1]))
            say(res if isinstance(res, dict) else {"seconds": float(res)})
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            say({"error": f"{type(exc).__name__}: {exc}"})
    return 0


def add_pair_args(ap: Any, default_pairs: int = MIN_PAIRS_FOR_CLAIMS) -> None:
    """The options every benchmark shares."""
    ap.add_argument("--pairs", type=int, default=default_pairs,
                    help=f"interleaved pairs (ours, alternative); median and spread are reported (default {default_pairs})")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes and 1 pair: checks the benchmark runs, measures nothing")
    ap.add_argument("--side", default="", help=argparse_suppress())


def argparse_suppress() -> str:
    import argparse

    return argparse.SUPPRESS


def check_pairs(pairs: int) -> None:
    if not 1 <= pairs <= 1000:
        raise SystemExit(f"error: --pairs {pairs} must be 1..1000 (5 or more for a figure, 1-2 for a smoke run)")
