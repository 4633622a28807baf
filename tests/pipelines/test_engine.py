"""The Engine's protocol with the server and its parts, on the tiny pipelines on CPU: what runs is
what was admitted, stage timings, memory reporting, pipelines served from memory, any Cancellation."""

from __future__ import annotations

import dataclasses
import inspect
import multiprocessing
import time

import numpy as np
import pytest
import torch

from pipelines.cancel import ProcessCancelToken
from pipelines.engine import Engine
from pipelines.errors import Cancelled
from pipelines.request import GenerationRequest
from pipelines.sources import InMemoryPipelines

T2V = "kandinsky5-tiny-t2v"
STAGES = {"load", "encode_prompt", "denoise", "decode", "write"}


def t2v(**kw) -> GenerationRequest:
    args = dict(variant=T2V, prompt="a red fox running through snow", width=64, height=64, num_frames=9, steps=3)
    return GenerationRequest(**{**args, "seed": 7, **kw})


# ---- the protocol the server calls ----------------------------------------------------------


def test_engine_has_exactly_what_the_server_calls(engine):
    assert isinstance(engine.demo, bool) and isinstance(engine.device, str)
    for name in ("available", "prepare", "generate", "warmup", "memory_in_use"):
        assert callable(getattr(engine, name)), name
    generate = inspect.signature(Engine.generate).parameters
    assert list(generate)[:3] == ["self", "req", "output"]
    assert generate["on_step"].kind is generate["cancel"].kind is inspect.Parameter.KEYWORD_ONLY


def test_memory_in_use_is_none_on_the_cpu_not_zero(engine):
    engine.pipeline(T2V)
    assert engine.memory_in_use() is None  # "not measured here", never a fake 0


# ---- what runs is what was admitted ---------------------------------------------------------


def test_an_admitted_request_runs_as_it_is_never_resolved_again(engine, tmp_path):
    """The server stores `prepare()`'s result at admission; the engine must run exactly that. Here
    the stored request says 2 steps while its original asked for 3, and its seed was drawn at
    admission: resolving `requested` again would run 3 steps with a new random seed."""
    admitted = engine.prepare(t2v(seed=None))
    stored = dataclasses.replace(admitted, steps=2)
    seen = []
    result = engine.generate(stored, tmp_path / "a.mp4", on_step=lambda i, n: seen.append((i, n)))
    assert seen == [(1, 2), (2, 2)]
    assert result.steps == 2 and result.seed == admitted.seed


# ---- stage timings ------------------------------------------------------------------------------


def test_timings_are_the_five_stages_once_each(engine, tmp_path):
    """One clock times every stage; the stages do not overlap, so their sum is at most the wall
    time (a total reported as a stage of its own, like the old "pipeline", would break that)."""
    t0 = time.perf_counter()
    result = engine.generate(t2v(), tmp_path / "t.mp4")
    wall = time.perf_counter() - t0
    assert set(result.timings) == STAGES
    assert all(t > 0 for t in result.timings.values())
    assert sum(result.timings.values()) <= wall
    assert len(result.step_times) == 3 and sum(result.step_times) <= result.timings["denoise"]


def test_warm_up_runs_stop_before_the_decode(engine):
    done = engine.generate_frames(t2v(), decode=False)
    assert "decode" not in done.timings and set(done.timings) == STAGES - {"decode", "write"}
    assert done.frames.shape[:2] == (1, 3)  # latents: (batch, latent frames, H/8, W/8, channels)


# ---- pipelines built in memory (bench/generate.py --full) ---------------------------------------


def test_in_memory_pipelines_are_configured_once_and_served_like_loaded_ones(engine, tiny_weights_dir, tmp_path):
    """A stock pipeline built in this process, handed over through `source=`: the engine configures
    it as it would one from disk (batched CFG with masked attention: the same frames, bit for bit,
    as the disk-loaded engine) and a second engine on the same source serves the same modules."""
    from diffusers import Kandinsky5T2VPipeline

    built = Kandinsky5T2VPipeline.from_pretrained(tiny_weights_dir / T2V, dtype=torch.float32)
    source = InMemoryPipelines({T2V: built})
    first = Engine(tmp_path / "no-weights", device="cpu", source=source)
    assert first.loaded() == []
    frames = first.generate_frames(t2v(negative_prompt=None)).frames
    assert first.loaded() == [T2V] and first.pipeline(T2V) is built
    assert np.array_equal(frames, engine.generate_frames(t2v(negative_prompt=None)).frames)
    second = Engine(tmp_path / "no-weights", device="cpu", source=source, cfg_batch=False)
    assert second.pipeline(T2V) is built
    assert not (tmp_path / "no-weights").exists()  # no checkpoint folder was needed or made


def test_in_memory_real_variant_is_served_not_demo(tiny_weights_dir, tmp_path):
    from diffusers import Kandinsky5T2VPipeline

    lite = "kandinsky5-lite-t2v-sft-5s"
    built = Kandinsky5T2VPipeline.from_pretrained(tiny_weights_dir / T2V, dtype=torch.float32)
    served = Engine(tmp_path, device="cpu", models=[lite], source=InMemoryPipelines({lite: built}))
    assert not served.demo and served.present == [lite]
    r = served.prepare(GenerationRequest(variant=lite, prompt="a fox", num_frames=5, steps=1))
    assert not r.demo and r.variant.name == lite


def test_an_unknown_in_memory_variant_is_refused():
    with pytest.raises(ValueError, match="kandinsky5-huge"):
        InMemoryPipelines({"kandinsky5-huge": object()})


# ---- any Cancellation -------------------------------------------------------------------------


def test_a_process_token_cancels_a_generation(engine, tmp_path):
    token = ProcessCancelToken(multiprocessing.get_context("spawn"))
    seen = []

    def on_step(i, n):
        seen.append(i)
        if i == 2:
            token.cancel()

    with pytest.raises(Cancelled):
        engine.generate(t2v(steps=5), tmp_path / "c.mp4", on_step=on_step, cancel=token)
    assert seen == [1, 2] and not list(tmp_path.iterdir())
