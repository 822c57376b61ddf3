"""Latency of cheap calls under a heavy mix: the bounded server vs the same server unbounded, in one run.

    python scripts/bench_serve_load.py [--seconds 15] [--heavy 40] [--cheap 10] [--json out.json]

One in-process Likeness server (cpu-tiny profile, the real CPU face pack, one queued build),
driven by ``--heavy`` threads calling ScoreConsistency back to back (two real photos against
two references) and ``--cheap`` threads cycling health Check, GetBuild and ListBuilds. Two arms,
each for ``--seconds``:

- **bounded**: the server as shipped (heavy calls past ``max_heavy`` are refused with
  RESOURCE_EXHAUSTED and a retry hint; clients back off 50 ms and retry);
- **unbounded**: the same server with ``max_heavy`` = the thread count (what it was before).

Printed per arm and class: calls, p50 and p99 latency (ms), and refusals; then the health p99
ratio unbounded / bounded. Goal (issue 13): health p99 under 200 ms under any mix.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "service"))


def _arm(tmp: Path, realdata: Path, max_heavy: int | None, seconds: float, n_heavy: int, n_cheap: int) -> dict:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from likeness.serve import servicer as sv
    from likeness.serve.client import LikenessClient
    from likeness.serve.runtime import Runtime
    from likeness.spec import spec_from_dict

    rt = Runtime(tmp / "data", devices=["cpu"], default_profile="cpu-tiny", start_workers=False)
    server, port, health = sv.create_server("127.0.0.1:0", rt, max_heavy=max_heavy)
    server.start()
    for name in ("", sv.SERVICE_NAME):
        health.set(name, health_pb2.HealthCheckResponse.SERVING)
    addr = f"127.0.0.1:{port}"
    build = rt.start_build(spec=spec_from_dict({"name": "Load", "token": "l0ad", "class_word": "woman"}))
    photos = sorted((realdata / "faces" / "Angelina_Jolie").glob("*.jpg"))[:3]
    other = sorted((realdata / "faces" / "Barack_Obama").glob("*.jpg"))[:1]
    lat: dict[str, list[float]] = {"health": [], "read": [], "heavy": []}
    refused = [0]
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    with LikenessClient(addr) as c:
        c.score_consistency([photos[0]], reference=photos[1:])  # load the face models before timing

        def heavy() -> None:
            while time.monotonic() < stop:
                t0 = time.perf_counter()
                try:
                    c.score_consistency([photos[0], other[0]], reference=photos[1:])
                except grpc.RpcError as exc:
                    if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                        raise
                    with lock:
                        refused[0] += 1
                    time.sleep(0.05)
                    continue
                with lock:
                    lat["heavy"].append(time.perf_counter() - t0)

        def cheap() -> None:
            stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(addr))
            k = 0
            while time.monotonic() < stop:
                t0 = time.perf_counter()
                if k % 3 == 0:
                    stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=30)
                    cls = "health"
                elif k % 3 == 1:
                    c.get_build(build.id)
                    cls = "read"
                else:
                    c.list_builds()
                    cls = "read"
                with lock:
                    lat[cls].append(time.perf_counter() - t0)
                k += 1
                time.sleep(0.02)

        threads = [threading.Thread(target=heavy) for _ in range(n_heavy)] + \
                  [threading.Thread(target=cheap) for _ in range(n_cheap)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    server.stop(0)
    rt.stop()
    out = {}
    for cls, v in lat.items():
        a = np.array(v) * 1000 if v else np.zeros(1)
        out[cls] = {"calls": len(v), "p50_ms": round(float(np.percentile(a, 50)), 1),
                    "p99_ms": round(float(np.percentile(a, 99)), 1)}
    out["heavy"]["refused"] = refused[0]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--heavy", type=int, default=40)
    ap.add_argument("--cheap", type=int, default=10)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import tempfile

    from likeness.profiles import realdata_dir

    realdata = realdata_dir()
    if not (realdata / "faces").is_dir():
        raise SystemExit(f"real photos not found at {realdata}; set LIKENESS_REALDATA")
    print(f"machine {platform.node()} ({os.cpu_count()} CPUs), load {os.getloadavg()[0]:.2f}; "
          f"{args.heavy} heavy + {args.cheap} cheap client threads, {args.seconds:.0f} s per arm", file=sys.stderr)
    res = {}
    for name, bound in (("bounded", None), ("unbounded", 32)):
        with tempfile.TemporaryDirectory() as tmp:
            res[name] = _arm(Path(tmp), realdata, bound, args.seconds, args.heavy, args.cheap)
        r = res[name]
        print(f"{name:9} health p50 {r['health']['p50_ms']:7.1f} ms p99 {r['health']['p99_ms']:7.1f} ms | "
              f"reads p50 {r['read']['p50_ms']:7.1f} p99 {r['read']['p99_ms']:7.1f} | heavy {r['heavy']['calls']} "
              f"done (p50 {r['heavy']['p50_ms']:.0f} ms), {r['heavy']['refused']} refused", file=sys.stderr)
    ratio = res["unbounded"]["health"]["p99_ms"] / max(res["bounded"]["health"]["p99_ms"], 1e-3)
    print(f"health p99 unbounded / bounded: {ratio:.1f}x", file=sys.stderr)
    doc = {"arms": res, "health_p99_ratio": round(ratio, 2)}
    if args.json:
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
