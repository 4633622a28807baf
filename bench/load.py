"""Load benchmark: 200 concurrent clients submit through the four contracts and poll until done.

    .venv/bin/python bench/load.py [--engine fake|demo] [--clients 200] [--duration 45]
        [--max-queue 50] [--steps 4] [--step-time 0.005] [--poll-interval 0.1]
        [--drain-timeout 120] [--host 127.0.0.1] [--out load.json]

Starts a k5serve server on loopback as a child process (never a remote host: any --host that is
not a loopback address is refused):
  --engine fake (default)  tests/fake_serve.py: the real `k5serve serve` entry point and app
                           around the test suite's fake engine (--step-time seconds per step), so
                           the HTTP layer, queue and worker are what is measured. A separate
                           process: the load generator does not share the server's GIL.
  --engine demo            `k5serve serve` in demo mode (tiny random-weight models on CPU, built
                           into a temporary folder or taken from --weights-dir), --steps steps.
Then --clients asyncio clients (each with its own httpx.AsyncClient) loop until --duration has
passed: pick a contract (client i uses contract i mod 4: fal queue, AI/ML API, OneRouter,
OpenAI Videos), submit a job, and on acceptance poll its status every --poll-interval until it
is terminal (OneRouter is synchronous: the submit call itself waits). A 429 counts as rejected and
the client backs off briefly. The server runs with --max-queue so that some submits get 429.
After --duration no new job is submitted; jobs in flight are followed until they end or
--drain-timeout passes.

Emits one JSON object (stdout, and --out): submitted, accepted, rejected (by HTTP status),
status-poll latency p50/p99/max (ms), submit latency, finished/failed/unfinished,
all_accepted_finished, server_5xx, transport_errors, wall_s. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
CONTRACTS = ("fal", "aimlapi", "onerouter", "openai")


def loopback_host(host: str) -> str:
    """The host, if it is a loopback address or name; otherwise exit: this bench never leaves the machine."""
    if host.lower() in ("localhost", "localhost."):
        return "127.0.0.1"
    try:
        if ipaddress.ip_address(host.strip("[]")).is_loopback:
            return host.strip("[]")
    except ValueError:
        pass
    sys.exit(f"load.py: --host {host!r} is not a loopback address; this benchmark only runs on 127.0.0.0/8 or ::1")


def free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# -- the server ------------------------------------------------------------------------------------


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    log: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def start_server(args: argparse.Namespace, tmp: Path) -> Server:
    host = args.host
    port = free_port(host)
    common = ["serve", "--host", host, "--port", str(port), "--data-dir", str(tmp / "data")]
    common += ["--max-queue", str(args.max_queue)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("K5SERVE_")}
    env["PYTHONUNBUFFERED"] = "1"
    if args.engine == "fake":
        cmd = [sys.executable, str(ROOT / "tests" / "fake_serve.py"), *common]
        env["K5SERVE_FAKE_STEP_TIME"] = str(args.step_time)
    else:
        weights = args.weights_dir or tmp / "weights"
        if args.weights_dir is None:
            sys.path.insert(0, str(ROOT))
            from pipelines.tiny import ensure_tiny

            ensure_tiny(weights, "kandinsky5-tiny-t2v")
        cmd = [sys.executable, "-m", "server.cli", "serve", *common[1:], "--weights-dir", str(weights)]
        cmd += ["--device", "cpu"]
    log = tmp / "server.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    server = Server(proc, url, log)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"load.py: the server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return server
        time.sleep(0.2)
    server.stop()
    sys.exit(f"load.py: the server was not ready after 180 s:\n{log.read_text()[-3000:]}")


# -- the clients -----------------------------------------------------------------------------------


@dataclass
class Tally:
    submitted: Counter = field(default_factory=Counter)  # per contract
    accepted: Counter = field(default_factory=Counter)
    rejected: Counter = field(default_factory=Counter)  # per HTTP status
    finished: Counter = field(default_factory=Counter)  # accepted and succeeded
    failed: Counter = field(default_factory=Counter)  # accepted, ended without a video
    unfinished: Counter = field(default_factory=Counter)  # accepted, still running at the end
    statuses: Counter = field(default_factory=Counter)  # every HTTP status seen
    transport_errors: Counter = field(default_factory=Counter)
    poll_ms: list[float] = field(default_factory=list)  # status polls
    result_ms: list[float] = field(default_factory=list)  # fal's result fetch
    submit_ms: list[float] = field(default_factory=list)  # submits of the queued contracts
    sync_ms: list[float] = field(default_factory=list)  # OneRouter's synchronous call, generation included


class Client:
    def __init__(self, http: httpx.AsyncClient, tally: Tally, args: argparse.Namespace):
        self.http, self.tally, self.args = http, tally, args

    async def request(self, method: str, url: str, *, kind: str = "submit", **kw) -> httpx.Response:
        t0 = time.perf_counter()
        response = await self.http.request(method, url, **kw)
        getattr(self.tally, f"{kind}_ms").append((time.perf_counter() - t0) * 1000)
        self.tally.statuses[response.status_code] += 1
        return response

    async def run(self, index: int, stop_at: float, drain_until: float) -> None:
        contract = CONTRACTS[index % len(CONTRACTS)]
        job = 0
        while time.monotonic() < stop_at:
            job += 1
            prompt = f"load test client {index} job {job}"
            try:
                await self.one_job(contract, prompt, drain_until)
            except httpx.HTTPError as exc:
                self.tally.transport_errors[type(exc).__name__] += 1
                await asyncio.sleep(0.2)

    async def one_job(self, contract: str, prompt: str, drain_until: float) -> None:
        steps = self.args.steps
        self.tally.submitted[contract] += 1
        if contract == "fal":
            body = {"prompt": prompt, "num_inference_steps": steps}
            response = await self.request("POST", "/fal-ai/kandinsky5/text-to-video", json=body)
        elif contract == "aimlapi":
            body = {"model": "sber-ai/kandinsky5-t2v", "prompt": prompt, "num_inference_steps": steps}
            response = await self.request("POST", "/v2/video/generations", json=body)
        elif contract == "onerouter":
            body = {"model": "kandinsky5-text-to-video", "prompt": prompt, "num_inference_steps": steps}
            timeout = max(1.0, drain_until - time.monotonic())
            response = await self.request("POST", "/v1/videos/generations", kind="sync", json=body, timeout=timeout)
        else:
            body = {"prompt": prompt, "num_inference_steps": steps}
            response = await self.request("POST", "/v1/videos", json=body)
        if response.status_code not in (200, 201):
            self.tally.rejected[response.status_code] += 1
            if contract == "onerouter" and response.status_code not in (429, 503):  # accepted, then failed
                self.tally.rejected[response.status_code] -= 1
                self.tally.accepted[contract] += 1
                self.tally.failed[contract] += 1
                return
            await asyncio.sleep(random.uniform(0.5, 1.5) * self.args.backoff)  # back off after a 429
            return
        self.tally.accepted[contract] += 1
        if contract == "onerouter":  # synchronous: the answer is the result
            ok = bool(response.json().get("data"))
            (self.tally.finished if ok else self.tally.failed)[contract] += 1
            return
        outcome = await self.follow(contract, response.json(), drain_until)
        getattr(self.tally, outcome)[contract] += 1

    async def follow(self, contract: str, accepted: dict, drain_until: float) -> str:
        """Poll until terminal -> 'finished' | 'failed' | 'unfinished'."""
        if contract == "fal":
            url, params, done = accepted["status_url"], None, {"COMPLETED"}
        elif contract == "aimlapi":
            url, params, done = "/v2/video/generations", {"generation_id": accepted["id"]}, {"completed", "error"}
        else:
            url, params, done = f"/v1/videos/{accepted['id']}", None, {"completed", "failed"}
        while time.monotonic() < drain_until:
            await asyncio.sleep(self.args.poll_interval)
            response = await self.request("GET", url, params=params, kind="poll")
            if response.status_code >= 400:
                return "failed"
            body = response.json()
            if body["status"] in done:
                if contract == "fal":
                    result = await self.request("GET", accepted["response_url"], kind="result")
                    return "finished" if result.status_code == 200 else "failed"
                return "finished" if body["status"] == "completed" else "failed"
        return "unfinished"


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"count": 0}
    ordered = sorted(values)

    def pick(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)

    return {"count": len(ordered), "p50": pick(0.50), "p99": pick(0.99), "max": round(ordered[-1], 2)}


async def drive(url: str, args: argparse.Namespace) -> tuple[Tally, float]:
    """One httpx.AsyncClient (one keep-alive connection) per simulated client, like separate
    users; one shared pool of 200 connections would measure httpcore's pool bookkeeping
    (quadratic in its connection count) instead of the server."""
    tally = Tally()
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    timeout = httpx.Timeout(60.0, connect=10.0, pool=None)
    async with contextlib.AsyncExitStack() as stack:
        clients = [
            Client(
                await stack.enter_async_context(httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout)),
                tally,
                args,
            )
            for _ in range(args.clients)
        ]
        t0 = time.monotonic()
        stop_at, drain_until = t0 + args.duration, t0 + args.duration + args.drain_timeout
        await asyncio.gather(*(client.run(i, stop_at, drain_until) for i, client in enumerate(clients)))
        return tally, time.monotonic() - t0


def report(args: argparse.Namespace, tally: Tally, wall: float) -> dict:
    accepted = sum(tally.accepted.values())
    finished = sum(tally.finished.values())
    return {
        "benchmark": "load",
        "engine": args.engine,
        "clients": args.clients,
        "duration_s": args.duration,
        "max_queue": args.max_queue,
        "steps": args.steps,
        "step_time_s": args.step_time if args.engine == "fake" else None,
        "poll_interval_s": args.poll_interval,
        "backoff_s": args.backoff,
        "submitted": sum(tally.submitted.values()),
        "accepted": accepted,
        "rejected": {str(k): v for k, v in sorted(tally.rejected.items()) if v},
        "finished": finished,
        "failed": sum(tally.failed.values()),
        "unfinished": sum(tally.unfinished.values()),
        "all_accepted_finished": accepted > 0 and finished == accepted,
        "by_contract": {
            c: {
                "submitted": tally.submitted[c],
                "accepted": tally.accepted[c],
                "finished": tally.finished[c],
                "failed": tally.failed[c],
                "unfinished": tally.unfinished[c],
            }
            for c in CONTRACTS
        },
        "status_poll_ms": percentiles(tally.poll_ms),
        "submit_ms": percentiles(tally.submit_ms),
        "fal_result_ms": percentiles(tally.result_ms),
        "onerouter_sync_call_ms": percentiles(tally.sync_ms),
        "http_statuses": {str(k): v for k, v in sorted(tally.statuses.items())},
        "server_5xx": sum(v for k, v in tally.statuses.items() if k >= 500),
        "transport_errors": dict(tally.transport_errors),
        "jobs_per_s": round(finished / wall, 2) if wall else None,
        "wall_s": round(wall, 2),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", choices=["fake", "demo"], default="fake")
    p.add_argument("--clients", type=int, default=200)
    p.add_argument("--duration", type=float, default=45.0, help="seconds during which clients submit")
    p.add_argument("--drain-timeout", type=float, default=120.0, help="seconds to follow jobs after --duration")
    p.add_argument("--max-queue", type=int, default=50)
    p.add_argument("--steps", type=int, default=4, help="num_inference_steps of every job")
    p.add_argument("--step-time", type=float, default=0.005, help="fake engine: seconds per step")
    p.add_argument("--poll-interval", type=float, default=0.1, help="fal_client's default is 0.1 s")
    p.add_argument("--backoff", type=float, default=0.5, help="mean seconds a client waits after a 429")
    p.add_argument("--host", default="127.0.0.1", help="loopback only")
    p.add_argument("--weights-dir", type=Path, default=None, help="demo engine: tiny weights (else built)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    args.host = loopback_host(args.host)
    with tempfile.TemporaryDirectory(prefix="k5serve-load-") as tmp:
        server = start_server(args, Path(tmp))
        try:
            tally, wall = asyncio.run(drive(server.url, args))
        finally:
            server.stop()
    result = report(args, tally, wall)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
