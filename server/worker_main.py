"""The worker process: builds one engine (on a device or a sequence-parallel group) and runs the
jobs its ProcessEngine (process_engine.py) sends it, one at a time, over a pipe.

Torch lives here, in the child, never in the HTTP front end: this module imports nothing heavy at
module level (the front end imports it only to name `main` as the process target).

Messages, child -> parent (tuples: they cross a multiprocessing pipe):
  ("ready", info)            warmed up; info = {demo, device, available, describe}
  ("setup_failed", message)  the engine could not be built or warmed up (nothing will run)
  ("step", i, n) / ("phase", phase, i, n)   progress of the current run
  ("done", GenerationResult, describe) / ("prepared", ResolvedRequest)
  ("error", encoded exception, describe)    the run failed; the process is fine
  ("lost", message)          the device is poisoned (DeviceFailure): the process exits right after,
                             so its CUDA context dies with it and the server starts a fresh one
parent -> child: ("generate", ResolvedRequest, output path), ("prepare", GenerationRequest), ("stop",)
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from pipelines.cancel import ProcessCancelToken
from pipelines.errors import Cancelled, DeviceFailure, InvalidRequest, OutOfMemory, WeightsMissing

log = logging.getLogger("k5serve.worker_process")

DEFAULT_FACTORY = "server.worker_main:build_engine"
LOST_EXIT_CODE = 70  # the process ended itself after a DeviceFailure


def build_engine(devices: list[str], **engine_kwargs: Any):
    """The engine for `devices`: pipelines.group.build_engine (Engine for one device, GroupEngine
    for a sequence-parallel group)."""
    from pipelines.group import build_engine as group_engine

    return group_engine(list(devices), **engine_kwargs)


def load_factory(path: str):
    """ "module:function" -> the function (the engine factory a worker process calls)."""
    module, _, name = path.partition(":")
    if not module or not name:
        raise ValueError(f"an engine factory is 'module:function', got {path!r}")
    return getattr(importlib.import_module(module), name)


def main(conn: Connection, cancel: ProcessCancelToken, factory: str, devices: tuple[str, ...], kwargs: dict) -> None:
    """The process target. Returns (the process exits) on ("stop",) or when the parent is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the server's: it stops us in order
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s worker[{os.getpid()}] %(levelname)s %(message)s")
    try:
        engine = load_factory(factory)(list(devices), **kwargs)
        engine.warmup()
    except Exception as exc:
        log.exception("engine set-up failed on %s", "+".join(devices))
        conn.send(("setup_failed", f"{type(exc).__name__}: {exc}"))
        return
    info = {
        "demo": bool(engine.demo),
        "device": str(engine.device),
        "available": list(engine.available()),
        "describe": engine.describe(),
    }
    conn.send(("ready", info))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the server is gone
            return
        if message[0] == "stop":
            return
        if message[0] == "prepare":
            try:
                conn.send(("prepared", engine.prepare(message[1])))
            except Exception as exc:
                conn.send(("error", encode_error(exc), None))
            continue
        _generate(engine, conn, cancel, message[1], Path(message[2]))


def _generate(engine, conn: Connection, cancel: ProcessCancelToken, request, output: Path) -> None:
    def on_step(i: int, n: int) -> None:
        conn.send(("step", i, n))

    def on_phase(phase: str, i: int, n: int) -> None:
        conn.send(("phase", phase, i, n))

    try:
        result = engine.generate(request, output, on_step=on_step, on_phase=on_phase, cancel=cancel)
    except DeviceFailure as exc:
        log.critical("device failure: this worker process ends (the server starts a fresh one): %s", exc)
        conn.send(("lost", str(exc)))
        conn.close()
        os._exit(LOST_EXIT_CODE)
    except Exception as exc:
        conn.send(("error", encode_error(exc), _describe(engine)))
        return
    conn.send(("done", result, _describe(engine)))


def _describe(engine) -> dict | None:
    try:
        return engine.describe()
    except Exception:  # a report must not lose the result
        log.warning("describe() failed", exc_info=True)
        return None


# Exceptions cross the pipe as data: the engine's own ones take arguments pickle does not replay.
def encode_error(exc: BaseException) -> tuple:
    if isinstance(exc, Cancelled):
        return ("cancelled", str(exc))
    if isinstance(exc, InvalidRequest):
        return ("invalid", exc.field, _plain(exc.value), exc.message)
    if isinstance(exc, WeightsMissing):
        return ("weights", exc.variant, exc.path, list(exc.missing))
    if isinstance(exc, OutOfMemory):
        return ("oom", str(exc))
    if isinstance(exc, OSError):
        return ("os", exc.errno, exc.strerror or str(exc))
    return ("other", type(exc).__name__, str(exc))


def decode_error(data: tuple) -> Exception:
    kind = data[0]
    if kind == "cancelled":
        return Cancelled(data[1])
    if kind == "invalid":
        return InvalidRequest(data[1], data[2], data[3])
    if kind == "weights":
        return WeightsMissing(data[1], data[2], data[3])
    if kind == "oom":
        return OutOfMemory(data[1])
    if kind == "os":
        return OSError(data[1], data[2])
    return RemoteError(data[1], data[2])


class RemoteError(RuntimeError):
    """An exception of another type raised in the worker process; `name` is its class name."""

    def __init__(self, name: str, message: str):
        super().__init__(f"{name}: {message}")
        self.name = name


def _plain(value: object) -> object:
    return value if value is None or isinstance(value, (str, int, float, bool)) else repr(value)
