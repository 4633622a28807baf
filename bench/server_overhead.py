"""Server overhead benchmark: a fal `subscribe` through k5serve vs a direct engine call.

    python bench/server_overhead.py [--runs 5] [--steps 4] [--pollers 20] [--out results.json]

1. direct: `Engine.generate` in this process, for exactly the GenerationRequest the fal route
   builds from the same input.
2. subscribe: a real `k5serve serve` child process over TLS (a trustme certificate) and the real
   `fal_client.subscribe` (polling every 0.1 s, its default), same input, end to end including
   the result fetch. The two alternate run by run (one warm-up each, not counted);
   overhead_ratio = median over runs of subscribe/direct.
3. status polls: while one video generates, `--pollers` threads poll its status like the Python
   client does (every 0.1 s); latency p50/p99/max over all polls.

The engine runs on --device (default cpu) with the tiny demo weights (built into a temporary
folder, or --weights-dir). Prints one JSON object (and writes it to --out).
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


def fal_input(steps: int, i: int) -> dict:
    return {"prompt": f"a red fox running through snow, take {i}", "num_inference_steps": steps, "seed": i}


def generation_request(body: dict):
    from server.api.fal_inputs import parse, to_generation_request

    return to_generation_request(parse(MODEL, body))


class Direct:
    """The engine in this process, warm, generating what the fal route would ask for."""

    def __init__(self, weights: Path, device: str, tmp: Path):
        from pipelines.engine import Engine

        self.engine = Engine(weights, device=device)
        self.engine.warmup()
        self.tmp = tmp

    def __call__(self, body: dict) -> float:
        t0 = time.perf_counter()
        self.engine.generate(generation_request(body), self.tmp / "direct.mp4")
        return time.perf_counter() - t0


def make_tls(folder: Path) -> tuple[Path, Path, Path]:
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    paths = folder / "cert.pem", folder / "key.pem", folder / "ca.pem"
    cert.cert_chain_pems[0].write_to_path(str(paths[0]))
    cert.private_key_pem.write_to_path(str(paths[1]))
    ca.cert_pem.write_to_path(str(paths[2]))
    return paths


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(weights: Path, device: str, tmp: Path) -> tuple[subprocess.Popen, str, Path]:
    import httpx

    cert, key, ca = make_tls(tmp)
    port = free_port()
    args = [
        sys.executable,
        "-m",
        "server.cli",
        "serve",
        "--port",
        str(port),
        "--weights-dir",
        str(weights),
        "--data-dir",
        str(tmp / "data"),
        "--device",
        device,
        "--ssl-certfile",
        str(cert),
        "--ssl-keyfile",
        str(key),
    ]
    log = open(tmp / "server.log", "wb")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    host = f"localhost:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {(tmp / 'server.log').read_text()[-2000:]}")
        try:
            if httpx.get(f"https://{host}/readyz", verify=str(ca), timeout=2).status_code == 200:
                return proc, host, ca
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit("server did not become ready")


def fal_subscribe(host: str, ca: Path):
    os.environ.update({"FAL_KEY": "bench", "FAL_RUN_HOST": host, "FAL_QUEUE_RUN_HOST": host, "SSL_CERT_FILE": str(ca)})
    import fal_client  # reads the hosts at import time

    def call(body: dict) -> float:
        t0 = time.perf_counter()
        result = fal_client.subscribe(MODEL, arguments=body)
        elapsed = time.perf_counter() - t0
        assert result["video"]["file_size"] > 0
        return elapsed

    return call


def bench_polls(host: str, ca: Path, pollers: int, steps: int) -> dict:
    import httpx

    base = f"https://{host}"
    with httpx.Client(base_url=base, verify=str(ca)) as client:
        rid = client.post(f"/{MODEL}", json=fal_input(steps, 999)).json()["request_id"]
        url = f"/fal-ai/kandinsky5/requests/{rid}/status"
        while client.get(url).json()["status"] == "IN_QUEUE":
            time.sleep(0.02)
    done = threading.Event()
    latencies: list[float] = []
    lock = threading.Lock()

    def poll() -> None:
        with httpx.Client(base_url=base, verify=str(ca)) as client:
            client.get(url)  # connect (TLS handshake) outside the measurement
            while not done.is_set():
                t0 = time.perf_counter()
                status = client.get(url, params={"logs": "true"}).json()["status"]
                elapsed = time.perf_counter() - t0
                with lock:
                    latencies.append(elapsed)
                if status == "COMPLETED":
                    done.set()
                time.sleep(0.1)

    threads = [threading.Thread(target=poll) for _ in range(pollers)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    latencies.sort()

    def pct(p: float) -> float:
        return round(1000 * latencies[min(len(latencies) - 1, int(p * len(latencies)))], 2)

    return {
        "pollers": pollers,
        "polls": len(latencies),
        "window_s": round(time.perf_counter() - t0, 2),
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "max_ms": round(1000 * latencies[-1], 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--poll-steps", type=int, default=30, help="steps of the video generated while polling")
    parser.add_argument("--pollers", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--weights-dir", type=Path, default=None, help="default: tiny weights in a temp folder")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        weights = args.weights_dir or tmp / "weights"
        direct_call = Direct(weights, args.device, tmp)  # builds the tiny weights if needed
        proc, host, ca = start_server(weights, args.device, tmp)
        try:
            subscribe_call = fal_subscribe(host, ca)
            # Interleave the two (after one warm-up each) so that load from anything else on the
            # machine hits both alike; the ratio is taken per pair, then the median.
            direct, subscribe = [], []
            for i in range(args.runs + 1):
                d, s = direct_call(fal_input(args.steps, i)), subscribe_call(fal_input(args.steps, i))
                if i:
                    direct.append(d)
                    subscribe.append(s)
            polls = bench_polls(host, ca, args.pollers, args.poll_steps)
        finally:
            proc.terminate()
            proc.wait(30)

    med_direct, med_sub = statistics.median(direct), statistics.median(subscribe)
    pair_ratios = [s / d for d, s in zip(direct, subscribe, strict=True)]
    report = {
        "benchmark": "server_overhead",
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "device": args.device},
        "model": MODEL,
        "steps": args.steps,
        "runs": args.runs,
        "direct_s": [round(t, 3) for t in direct],
        "subscribe_s": [round(t, 3) for t in subscribe],
        "median_direct_s": round(med_direct, 3),
        "median_subscribe_s": round(med_sub, 3),
        "overhead_s": round(med_sub - med_direct, 3),
        "overhead_ratio": round(statistics.median(pair_ratios), 3),
        "pair_ratios": [round(r, 3) for r in pair_ratios],
        "status_polls_while_generating": polls,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
