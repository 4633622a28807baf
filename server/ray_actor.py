"""The engine's side of a Ray worker: the actor that builds and runs one engine on a cluster node.

Imported by the front end too (to name the actor class), so importing it is torch-free and does not
import ray: `EngineActor` is a plain class that server/ray_engine.py turns into a Ray actor with
`ray.remote(...)`. The engine itself is built inside the actor process by an importable factory
("module:function", called as `factory(devices, **kwargs)`, as in worker processes): settings'
engine_factory (server.worker_main:build_engine: torch loads there, on the node), a FakeEngine
factory in tests.

The actor is threaded (max_concurrency > 1): while one thread runs `generate`, others answer
`progress` (a long poll over the run's event list), `cancel` and `describe`. The finished mp4 goes
back as bytes (Ray's object store moves it between nodes), so the front end writes it into its
own storage and result URLs work as with a local engine; nothing assumes a shared filesystem.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.cancel import CancelToken
from pipelines.errors import DeviceFailure
from pipelines.request import GenerationRequest, GenerationResult, ResolvedRequest

from .worker_main import encode_error, load_factory

PROGRESS_WAIT = 0.5  # seconds a progress long poll waits for news before answering "nothing yet"


@dataclass
class _Run:
    """One generate call as the actor sees it: its cancel token and the progress events so far."""

    cancel: CancelToken = field(default_factory=CancelToken)
    events: list[tuple] = field(default_factory=list)  # ("step", i, n) or ("phase", name, i, n)
    done: bool = False


class EngineActor:
    """One engine in one actor process. Every method returns plain data (it crosses the wire)."""

    def __init__(self, factory: str, devices: list[str], engine_kwargs: dict) -> None:
        # An engine that cannot be built (bad factory path, missing weights) is reported by info(),
        # as its own error: an actor dying in __init__ would read as a lost worker, and be retried.
        self._error: tuple | None = None
        try:
            self.engine = load_factory(factory)(list(devices), **engine_kwargs)
        except Exception as exc:
            self._error = encode_error(exc)
        self._runs: dict[str, _Run] = {}
        self._news = threading.Condition()
        self._stopping = threading.Event()
        self._scratch = Path(tempfile.mkdtemp(prefix="k5serve-actor-"))

    # ---- identity and state ----------------------------------------------------------------------

    def info(self) -> dict:
        """Who and where: the /readyz worker row's pid and node come from here."""
        import ray  # only ever called inside an actor, where ray is loaded

        if self._error is not None:
            return {"error": self._error}
        context = ray.get_runtime_context()
        return {
            "pid": os.getpid(),
            "node_id": context.get_node_id(),
            "node_ip": ray.util.get_node_ip_address(),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "demo": bool(self.engine.demo),
            "device": str(self.engine.device),
            "available": list(self.engine.available()),
        }

    def warmup(self) -> tuple:
        return _outcome(self.engine.warmup)

    def available(self) -> list[str]:
        return list(self.engine.available())

    def memory_in_use(self) -> int | None:
        return self.engine.memory_in_use()

    def describe(self) -> dict:
        return self.engine.describe()

    def prepare(self, req: GenerationRequest) -> tuple:
        return _outcome(lambda: self.engine.prepare(req))

    def watch(self) -> None:
        """Returns only when the actor is stopped: the proxy keeps one call pending and reads the
        actor's death from it without a round trip (ray.wait on it answers at once)."""
        self._stopping.wait()

    def shutdown(self) -> None:
        self._stopping.set()
        shutil.rmtree(self._scratch, ignore_errors=True)

    # ---- one run ------------------------------------------------------------------------------------

    def generate(self, run_id: str, req: ResolvedRequest) -> tuple:
        """Run `req`; ("ok", (result as dict, mp4 bytes)) or ("error", what _outcome says)."""
        run = self._runs.setdefault(run_id, _Run())
        output = self._scratch / f"{run_id}.mp4"

        def on_step(i: int, n: int) -> None:
            self._event(run, ("step", i, n))

        def on_phase(phase: str, i: int, n: int) -> None:
            self._event(run, ("phase", phase, i, n))

        def go() -> tuple[dict, bytes]:
            result = self.engine.generate(req, output, on_step=on_step, on_phase=on_phase, cancel=run.cancel)
            return _result_dict(result), Path(result.path).read_bytes()

        try:
            return _outcome(go)
        finally:
            output.unlink(missing_ok=True)
            with self._news:
                run.done = True
                self._news.notify_all()

    def progress(self, run_id: str, since: int) -> tuple[list[tuple], bool]:
        """Events after the first `since` ones, waiting up to PROGRESS_WAIT s for one; and whether
        the run has finished (then the caller stops asking and the record is dropped)."""
        run = self._runs.setdefault(run_id, _Run())
        with self._news:
            self._news.wait_for(lambda: len(run.events) > since or run.done, timeout=PROGRESS_WAIT)
            events, done = run.events[since:], run.done
        if done:
            self._runs.pop(run_id, None)
        return events, done

    def cancel(self, run_id: str) -> None:
        """Honoured at the engine's next step or phase boundary (or before it starts)."""
        self._runs.setdefault(run_id, _Run()).cancel.cancel()

    def _event(self, run: _Run, event: tuple) -> None:
        with self._news:
            run.events.append(event)
            self._news.notify_all()


def _result_dict(result: GenerationResult) -> dict:
    from dataclasses import asdict

    data = asdict(result)
    data["path"] = str(result.path)
    return data


# Errors cross the wire as data (worker_main's codec: the engine's own exceptions take arguments
# pickle does not replay). A DeviceFailure is "lost": the proxy ends this actor, whose CUDA context
# is poisoned, and the pool starts a fresh one (as worker processes do).
def _outcome(call) -> tuple:
    try:
        return "ok", call()
    except DeviceFailure as exc:
        return "lost", str(exc)
    except Exception as exc:
        return "error", encode_error(exc)
