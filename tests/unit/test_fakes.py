"""The fake engine itself, one behaviour each, so the server tests built on it can trust it."""

from __future__ import annotations

import errno
import inspect
import logging
import threading
from dataclasses import replace
from pathlib import Path

import pytest
from fakes import FakeEngine, PauseAfterSubmit, engine_from_env, fake_video_bytes, out_of_memory, pause

from pipelines.errors import Cancelled, InvalidRequest, OutOfMemory
from pipelines.request import CancelToken, GenerationRequest, resolve
from server.engine_protocol import EngineLike

REQ = GenerationRequest(variant="kandinsky5-lite-t2v-sft-5s", prompt="a red fox", steps=3, seed=11)


def run(engine: FakeEngine, folder: Path, req=REQ, name: str = "out.mp4", **kwargs):
    return engine.generate(req, folder / name, **kwargs)


class Steps:
    def __init__(self):
        self.seen: list[tuple[int, int]] = []

    def __call__(self, i: int, n: int) -> None:
        self.seen.append((i, n))


# -- the protocol ---------------------------------------------------------------------------------------


def test_the_fake_has_every_member_of_the_servers_engine_protocol_with_the_same_parameters():
    members = set(EngineLike.__annotations__) | {n for n in vars(EngineLike) if not n.startswith("_")}
    engine = FakeEngine()
    for name in members:
        assert hasattr(engine, name), name
        wanted = getattr(EngineLike, name, None)
        if callable(wanted):
            assert list(inspect.signature(getattr(FakeEngine, name)).parameters) == list(
                inspect.signature(wanted).parameters
            ), name
    assert {"available", "memory_in_use"} <= {n for n in dir(engine) if callable(getattr(engine, n))}


def test_a_resolved_request_runs_exactly_as_given(tmp_path):
    """Not resolved again: a full-size Lite request (prepare would shrink it to the tiny model)
    runs as Lite at its own size, with its own seed."""
    engine = FakeEngine()
    r = replace(resolve(REQ), seed=5)
    result = run(engine, tmp_path, req=r)
    assert engine.resolved == [r] and engine.resolved[0] is r
    assert (result.variant, result.width, result.height, result.seed) == (r.variant.name, r.width, r.height, 5)
    assert result.variant == "kandinsky5-lite-t2v-sft-5s" and result.demo is False


def test_a_raw_request_is_resolved_by_prepare_to_the_tiny_model(tmp_path):
    engine = FakeEngine()
    result = run(engine, tmp_path)
    assert result.variant == "kandinsky5-tiny-t2v" and result.demo is True
    assert engine.resolved[0] == engine.prepare(REQ)


def test_prepare_refuses_bad_input_naming_the_value():
    with pytest.raises(InvalidRequest, match="steps"):
        FakeEngine().prepare(replace(REQ, steps=0))


def test_calls_record_the_request_as_asked_with_the_seed_it_ran_with(tmp_path):
    engine = FakeEngine()
    seedless = GenerationRequest(variant="kandinsky5-lite-t2v-sft-5s", prompt="a red fox", steps=2)
    r = resolve(seedless)
    run(engine, tmp_path, req=r)
    (call,) = engine.calls
    assert call == replace(seedless, seed=r.seed)  # unresolved fields stay None
    assert call.variant == "kandinsky5-lite-t2v-sft-5s" and call.width is None


def test_the_video_is_deterministic_per_resolved_request_and_written_whole(tmp_path):
    engine = FakeEngine()
    first = run(engine, tmp_path, name="a.mp4", req=resolve(REQ))
    again = run(engine, tmp_path, name="b.mp4", req=resolve(REQ))
    other = run(engine, tmp_path, name="c.mp4", req=resolve(replace(REQ, seed=12)))
    a, b, c = (p.path.read_bytes() for p in (first, again, other))
    assert a == b == fake_video_bytes(resolve(REQ)) and a != c
    assert a[4:8] == b"ftyp" and first.file_size == len(a)
    assert list(tmp_path.glob("*.part")) == []


def test_memory_in_use_is_not_measured_unless_given():
    assert FakeEngine().memory_in_use() is None
    assert FakeEngine(memory_bytes=123456789).memory_in_use() == 123456789


