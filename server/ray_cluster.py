"""Joining a Ray cluster and planning its workers: `k5serve serve --ray-address ADDR`.

Only imported with --ray-address (ray is an optional extra: `pip install 'k5serve[ray]'`).
The front end joins as a Ray driver; the job queue stays in its SQLite store, and Ray only runs
the engines (server/ray_engine.py). Plan: one worker per GPU the cluster has, or one per group of
`sp_degree` GPUs of the same node (a group never spans nodes).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .ray_engine import DEFAULT_FACTORY, RayEngine

TOKEN_FILE = Path.home() / ".ray" / "auth_token"


class RayUnavailable(RuntimeError):
    """--ray-address without the extra installed, or a cluster that cannot be joined or has no GPUs."""


def connect(address: str, **init_kwargs: Any) -> Any:
    """Join the cluster at `address` ("auto": the one `ray start` made on this host) once per
    process; returns the ray module ("local" starts a private one-machine cluster: tests).

    A cluster started by `ray start` (Ray >= 2.60) wants its auth token: joining one with
    ~/.ray/auth_token present and RAY_AUTH_MODE unset switches token mode on. Ray reads that
    variable when it is imported, so this must be the process's first import of ray."""
    joining = address != "local"
    if joining and "RAY_AUTH_MODE" not in os.environ and TOKEN_FILE.is_file() and "ray" not in sys.modules:
        os.environ["RAY_AUTH_MODE"] = "token"
    try:
        import ray
    except ImportError as exc:
        raise RayUnavailable("--ray-address needs Ray: pip install 'k5serve[ray]'") from exc
    if not ray.is_initialized():
        try:
            ray.init(address=address, logging_level="WARNING", log_to_driver=False, **init_kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise RayUnavailable(f"cannot join the Ray cluster at {address!r}: {exc}") from exc
    return ray


def plan(nodes: list[dict], sp_degree: int = 1) -> list[tuple[str, tuple[str, ...]]]:
    """(worker id, devices) for every whole group of `sp_degree` GPUs on each live node.

    `nodes` as ray.nodes() returns them. Devices name how many GPUs a worker takes, not which: Ray
    picks them (the worker's `device` says which, once started). Ids are stable for a layout:
    ray-<node ip>-<k>."""
    if sp_degree < 1:
        raise ValueError(f"sp_degree must be >= 1, got {sp_degree}")
    workers = []
    for node in sorted(nodes, key=lambda n: (n.get("NodeManagerAddress", ""), n.get("NodeID", ""))):
        if not node.get("Alive"):
            continue
        gpus = int(node.get("Resources", {}).get("GPU", 0))
        for k in range(gpus // sp_degree):
            workers.append((f"ray-{node['NodeManagerAddress']}-{k}", tuple(["cuda"] * sp_degree)))
    return workers


def engine_factory(engine_kwargs: dict, factory: str = DEFAULT_FACTORY, **options: Any) -> Callable[[Any], RayEngine]:
    """The worker pool's engine factory: a WorkerSpec (id, devices) -> a RayEngine, not started."""

    def make(spec: Any) -> RayEngine:
        return RayEngine(spec.id, tuple(spec.devices), factory=factory, engine_kwargs=engine_kwargs, **options)

    return make


def workers_for(ray: Any, sp_degree: int, address: str) -> list[tuple[str, tuple[str, ...]]]:
    """The plan for the joined cluster; RayUnavailable when it has no whole group of GPUs."""
    layout = plan(ray.nodes(), sp_degree)
    if not layout:
        total = int(ray.cluster_resources().get("GPU", 0))
        raise RayUnavailable(
            f"the Ray cluster at {address!r} has {total} GPU(s) and no node with {sp_degree} free: "
            "start its nodes with GPUs (ray start --num-gpus N) or lower --sp-degree"
        )
    return layout
