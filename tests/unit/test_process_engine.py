"""Unit tests: ProcessEngine (server/process_engine.py) with a fake engine in a real spawned worker
process: progress and results cross, a cancel reaches the child at its next step, a death or a
poisoned device raises WorkerLost, a failed set-up says why, and the engine's errors keep their type."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from pipelines.cancel import CancelToken
from pipelines.errors import Cancelled, InvalidRequest, OutOfMemory, WeightsMissing
from pipelines.request import GenerationRequest, resolve
from server.engine_protocol import WorkerLost
from server.process_engine import ProcessEngine
from server.worker_main import LOST_EXIT_CODE, RemoteError, decode_error, encode_error, load_factory

REQ = resolve(GenerationRequest(variant="kandinsky5-tiny-t2v", prompt="a fox", steps=4, seed=3))


def started(monkeypatch, factory: str, **env: str) -> ProcessEngine:
    for name, value in env.items():
        monkeypatch.setenv(name, value)  # the child inherits the environment at spawn
    engine = ProcessEngine("w7", ("cpu",), factory=factory)
    engine.start()
    return engine


@pytest.fixture(scope="module")
def engine():
    """One worker process for the tests that leave it alive (each start costs a spawn)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("K5SERVE_FAKE_STEP_TIME", "0.02")
    engine = ProcessEngine("w0", ("cpu",), factory="fakes:worker_engine")
    engine.start()
    engine.warmup()
    yield engine
    engine.stop()
    mp.undo()
    assert not engine.alive


def test_a_run_crosses_with_its_progress_result_and_what_the_engine_holds(engine, tmp_path):
    assert engine.alive and engine.pid != os.getpid() and engine.node is None
    assert engine.demo and engine.device == "cpu" and "kandinsky5-tiny-t2v" in engine.available()
    steps: list[tuple[int, int]] = []
    result = engine.generate(REQ, tmp_path / "out.mp4", on_step=lambda i, n: steps.append((i, n)))
    assert steps == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert result.seed == 3 and (tmp_path / "out.mp4").stat().st_size == result.file_size
    assert engine.describe()["variants"] == ["kandinsky5-tiny-t2v"]  # as reported after the run
    assert engine.prepare(GenerationRequest(variant="kandinsky5-tiny-t2v", prompt="x")).steps > 0


def test_a_cancel_reaches_the_child_at_its_next_step_and_the_process_lives_on(engine, tmp_path):
    token = CancelToken()
    first = threading.Event()

    def on_step(i: int, n: int) -> None:
        first.set()
        token.cancel()  # seen by the child at its next step

    with pytest.raises(Cancelled):
        engine.generate(REQ, tmp_path / "c.mp4", on_step=on_step, cancel=token)
    assert first.is_set() and engine.alive and not (tmp_path / "c.mp4").exists()
    assert engine.generate(REQ, tmp_path / "d.mp4").steps == 4  # re-armed for the next run


def test_kill_9_mid_run_raises_worker_lost_and_a_restart_serves_again(monkeypatch, tmp_path):
    engine = started(monkeypatch, "fakes:worker_engine", K5SERVE_FAKE_STEP_TIME="0.05")
    engine.warmup()
    pid = engine.pid
    with pytest.raises(WorkerLost, match=rf"worker w7 \(pid {pid}\) on cpu: .*killed by SIGKILL"):
        engine.generate(REQ, tmp_path / "k.mp4", on_step=lambda i, n: os.kill(pid, signal.SIGKILL))
    assert not engine.alive
    engine.start()
    engine.warmup()
    assert engine.pid != pid and engine.generate(REQ, tmp_path / "r.mp4").steps == 4
    engine.stop()


def test_a_device_failure_ends_the_process_and_raises_worker_lost(monkeypatch, tmp_path):
    """A poisoned CUDA context cannot be trusted again: the child reports it and exits."""
    engine = started(monkeypatch, "fakes:failing_worker_engine", K5SERVE_FAKE_FAILURE="device")
    engine.warmup()
    with pytest.raises(WorkerLost, match=r"an illegal memory access.*exit code 70"):
        engine.generate(REQ, tmp_path / "x.mp4")
    assert not engine.alive and LOST_EXIT_CODE == 70


def test_a_failed_set_up_says_why(monkeypatch):
    engine = started(monkeypatch, "fakes:failing_worker_engine", K5SERVE_FAKE_FAILURE="setup")
    with pytest.raises(RuntimeError, match="RuntimeError: no checkpoint here"):
        engine.warmup()


def test_engine_errors_cross_the_pipe_with_their_type_and_fields():
    invalid = decode_error(encode_error(InvalidRequest("steps", 0, "steps must be at least 1")))
    assert isinstance(invalid, InvalidRequest) and (invalid.field, invalid.value) == ("steps", 0)
    missing = decode_error(encode_error(WeightsMissing("kandinsky5-pro-t2v-sft-5s", "/w/x", ["transformer"])))
    assert isinstance(missing, WeightsMissing) and missing.missing == ["transformer"]
    assert isinstance(decode_error(encode_error(OutOfMemory("oom"))), OutOfMemory)
    full = decode_error(encode_error(OSError(28, "No space left on device")))
    assert isinstance(full, OSError) and full.errno == 28
    other = decode_error(encode_error(KeyError("x")))
    assert isinstance(other, RemoteError) and other.name == "KeyError"
    with pytest.raises(ValueError, match="module:function"):
        load_factory("fakes.worker_engine")
