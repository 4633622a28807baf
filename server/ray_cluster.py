"""Joining a Ray cluster and planning its workers: `k5serve serve --ray-address ADDR`.

Only imported with --ray-address (ray is an optional extra: `pip install 'k5serve[ray]'`).
The front end joins as a Ray driver; the job queue stays in its SQLite store, and Ray only runs
the engines (server/ray_engine.py). Plan: one worker per GPU the cluster has, or one per group of
`sp_degree` GPUs of the same node (a group never spans nodes).
"""

from __future__ import annotations

import ipaddress
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from .devices import WorkerSpec
from .pool import FrontEngine, Workers
from .ray_engine import RayEngine

CURRENT_CLUSTER = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
TOKEN_FILE = Path.home() / ".ray" / "auth_token"  # what `ray get-auth-token --generate` writes
LOOPBACK_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray keeps every address on loopback


class RayUnavailable(RuntimeError):
    """--ray-address without the extra installed, or a cluster that cannot be joined or has no GPUs."""


def connect(address: str, **init_kwargs: Any) -> Any:
    """Join the cluster at `address` ("auto": the one `ray start` made on this host) once per
    process; returns the ray module ("local" starts a private one-machine cluster: tests).

    A head bound to loopback (one workstation: docs/scale-out.md) is only reachable by a driver
    that also stays on loopback: Ray otherwise looks for it at the host's outward address. So for
    a loopback address (or "auto" naming one) this sets RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, which
    Ray reads when it is imported: this must be the process's first import of ray.

    Token auth: Ray turns it on for "auto" when ~/.ray/auth_token exists, but not for an explicit
    address (its driver then fails with InvalidAuthToken); with the file present and RAY_AUTH_MODE
    unset, token mode is switched on here for every address."""
    if "ray" not in sys.modules:
        if _loopback(address):
            os.environ.setdefault(LOOPBACK_SWITCH, "0")
        if address != "local" and TOKEN_FILE.is_file():
            os.environ.setdefault("RAY_AUTH_MODE", "token")
    try:
        import ray
    except ImportError as exc:
        raise RayUnavailable("--ray-address needs Ray: pip install 'k5serve[ray]'") from exc
    if not ray.is_initialized():
        # ray.init makes SIGTERM exit with status 15; the server's own shutdown (uvicorn, then the
        # pool stopping its actors) should end as it does without Ray, so the handler is put back.
        main = threading.current_thread() is threading.main_thread()
        sigterm = signal.getsignal(signal.SIGTERM) if main else None
        try:
            ray.init(address=address, logging_level="WARNING", log_to_driver=False, **init_kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise RayUnavailable(f"cannot join the Ray cluster at {address!r}: {exc}") from exc
        finally:
            if main:
                signal.signal(signal.SIGTERM, sigterm)
    return ray


def _loopback(address: str) -> bool:
    """Is `address` (host:port, ray://host:port, or "auto") a head on this host's loopback?"""
    if address == "auto":
        try:  # where `ray start` on this host wrote its head's address
            address = CURRENT_CLUSTER.read_text().strip()
        except OSError:
            return False
    host = address.split("://")[-1].rsplit(":", 1)[0].strip("[]")
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def plan(nodes: list[dict], sp_degree: int = 1) -> list[tuple[str, tuple[str, ...]]]:
    """(worker id, devices) for every whole group of `sp_degree` GPUs on each live node.

    `nodes` as ray.nodes() returns them. Devices name how many GPUs a worker takes, not which: Ray
    picks them (the worker's `device` says which, once started). Ids are stable for a layout:
    ray-<node ip>-<k>, with the node's id in between where several nodes share an IP (one host)."""
    if sp_degree < 1:
        raise ValueError(f"sp_degree must be >= 1, got {sp_degree}")
    live = sorted((n for n in nodes if n.get("Alive")), key=lambda n: (n["NodeManagerAddress"], n["NodeID"]))
    ips = [n["NodeManagerAddress"] for n in live]
    workers = []
    for node in live:
        ip = node["NodeManagerAddress"]
        name = ip if ips.count(ip) == 1 else f"{ip}-{node['NodeID'][:8]}"
        for k in range(int(node.get("Resources", {}).get("GPU", 0)) // sp_degree):
            workers.append((f"ray-{name}-{k}", tuple(["cuda"] * sp_degree)))
    return workers


def workers_for(ray: Any, sp_degree: int, address: str) -> list[tuple[str, tuple[str, ...]]]:
    """The plan for the joined cluster; RayUnavailable when it has no whole group of GPUs."""
    layout = plan(ray.nodes(), sp_degree)
    if not layout:
        total = int(ray.cluster_resources().get("GPU", 0))
        raise RayUnavailable(
            f"the Ray cluster at {address!r} has {total} GPU(s) and no node with {sp_degree} GPUs: "
            "start its nodes with GPUs (ray start --num-gpus N) or lower --sp-degree"
        )
    return layout


def ray_workers(settings: Any) -> Workers:
    """`k5serve serve --ray-address`: join the cluster and lay out one worker per GPU (or per group
    of --sp-degree GPUs on one node), each a RayEngine that builds settings.engine_factory's engine
    in its actor. Admission stays here (FrontEngine): it reads the weights folder at the same path
    as the actors, and has no device memory to plan against (the GPUs are elsewhere). Raises
    RayUnavailable (no extra, no cluster, no GPUs), ValueError or WeightsMissing like local_workers."""
    from pipelines.placement import Placement
    from pipelines.preparer import Preparer
    from pipelines.sources import WeightsFolder

    if settings.devices is not None:
        raise ValueError(
            "--devices and --ray-address exclude each other: with Ray the workers go to the cluster's GPUs"
        )
    ray = connect(settings.ray_address)
    specs = [
        WorkerSpec(worker_id, devices)
        for worker_id, devices in workers_for(ray, settings.sp_degree, settings.ray_address)
    ]
    options = settings.engine_options()

    def factory(spec: WorkerSpec) -> RayEngine:
        return RayEngine(spec.id, spec.devices, factory=settings.engine_factory, engine_kwargs=options)

    preparer = Preparer(
        WeightsFolder(settings.weights_dir), Placement(None, settings.memory_mode), settings.models,
        settings.require_weights, str(settings.weights_dir),
    )  # fmt: skip
    device = f"ray:{settings.ray_address} ({len(specs)} workers)"
    return Workers(specs, factory, FrontEngine(preparer, device=device))
