"""Latency of cheap calls under a heavy mix: the bounded server vs the same server unbounded, in one run.

    python scripts/bench_serve_load.py [--seconds 15] [--heavy 40] [--cheap 10] [--pairs 1] [--json out.json]

Three processes, as in production (a server, the clients that load it, and the orchestrator that
probes it; clients in the server's process would measure their own GIL, not the server):

- **server**: one Likeness server (cpu-tiny profile, the real CPU face pack, one queued build);
- **load**: ``--heavy`` threads calling ScoreConsistency back to back (two real photos against
  two references). A refused call (RESOURCE_EXHAUSTED) waits what the server's
  ``grpc-retry-pushback-ms`` trailer says, as gRPC's own retry policy does, and tries again;
- **probe** (this process): ``--cheap`` threads cycling health Check, GetBuild and ListBuilds, 20 ms
  apart, each call timed.

Two arms, each for ``--seconds``, A B A B ... for ``--pairs`` pairs:

- **bounded**: the server as shipped (at most ``max_heavy`` heavy calls at once);
- **unbounded**: the same server with ``max_heavy`` = its thread count (what it was before issue 13).

Printed per arm and class: calls, p50 and p99 latency (ms), and refusals; then the health p99
ratio unbounded / bounded. Goal (issue 13): health p99 under 200 ms under any mix.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "service"))


def _server(data: str, max_heavy: int | None, ready: mp.Queue, stop: mp.Event) -> None:
    """The server process: port and build id on ``ready``, serve until ``stop``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from grpc_health.v1 import health_pb2

    from likeness.serve import servicer as sv
    from likeness.serve.runtime import Runtime
    from likeness.spec import spec_from_dict

    rt = Runtime(Path(data), devices=["cpu"], default_profile="cpu-tiny", start_workers=False)
    server, port, health = sv.create_server("127.0.0.1:0", rt, max_heavy=max_heavy)
    server.start()
    for name in ("", sv.SERVICE_NAME):
        health.set(name, health_pb2.HealthCheckResponse.SERVING)
    build = rt.start_build(spec=spec_from_dict({"name": "Load", "token": "l0ad", "class_word": "woman"}))
    ready.put((port, build.id))
    stop.wait()
    server.stop(0)
    rt.stop()


def _pushback_s(exc: object) -> float:
    for key, value in (exc.trailing_metadata() or ()):  # type: ignore[attr-defined]
        if key == "grpc-retry-pushback-ms":
            return int(value) / 1000
    return 0.05


