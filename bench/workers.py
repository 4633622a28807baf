"""Worker processes: throughput with 1 vs 2 CPU workers, and what the scheduling costs per job.

    python bench/workers.py [--jobs 8] [--steps 4] [--workers 1,2] [--out results.json]

1. throughput: a real `k5serve serve --devices cpu` (then `cpu,cpu`, ...) on the tiny demo model
   (built into a temporary folder, or --weights-dir), the SAME job list each time (--jobs fal
   submits at once, seeds 0..n-1), timed from the first submit to the last COMPLETED status;
   jobs_per_min = jobs / that time * 60. On a CPU the workers share the cores (each process's torch
   uses all of them unless --threads N sets OMP_NUM_THREADS): the figure says what the box gives.
2. scheduler: a JobManager with its SQLite store in a temporary folder and 2 worker threads taking
   and finishing --scheduler-jobs jobs with no engine work: microseconds per job for next_job +
   handle(Succeeded) (the queue, the state change and its disk write).
3. process hop: one ProcessEngine whose child engine does no work (`null_engine` below): the
   milliseconds a job and a step cost for crossing into a worker process and back.

Prints one JSON object (and writes it to --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = "fal-ai/kandinsky5/text-to-video"


# -- 1. throughput through the HTTP contract ----------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def throughput(devices: str, weights: Path, tmp: Path, jobs: int, steps: int, threads: int | None) -> dict:
    import httpx

    port = free_port()
    data = tmp / f"data-{devices.replace(',', '_')}"
    args = [sys.executable, "-m", "server.cli", "serve", "--port", str(port), "--data-dir", str(data)]
    args += ["--weights-dir", str(weights), "--devices", devices]
    env = {k: v for k, v in os.environ.items() if not k.startswith("K5SERVE_")}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    log = open(tmp / f"server-{devices}.log", "wb")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, timeout=30) as client:
            count = len(devices.split(","))
            _wait(lambda: _ready_workers(client) == count, 300, "every worker ready")
            body = lambda i: {"prompt": f"a red fox in snow, take {i}", "num_inference_steps": steps, "seed": i}  # noqa: E731
            t0 = time.perf_counter()
            ids = [client.post(f"/{MODEL}", json=body(i)).json()["request_id"] for i in range(jobs)]
            pending, overlap = set(ids), 0
            while pending:
                busy = sum(1 for w in client.get("/readyz").json()["workers"] if w["state"] == "busy")
                overlap = max(overlap, busy)
                for rid in list(pending):
                    if client.get(f"/fal-ai/kandinsky5/requests/{rid}/status").json()["status"] == "COMPLETED":
                        pending.discard(rid)
                time.sleep(0.2)  # light polling: the front end shares the CPU with the workers
            elapsed = time.perf_counter() - t0
            failed = [rid for rid in ids if client.get(f"/fal-ai/kandinsky5/requests/{rid}").status_code != 200]
    finally:
        proc.terminate()
        proc.wait(60)
    return {
        "devices": devices,
        "workers": count,
        "jobs": jobs,
        "steps": steps,
        "seconds": round(elapsed, 2),
        "jobs_per_min": round(jobs / elapsed * 60, 2),
        "most_workers_busy_at_once": overlap,
        "failed": len(failed),
    }


def _ready_workers(client) -> int:
    try:
        return sum(1 for w in client.get("/readyz").json()["workers"] if w["state"] == "ready")
    except Exception:
        return 0


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise SystemExit(f"timed out waiting for {what}")


# -- 2. the scheduler and job manager alone -------------------------------------------------------------


def scheduler_overhead(jobs: int, tmp: Path) -> dict:
    from pipelines.request import GenerationRequest, resolve
    from server.events import Succeeded
    from server.jobs import JobOutput
    from server.manager import JobManager
    from server.storage import Storage
    from server.store import JobStore

    storage = Storage(tmp / "sched")
    manager = JobManager(JobStore(storage.database), storage, max_queue=jobs + 1)
    out = JobOutput("output.mp4", "video/mp4", 4, 64, 64, 5, 24, 2, 7, "kandinsky5-tiny-t2v", True)
    for i in range(jobs):
        req = GenerationRequest(variant="kandinsky5-tiny-t2v", prompt=f"p{i}", steps=2, seed=i)
        manager.submit(contract="fal", model=MODEL, request=req, resolved=resolve(req))
    stop, times = threading.Event(), []

    def work(name: str) -> None:
        while True:
            t0 = time.perf_counter()
            run = manager.next_job(stop, worker=name, poll=0.01)
            if run is None:
                return
            manager.handle(Succeeded(run.job.id, out))
            times.append(time.perf_counter() - t0)
            if manager.queued_count() == 0:
                stop.set()
                manager.wake_workers()

    threads = [threading.Thread(target=work, args=(f"w{n}",)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    manager.store.close()
    return {
        "jobs": len(times),
        "us_per_job_median": round(statistics.median(times) * 1e6, 1),
        "us_per_job_p99": round(sorted(times)[int(len(times) * 0.99) - 1] * 1e6, 1),
    }


# -- 3. the hop into a worker process ---------------------------------------------------------------------


class NullEngine:
    """An engine that does no work: what is left of a job is the crossing itself."""

    demo, device = True, "cpu"

    def available(self) -> list[str]:
        return ["kandinsky5-tiny-t2v"]

    def warmup(self) -> None:
        pass

    def describe(self) -> dict:
        return {"variants": [], "resident": [], "counters": {}, "memory_in_use": None}

    def memory_in_use(self) -> None:
        return None

    def prepare(self, req):
        from pipelines.request import resolve

        return resolve(req)

    def generate(self, r, output, *, on_step=None, on_phase=None, cancel=None):
        from pipelines.request import GenerationResult

        for i in range(1, r.steps + 1):
            if cancel is not None:
                cancel.raise_if_cancelled()
            if on_step is not None:
                on_step(i, r.steps)
        Path(output).write_bytes(b"x")
        return GenerationResult(Path(output), r.variant.name, r.width, r.height, r.num_frames, 24, r.steps, r.seed,
                                1, True, {})  # fmt: skip


def null_engine(devices: list[str], **_options) -> NullEngine:
    return NullEngine()


def process_hop(runs: int, tmp: Path) -> dict:
    from pipelines.request import GenerationRequest, resolve
    from server.process_engine import ProcessEngine

    engine = ProcessEngine("bench", ("cpu",), factory="bench.workers:null_engine")
    t0 = time.perf_counter()
    engine.start()
    engine.warmup()
    start = time.perf_counter() - t0
    results = {}
    try:
        for steps in (1, 50):
            r = resolve(GenerationRequest(variant="kandinsky5-tiny-t2v", prompt="p", steps=steps, seed=1))
            times = []
            for _ in range(runs):
                t = time.perf_counter()
                engine.generate(r, tmp / "hop.mp4", on_step=lambda i, n: None)
                times.append(time.perf_counter() - t)
            results[steps] = statistics.median(times)
    finally:
        engine.stop()
    return {
        "process_start_s": round(start, 3),
        "ms_per_job_1_step": round(results[1] * 1e3, 3),
        "ms_per_step": round((results[50] - results[1]) / 49 * 1e3, 4),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--workers", default="1,2", help="worker counts to compare (CPU workers)")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for the server and its workers")
    parser.add_argument("--scheduler-jobs", type=int, default=2000)
    parser.add_argument("--weights-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        weights = args.weights_dir or tmp / "weights"
        from pipelines.tiny import ensure_tiny

        for name in ("kandinsky5-tiny-t2v", "kandinsky5-tiny-i2v"):
            ensure_tiny(weights, name)
        rows = [
            throughput(",".join(["cpu"] * int(n)), weights, tmp, args.jobs, args.steps, args.threads)
            for n in args.workers.split(",")
        ]
        result = {
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
            "throughput": rows,
            "speedup": round(rows[-1]["jobs_per_min"] / rows[0]["jobs_per_min"], 2) if len(rows) > 1 else None,
            "scheduler": scheduler_overhead(args.scheduler_jobs, tmp),
            "process_hop": process_hop(20, tmp),
        }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
