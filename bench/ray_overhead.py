"""What running an engine as a Ray actor costs, on a one-node local cluster with fake GPUs.

Measures, with the FakeEngine built inside the actor (so only Ray's share is timed):
- cluster start (ray.init of a local head) and worker start (placement group + actor + engine);
- per-job overhead: one generate of a 0-second fake job through RayEngine vs the same FakeEngine
  called in-process (progress relay, result bytes, the atomic write);
- progress latency: from the actor's step to the front end's on_step (fake steps of `--step-time`);
- output transfer: a job whose mp4 is `--big-mb` MB, bytes back through the object store.

    .venv/bin/python bench/ray_overhead.py --out ray.json [--jobs 20] [--big-mb 64]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--step-time", type=float, default=0.05)
    parser.add_argument("--big-mb", type=int, default=64)
    args = parser.parse_args(argv)

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # loopback only
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(16))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    from fakes import FakeEngine

    from pipelines.request import GenerationRequest
    from server.ray_cluster import connect
    from server.ray_engine import RayEngine

    t0 = time.perf_counter()
    ray = connect("local", num_cpus=2, num_gpus=1, include_dashboard=False, _node_ip_address="127.0.0.1")
    cluster_start = time.perf_counter() - t0
    out: dict = {"command": " ".join(sys.argv), "python": platform.python_version(), "ray": ray.__version__}
    out["cpus"] = os.cpu_count()
    out["cluster_start_s"] = round(cluster_start, 3)

    def worker(**kwargs: object) -> tuple[RayEngine, float]:
        t = time.perf_counter()
        engine = RayEngine("bench", ("cuda",), factory="ray_fakes:fake_engine", engine_kwargs=kwargs)
        engine.start()
        engine.warmup()
        return engine, time.perf_counter() - t

    folder = Path(tempfile.mkdtemp(prefix="k5serve-ray-bench-"))
    request = GenerationRequest(variant="kandinsky5-tiny-t2v", prompt="a fox", steps=args.steps, seed=1)

    # per-job overhead: 0-second steps, Ray vs in-process
    engine, start_s = worker()
    out["worker_start_s"] = round(start_s, 3)
    local = FakeEngine()
    resolved = engine.prepare(request)
    for name, target in (("ray", engine), ("local", local)):
        times = []
        for i in range(args.jobs):
            t = time.perf_counter()
            target.generate(resolved, folder / f"{name}-{i}.mp4", on_step=lambda *_: None)
            times.append(time.perf_counter() - t)
        out[f"job_{name}_median_ms"] = round(1000 * sorted(times)[len(times) // 2], 2)
    out["per_job_overhead_ms"] = round(out["job_ray_median_ms"] - out["job_local_median_ms"], 2)
    engine.kill()

    # progress latency: the actor stamps nothing, so measure each on_step against the step's due time
    engine, _ = worker(step_time=args.step_time)
    arrivals: list[float] = []
    t = time.perf_counter()
    engine.generate(resolved, folder / "progress.mp4", on_step=lambda i, n: arrivals.append(time.perf_counter() - t))
    lags = [arrival - (i + 1) * args.step_time for i, arrival in enumerate(arrivals)]
    out["progress_lag_ms_median"] = round(1000 * sorted(lags)[len(lags) // 2], 1)
    out["progress_lag_ms_max"] = round(1000 * max(lags), 1)
    engine.kill()

    # output transfer
    engine, _ = worker(big_bytes=args.big_mb * 1024 * 1024)
    t = time.perf_counter()
    engine.generate(resolved, folder / "big.mp4")
    big_s = time.perf_counter() - t
    local = FakeEngine(big_bytes=args.big_mb * 1024 * 1024)
    t = time.perf_counter()
    local.generate(resolved, folder / "big-local.mp4")
    out["big_output_mb"] = args.big_mb
    out["big_output_ray_s"] = round(big_s, 3)
    out["big_output_local_s"] = round(time.perf_counter() - t, 3)
    engine.kill()
    ray.shutdown()
    for path in folder.iterdir():
        path.unlink()
    folder.rmdir()
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