def test_demo_and_device_are_parameters_and_a_subclass_may_set_them():
    class NotDemo(FakeEngine):
        demo = False

    assert (FakeEngine().demo, FakeEngine().device) == (True, "cpu")
    assert (FakeEngine(demo=False, device="cuda:1").demo, FakeEngine(device="cuda:1").device) == (False, "cuda:1")
    assert NotDemo().demo is False


def test_warmup_raises_the_given_error():
    FakeEngine().warmup()
    with pytest.raises(RuntimeError, match="no device"):
        FakeEngine(warmup_error=RuntimeError("no device")).warmup()


# -- steps and cancel -------------------------------------------------------------------------------------


def test_steps_are_reported_and_counted(tmp_path):
    engine, steps = FakeEngine(), Steps()
    run(engine, tmp_path, on_step=steps)
    assert steps.seen == [(1, 3), (2, 3), (3, 3)] and engine.steps_run == [3]


def test_a_cancel_stops_at_the_next_step_boundary_and_writes_nothing(tmp_path):
    engine, token = FakeEngine(), CancelToken()
    with pytest.raises(Cancelled):
        run(engine, tmp_path, req=replace(REQ, steps=10), on_step=lambda i, n: i == 2 and token.cancel(), cancel=token)
    assert engine.steps_run == [2] and list(tmp_path.iterdir()) == []


# -- failures ---------------------------------------------------------------------------------------------


def test_fail_raises_before_the_first_step_and_still_records_the_call(tmp_path):
    engine, steps = FakeEngine(fail=OutOfMemory("oom")), Steps()
    with pytest.raises(OutOfMemory):
        run(engine, tmp_path, on_step=steps)
    assert steps.seen == [] and engine.steps_run == [0] and len(engine.calls) == 1
    assert list(tmp_path.iterdir()) == []


def test_fail_at_step_raises_after_that_many_steps(tmp_path):
    engine, steps = FakeEngine(fail=RuntimeError("boom"), fail_at_step=2), Steps()
    with pytest.raises(RuntimeError, match="boom"):
        run(engine, tmp_path, on_step=steps)
    assert steps.seen == [(1, 3), (2, 3)]


def test_fail_times_fails_only_the_first_calls(tmp_path):
    engine = out_of_memory(times=2)
    outcomes = []
    for i in range(4):
        try:
            run(engine, tmp_path, name=f"{i}.mp4")
            outcomes.append("ok")
        except OutOfMemory:
            outcomes.append("oom")
    assert outcomes == ["oom", "oom", "ok", "ok"] and len(engine.calls) == 4


def test_a_write_error_strikes_with_half_the_file_on_disk_and_no_output(tmp_path):
    engine = FakeEngine(write_error=OSError(errno.ENOSPC, "No space left on device"), fail_times=1)
    with pytest.raises(OSError, match="No space"):
        run(engine, tmp_path)
    (part,) = tmp_path.glob("*.part")
    assert 0 < part.stat().st_size < len(fake_video_bytes(engine.resolved[0]))
    assert not (tmp_path / "out.mp4").exists()
    part.unlink()
    assert run(engine, tmp_path).path.exists()  # fail_times=1: the next call writes


# -- big videos -------------------------------------------------------------------------------------------


def test_big_bytes_pads_only_the_chosen_calls(tmp_path):
    engine = FakeEngine(big_bytes=1 << 20, big_calls={2})
    sizes = [run(engine, tmp_path, name=f"{i}.mp4").path.stat().st_size for i in range(3)]
    assert sizes[1] == 1 << 20 and sizes[0] == sizes[2] < 1 << 20


def test_big_bytes_without_calls_pads_every_call(tmp_path):
    engine = FakeEngine(big_bytes=4096)
    assert [run(engine, tmp_path, name=f"{i}.mp4").file_size for i in range(2)] == [4096, 4096]


# -- kill points ------------------------------------------------------------------------------------------


def start(engine: FakeEngine, folder: Path, name: str, **kwargs) -> tuple[threading.Thread, list]:
    outcome: list = []

    def target() -> None:
        try:
            outcome.append(run(engine, folder, name=name, **kwargs))
        except Exception as exc:
            outcome.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


def wait_for(path: Path, timeout: float = 10) -> bool:
    event = threading.Event()
    for _ in range(int(timeout / 0.01)):
        if path.exists():
            return True
        event.wait(0.01)
    return False


