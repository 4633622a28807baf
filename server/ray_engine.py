"""RayEngine: the front end's proxy for an engine that runs as a Ray actor somewhere on a cluster.

It implements EngineLike (engine_protocol.py) plus the remote-engine seam the worker pool drives:
`start()`, `stop()`, `kill()`, `alive`, `pid`, `node`; a call whose actor (or node) died raises
WorkerLost, and the pool puts the job back in the queue. Torch-free, and ray is imported only when
a RayEngine is started: one machine never needs Ray.

Placement: every worker is one actor in its own placement group of one bundle, STRICT_PACK:
{"GPU": n} for a worker of n devices (a sequence-parallel group stays on one node, where its ranks
talk over NVLink/PCIe), {"CPU": 1} for a CPU worker. The group holds the GPUs from `start()` to
`stop()`, so a worker never competes with its own replacement for them.

Progress and cancel cross while a job runs (the actor is threaded): a pending `progress` long
poll brings back the steps and phases, and a cancel seen on the local token is sent to the actor.
The mp4 comes back as bytes and is written here, atomically, at the path the worker asked for.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipelines.cancel import Cancellation
from pipelines.request import GenerationRequest, GenerationResult, ResolvedRequest

from .engine_protocol import WorkerLost
from .ray_actor import EngineActor
from .worker_main import DEFAULT_FACTORY, decode_error

POLL_SECONDS = 0.1  # how often a running job's local cancel token is looked at
REPORT_TIMEOUT = 5.0  # seconds /readyz and /metrics wait for an actor's describe() or memory figure
START_TIMEOUT = 600.0  # seconds to wait for a placement group (GPUs free) and the actor's engine


class RayEngine:
    """One engine on a Ray cluster. `devices`: what the worker runs on (("cuda:0",) or ("cuda:0",
    "cuda:1") for a group; only how many GPUs counts: Ray picks which, and the actor sees them as
    cuda:0..n-1). `factory`/`engine_kwargs`: how the actor builds its engine."""

    def __init__(
        self,
        worker_id: str,
        devices: tuple[str, ...],
        *,
        factory: str = DEFAULT_FACTORY,
        engine_kwargs: dict | None = None,
        start_timeout: float = START_TIMEOUT,
    ) -> None:
        self.worker_id = worker_id
        self.devices = tuple(devices)
        self.factory = factory
        self.engine_kwargs = dict(engine_kwargs or {})
        self.start_timeout = start_timeout
        self.gpus = sum(1 for d in self.devices if d != "cpu")
        self.demo = False  # filled in from the actor at start()
        self.device = "+".join(self.devices)  # a group's devices joined by "+", as --devices writes it
        self.pid: int | None = None
        self.node: str | None = None  # the node's IP address (node_id: Ray's id of it)
        self.node_id: str | None = None
        self._available: list[str] = []
        self._actor: Any = None
        self._group: Any = None
        self._watch: Any = None  # a call that only returns when the actor dies or stops
        self._warmup: Any = None
        self._lost = False
        self._runs = itertools.count(1)

    # ---- lifecycle (the worker pool's seam) -----------------------------------------------------------

    def start(self) -> None:
        """Reserve the GPUs (placement group), start the actor and build its engine there; the
        warm-up starts remotely and `warmup()` waits for it. Raises WorkerLost if the actor dies."""
        ray = _ray()
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if self.alive:
            raise RuntimeError(f"worker {self.worker_id} is already running (pid {self.pid})")
        self._actor = self._watch = self._warmup = None  # a restart: what the last actor left
        self._lost = False

        bundle = {"GPU": float(self.gpus), "CPU": 1.0} if self.gpus else {"CPU": 1.0}
        self._group = placement_group([bundle], strategy="STRICT_PACK", name=f"k5serve-{self.worker_id}")
        ready, _ = ray.wait([self._group.ready()], timeout=self.start_timeout)
        if not ready:
            self._release()
            raise WorkerLost(f"worker {self.worker_id}: no node had {bundle} free within {self.start_timeout:.0f} s")
        actor_class = ray.remote(
            num_cpus=1,
            num_gpus=self.gpus,
            max_concurrency=8,  # watch + generate + progress, and room for cancel, describe, prepare
            max_restarts=0,  # the pool restarts workers (and requeues their job); Ray must not
        )(EngineActor)
        self._actor = actor_class.options(
            name=None,
            scheduling_strategy=PlacementGroupSchedulingStrategy(self._group, placement_group_bundle_index=0),
        ).remote(self.factory, list(_actor_devices(self.devices)), self.engine_kwargs)
        info = self._call("info")
        if "error" in info:  # the engine could not be built there: its own error, not a lost worker
            self.kill()
            raise decode_error(info["error"])
        self.pid, self.node, self.node_id = info["pid"], info["node_ip"], info["node_id"]
        self.demo, self._available = info["demo"], info["available"]
        self.device = "+".join(f"cuda:{g}" for g in info["gpu_ids"]) if self.gpus else info["device"]
        self._watch = self._actor.watch.remote()
        self._warmup = self._actor.warmup.remote()

    def warmup(self) -> None:
        if self._actor is None:
            self.start()
        self._unwrap(self._get(self._warmup))

    def stop(self) -> None:
        """Let the actor clean up, then end it and free its GPUs."""
        if self._actor is not None and self.alive:
            # dead already, or stuck: kill() below ends it either way
            with contextlib.suppress(Exception):
                _ray().get(self._actor.shutdown.remote(), timeout=10)
        self.kill()

    def kill(self) -> None:
        """End the actor now (a running job is lost, as with kill -9) and free its GPUs."""
        if self._actor is not None:
            with contextlib.suppress(Exception):  # gone with its node or the cluster: nothing to end
                _ray().kill(self._actor, no_restart=True)
        self._lost = True
        self._release()

    @property
    def alive(self) -> bool:
        watch = self._watch  # None until start() has heard from the actor (/readyz asks meanwhile)
        if watch is None or self._lost:
            return False
        done, _ = _ray().wait([watch], timeout=0)
        return not done

    # ---- EngineLike -------------------------------------------------------------------------------

    def available(self) -> list[str]:
        return list(self._available)

    def prepare(self, req: GenerationRequest) -> ResolvedRequest:
        return self._unwrap(self._call("prepare", req))

    def memory_in_use(self) -> int | None:
        return self._call("memory_in_use", timeout=REPORT_TIMEOUT)

    def describe(self) -> dict:
        return self._call("describe", timeout=REPORT_TIMEOUT)

    def generate(
        self,
        req: ResolvedRequest,
        output: Path,
        *,
        on_step: Callable[[int, int], None] | None = None,
        on_phase: Callable[[str, int, int], None] | None = None,
        cancel: Cancellation | None = None,
    ) -> GenerationResult:
        """Run on the actor; relay its progress; send a local cancel over; write the mp4 it returns
        at `output` (through `<output>.part`, like the local engine: never a partial file)."""
        ray = _ray()
        run_id = f"{self.worker_id}-{next(self._runs)}"
        pending = self._actor.generate.remote(run_id, req)
        poll, seen, cancel_sent = self._actor.progress.remote(run_id, 0), 0, False
        while True:
            ready, _ = ray.wait([poll], timeout=POLL_SECONDS)  # the last poll answers when the run ends
            if cancel is not None and cancel.cancelled and not cancel_sent:
                self._actor.cancel.remote(run_id)
                cancel_sent = True
            if poll in ready:
                events, finished = self._get(poll)
                seen += len(events)
                _relay(events, on_step, on_phase)
                if finished:
                    break
                poll = self._actor.progress.remote(run_id, seen)
        outcome = self._get(pending)
        result, data = self._unwrap(outcome)
        return _write_result(result, data, Path(output))

    # ---- parts ---------------------------------------------------------------------------------------

    def _call(self, method: str, *args: object, timeout: float | None = None) -> Any:
        if self._actor is None:
            raise RuntimeError(f"worker {self.worker_id} is not started")
        return self._get(getattr(self._actor, method).remote(*args), timeout)

    def _get(self, ref: Any, timeout: float | None = None) -> Any:
        """ray.get, with the actor's or node's death turned into WorkerLost (a timeout raises
        ray's GetTimeoutError: a slow answer is not a death)."""
        from ray import exceptions as rex

        try:
            return _ray().get(ref, timeout=timeout)
        except (rex.RayActorError, rex.ObjectLostError, rex.NodeDiedError) as exc:
            self._lost = True
            raise WorkerLost(f"worker {self.worker_id} (Ray actor pid {self.pid} on {self.node}) died: {exc}") from exc

    def _unwrap(self, outcome: tuple) -> Any:
        status, value = outcome
        if status == "lost":  # a DeviceFailure: the actor's CUDA context is poisoned, end it
            self.kill()
            raise WorkerLost(f"worker {self.worker_id} (Ray actor pid {self.pid} on {self.node}): {value}")
        if status == "error":
            raise decode_error(value)
        return value

    def _release(self) -> None:
        if self._group is not None:
            from ray.util.placement_group import remove_placement_group

            with contextlib.suppress(Exception):  # the cluster is gone: nothing left to free
                remove_placement_group(self._group)
            self._group = None


def _relay(
    events: list[tuple],
    on_step: Callable[[int, int], None] | None,
    on_phase: Callable[[str, int, int], None] | None,
) -> None:
    for event in events:
        if event[0] == "step" and on_step is not None:
            on_step(event[1], event[2])
        elif event[0] == "phase" and on_phase is not None:
            on_phase(event[1], event[2], event[3])


def _write_result(result: dict, data: bytes, output: Path) -> GenerationResult:
    part = Path(str(output) + ".part")
    with open(part, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(part, output)
    return GenerationResult(**{**result, "path": output, "file_size": len(data)})


def _actor_devices(devices: tuple[str, ...]) -> tuple[str, ...]:
    """Inside the actor Ray's CUDA_VISIBLE_DEVICES shows only its own GPUs, as cuda:0..n-1."""
    gpus = [d for d in devices if d != "cpu"]
    return tuple(f"cuda:{i}" for i in range(len(gpus))) if gpus else ("cpu",)


def _ray() -> Any:
    import ray

    if not ray.is_initialized():
        raise RuntimeError("Ray is not connected: call server.ray_cluster.connect(address) first")
    return ray