def _load(addr: str, realdata: str, n_heavy: int, go: mp.Event, stop: mp.Event, out: mp.Queue) -> None:
    """The load process: ``n_heavy`` ScoreConsistency callers until ``stop``; (done, refused, latencies) on ``out``."""
    import grpc

    from likeness.serve.client import LikenessClient

    photos = sorted((Path(realdata) / "faces" / "Angelina_Jolie").glob("*.jpg"))[:3]
    other = sorted((Path(realdata) / "faces" / "Barack_Obama").glob("*.jpg"))[:1]
    lat: list[float] = []
    refused = [0]
    lock = threading.Lock()
    with LikenessClient(addr, retry_heavy=False) as c:  # the wait is done here, to count the refusals
        c.score_consistency([photos[0]], reference=photos[1:])  # load the face models before timing
        out.put("warm")
        go.wait()

        def heavy() -> None:
            while not stop.is_set():
                t0 = time.perf_counter()
                try:
                    c.score_consistency([photos[0], other[0]], reference=photos[1:])
                except grpc.RpcError as exc:
                    if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                        raise
                    with lock:
                        refused[0] += 1
                    stop.wait(_pushback_s(exc))
                    continue
                with lock:
                    lat.append(time.perf_counter() - t0)

        threads = [threading.Thread(target=heavy) for _ in range(n_heavy)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    out.put((lat, refused[0]))


def _pct(v: list[float]) -> dict:
    a = np.array(v) * 1000 if v else np.zeros(1)
    return {"calls": len(v), "p50_ms": round(float(np.percentile(a, 50)), 1),
            "p99_ms": round(float(np.percentile(a, 99)), 1)}


def _arm(tmp: Path, realdata: Path, max_heavy: int | None, seconds: float, n_heavy: int, n_cheap: int) -> dict:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from likeness.serve.client import LikenessClient

    ctx = mp.get_context("spawn")
    ready, results = ctx.Queue(), ctx.Queue()
    stop_server, go, stop_load = ctx.Event(), ctx.Event(), ctx.Event()
    srv = ctx.Process(target=_server, args=(str(tmp / "data"), max_heavy, ready, stop_server))
    srv.start()
    port, build_id = ready.get(timeout=120)
    addr = f"127.0.0.1:{port}"
    load = ctx.Process(target=_load, args=(addr, str(realdata), n_heavy, go, stop_load, results))
    load.start()
    assert results.get(timeout=120) == "warm"
    lat: dict[str, list[float]] = {"health": [], "read": []}
    lock = threading.Lock()
    try:
        with LikenessClient(addr) as c:
            go.set()
            time.sleep(1.0)  # let the heavy callers fill the server first
            stop = time.monotonic() + seconds

            def cheap() -> None:
                stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(addr))
                k = 0
                while time.monotonic() < stop:
                    t0 = time.perf_counter()
                    if k % 3 == 0:
                        stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=30)
                        cls = "health"
                    elif k % 3 == 1:
                        c.get_build(build_id)
                        cls = "read"
                    else:
                        c.list_builds()
                        cls = "read"
                    with lock:
                        lat[cls].append(time.perf_counter() - t0)
                    k += 1
                    time.sleep(0.02)

            threads = [threading.Thread(target=cheap) for _ in range(n_cheap)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        stop_load.set()
        heavy_lat, refused = results.get(timeout=120)
    finally:
        stop_load.set()
        load.join(60)
        stop_server.set()
        srv.join(60)
        for p in (load, srv):
            if p.is_alive():
                p.kill()
    out = {cls: _pct(v) for cls, v in lat.items()}
    out["heavy"] = dict(_pct(heavy_lat), refused=refused)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--heavy", type=int, default=40)
    ap.add_argument("--cheap", type=int, default=10)
    ap.add_argument("--pairs", type=int, default=1, help="A B pairs (bounded, unbounded) run one after the other")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from likeness.profiles import realdata_dir

    realdata = realdata_dir()
    if not (realdata / "faces").is_dir():
        raise SystemExit(f"real photos not found at {realdata}; set LIKENESS_REALDATA")
    print(f"machine {platform.node()} ({os.cpu_count()} CPUs), load {os.getloadavg()[0]:.2f}; "
          f"{args.heavy} heavy + {args.cheap} cheap client threads, {args.seconds:.0f} s per arm, "
          f"{args.pairs} pair(s)", file=sys.stderr)
    runs: dict[str, list[dict]] = {"bounded": [], "unbounded": []}
    for pair in range(args.pairs):
        for name, bound in (("bounded", None), ("unbounded", 32)):
            with tempfile.TemporaryDirectory() as tmp:
                r = _arm(Path(tmp), realdata, bound, args.seconds, args.heavy, args.cheap)
            runs[name].append(r)
            print(f"{pair + 1}/{args.pairs} {name:9} health p50 {r['health']['p50_ms']:7.1f} ms p99 "
                  f"{r['health']['p99_ms']:7.1f} ms | reads p50 {r['read']['p50_ms']:7.1f} p99 {r['read']['p99_ms']:7.1f} "
                  f"| heavy {r['heavy']['calls']} done (p50 {r['heavy']['p50_ms']:.0f} ms), {r['heavy']['refused']} "
                  "refused", file=sys.stderr)
    worst = {name: max(r["health"]["p99_ms"] for r in rs) for name, rs in runs.items()}
    ratio = worst["unbounded"] / max(worst["bounded"], 1e-3)
    print(f"health p99, worst arm: bounded {worst['bounded']:.1f} ms, unbounded {worst['unbounded']:.1f} ms "
          f"({ratio:.1f}x); goal < 200 ms: {'met' if worst['bounded'] < 200 else 'NOT met'}", file=sys.stderr)
    doc = {"machine": platform.node(), "cpus": os.cpu_count(), "runs": runs, "health_p99_worst_ms": worst,
           "health_p99_ratio": round(ratio, 2)}
    if args.json:
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