@pytest.fixture
def pause_dir(tmp_path) -> Path:
    folder = tmp_path / "pause"
    folder.mkdir()
    return folder


def test_pause_at_step_stops_only_the_chosen_call_after_its_first_step(tmp_path, pause_dir):
    engine = FakeEngine(pause_at="step", pause_calls={2}, pause_dir=pause_dir)
    thread, outcome = start(engine, tmp_path, "1.mp4")
    thread.join(10)
    assert outcome[0].path.exists() and not (pause_dir / "paused-step").exists()  # call 1 is not chosen

    steps = Steps()
    thread, outcome = start(engine, tmp_path, "2.mp4", on_step=steps)
    assert wait_for(pause_dir / "paused-step")
    thread.join(0.2)
    assert thread.is_alive() and steps.seen == [(1, 3)]
    (pause_dir / "release").touch()
    thread.join(10)
    assert outcome[0].path.exists() and steps.seen[-1] == (3, 3)


def test_pause_at_write_holds_half_a_part_file_until_released(tmp_path, pause_dir):
    engine = FakeEngine(pause_at="write", pause_dir=pause_dir)
    thread, outcome = start(engine, tmp_path, "out.mp4")
    assert wait_for(pause_dir / "paused-write")
    (part,) = tmp_path.glob("*.part")
    assert part.stat().st_size > 0 and not (tmp_path / "out.mp4").exists()
    (pause_dir / "release").touch()
    thread.join(10)
    assert outcome[0].path.read_bytes() == fake_video_bytes(engine.resolved[0])


def test_a_paused_call_can_be_cancelled(tmp_path, pause_dir):
    engine, token = FakeEngine(pause_at={"step", "write"}, pause_dir=pause_dir), CancelToken()
    thread, outcome = start(engine, tmp_path, "out.mp4", cancel=token)
    assert wait_for(pause_dir / "paused-step")
    token.cancel()
    thread.join(10)
    assert isinstance(outcome[0], Cancelled)


def test_pause_options_are_checked():
    with pytest.raises(ValueError, match="needs a pause_dir"):
        FakeEngine(pause_at="step")
    with pytest.raises(ValueError, match="decode"):
        FakeEngine(pause_at="decode", pause_dir=Path("."))
    with pytest.raises(ValueError, match="pause_calls"):
        FakeEngine(pause_at="step", pause_calls={0}, pause_dir=Path("."))


def test_nothing_depends_on_the_prompt(tmp_path):
    engine = FakeEngine()
    result = run(engine, tmp_path, req=replace(REQ, prompt="[big] [pause-step] [pause-write]"))
    assert result.file_size == len(fake_video_bytes(engine.resolved[0]))


# -- the child server's engine ----------------------------------------------------------------------------


def test_engine_from_env_sets_the_same_parameters(pause_dir):
    env = {
        "K5SERVE_FAKE_STEP_TIME": "0.5",
        "K5SERVE_FAKE_BIG_BYTES": "4096",
        "K5SERVE_FAKE_BIG_CALLS": "1",
        "K5SERVE_FAKE_PAUSE_DIR": str(pause_dir),
        "K5SERVE_FAKE_PAUSE_AT": "step,write",
        "K5SERVE_FAKE_PAUSE_CALLS": "1,3",
        "K5SERVE_FAKE_MEMORY_BYTES": "1000",
    }
    jobs_log = logging.getLogger("k5serve.jobs")
    before = list(jobs_log.handlers)
    try:
        engine = engine_from_env(env)
        assert [type(h) for h in jobs_log.handlers if h not in before] == [PauseAfterSubmit]  # the submit point
    finally:
        jobs_log.handlers[:] = before
    assert (engine.step_time, engine.big_bytes, engine.big_calls) == (0.5, 4096, {1})
    assert (engine.pause_at, engine.pause_calls, engine.pause_dir) == ({"step", "write"}, {1, 3}, pause_dir)
    assert engine.memory_in_use() == 1000


def test_engine_from_env_defaults_to_a_plain_engine():
    engine = engine_from_env({})
    assert (engine.step_time, engine.big_bytes, engine.pause_at, engine.pause_dir) == (0.05, 0, set(), None)
    assert engine.memory_in_use() is None


def test_a_pause_nobody_releases_times_out(pause_dir):
    with pytest.raises(TimeoutError, match="'step'"):
        pause(pause_dir, "step", timeout=0.05)
