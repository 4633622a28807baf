"""The exact low-memory modes (issue 14): frames identical to the resident fp32 engine on the tiny model.

On the CPU the streaming hooks move weights from the host to the host, but every hook, the
precomputed (host) modulation table and the FFN chunks run on the real code path; each test also
checks its mechanism actually ran (hooks fired, table computed, FFN called in pieces), so a mode
that silently fell back to the resident path fails. CUDA streams and pinned memory are the GPU
tier's (tests/gpu/test_gpu.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.engine import Engine
from pipelines.lean import HostModulation
from pipelines.request import GenerationRequest
from pipelines.streaming import _group_hook, is_streamed

# Two prompts of different lengths: the batched CFG call pads and masks the shorter (denoise.py).
REQ = dict(variant="kandinsky5-tiny-t2v", prompt="a red fox", width=96, height=64, num_frames=9, steps=3, seed=3)


@pytest.fixture(scope="module")
def streamed(tiny_weights_dir):
    return Engine(tiny_weights_dir, device="cpu", memory_mode="stream")


@pytest.fixture(scope="module")
def reference(engine):
    return engine.generate_frames(GenerationRequest(**REQ)).frames


class Counting:
    """Counts calls of `fn` (a bound method or a module's forward), passing them through."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


def test_stream_mode_frames_equal_resident_and_every_mechanism_ran(streamed, reference, monkeypatch):
    pipe = streamed.pipeline("kandinsky5-tiny-t2v")
    tr = pipe.transformer
    blocks = list(tr.visual_transformer_blocks)
    assert is_streamed(tr) and is_streamed(pipe.text_encoder)
    assert all(isinstance(b.visual_modulation, HostModulation) for b in blocks)
    # the streamed groups hold the blocks without their modulations (those stay on the host)
    assert all("visual_modulation" not in n for b in blocks for n, _ in b.named_parameters())

    onloads = [Counting(_group_hook(b).group.onload_) for b in blocks]
    for b, counter in zip(blocks, onloads, strict=True):
        monkeypatch.setattr(_group_hook(b).group, "onload_", counter)
    table = tr._k5_modulations
    computed = Counting(table.modules[0].forward)
    monkeypatch.setattr(table.modules[0], "forward", computed)
    ffn = Counting(blocks[0].feed_forward.in_layer.forward)
    monkeypatch.setattr(blocks[0].feed_forward.in_layer, "forward", ffn)

    done = streamed.generate_frames(GenerationRequest(**REQ))
    assert np.array_equal(done.frames, reference)  # bit for bit
    assert done.memory_plan["mode"] == "stream" and done.memory_plan["ffn_chunks"] == 4
    forwards = done.forwards  # 3 steps, cond+uncond batched: 3 transformer calls
    assert forwards == 3
    assert all(c.calls == forwards for c in onloads)  # each block loaded once per call
    assert computed.calls == forwards  # the table: once per call for all blocks, not once per block
    assert ffn.calls == 4 * forwards  # the FFN ran on 4 pieces of the sequence


def test_stream_text_mode_frames_equal_resident(tiny_weights_dir, reference):
    engine = Engine(tiny_weights_dir, device="cpu", memory_mode="stream_text")
    pipe = engine.pipeline("kandinsky5-tiny-t2v")
    assert is_streamed(pipe.text_encoder) and not is_streamed(pipe.transformer)
    hooked = [m for m in pipe.text_encoder.modules() if _group_hook(m) is not None]
    assert len(hooked) > 10  # leaf by leaf
    assert np.array_equal(engine.generate_frames(GenerationRequest(**REQ)).frames, reference)


def test_stream_mode_magcache_equal_resident(streamed, engine):
    """MagCache's skipped steps run no visual block: the prefetch chain and the table must cope."""
    cached = dict(REQ, steps=6, acceleration="regular")
    a = streamed.generate_frames(GenerationRequest(**cached))
    b = engine.generate_frames(GenerationRequest(**cached))
    assert a.cached_steps == b.cached_steps > 0  # skipped steps reuse the residual, table or not
    assert np.array_equal(a.frames, b.frames)


def test_ffn_chunking_alone_is_exact(engine, reference):
    """The chunking a plan may ask for in any mode (tight fits), on the resident engine."""
    from pipelines.lean import ffn_chunks

    pipe = engine.pipeline("kandinsky5-tiny-t2v")
    with ffn_chunks(pipe.transformer, 3):  # uneven pieces too
        a = engine.generate_frames(GenerationRequest(**REQ)).frames
    assert np.array_equal(a, reference)


def test_compiled_streamed_blocks_equal_eager(tiny_weights_dir, streamed):
    """Regional compile over the offload hooks and the host-modulation lookup needs graph breaks
    (fullgraph=False, what configure_pipeline asks for in stream mode). Dynamo's tracing with the
    hooks is what breaks; the eager backend runs that tracing without inductor's C++ build (the GPU
    tier compiles with inductor)."""
    import torch._dynamo

    engine = Engine(tiny_weights_dir, device="cpu", memory_mode="stream")
    tr = engine.pipeline("kandinsky5-tiny-t2v").transformer
    torch._dynamo.reset()
    tr.compile_repeated_blocks(fullgraph=False, dynamic=True, backend="eager")
    one_step = dict(REQ, steps=1)
    try:
        a = engine.generate_frames(GenerationRequest(**one_step)).frames
        assert all(b._compiled_call_impl is not None for b in tr.visual_transformer_blocks)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
    finally:
        torch._dynamo.reset()
    b = streamed.generate_frames(GenerationRequest(**one_step)).frames
    assert np.array_equal(a, b)


def test_a_cpu_engine_keeps_whole_model_modes_as_resident(tiny_weights_dir):
    """offload_text / offload_model move whole models between CPU and GPU: on a CPU engine there is
    nothing to move, so they load resident; the streaming modes run their hooks (above)."""
    engine = Engine(tiny_weights_dir, device="cpu", memory_mode="offload_model")
    assert engine.placement("kandinsky5-tiny-t2v") == "gpu"
    assert Engine(tiny_weights_dir, device="cpu", memory_mode="stream").placement("kandinsky5-tiny-t2v") == "stream"


def test_modulation_table_is_per_call(streamed):
    """A new time embedding (the next step, or the other CFG branch alone) recomputes the table."""
    tr = streamed.pipeline("kandinsky5-tiny-t2v").transformer
    table = tr._k5_modulations
    a, b = torch.randn(1, 32), torch.randn(1, 32)
    with torch.no_grad():
        ra = table.row(0, a).clone()
        rb = table.row(0, b)
        assert not torch.equal(ra, rb)
        assert torch.equal(table.row(1, b), table.modules[1](b))


def test_the_settings_reach_the_engine(tiny_weights_dir):
    """--memory-mode / --host-memory / --fp8-weights (server/settings.py) -> the engine a worker builds."""
    from server.settings import Settings
    from server.worker_main import build_engine

    s = Settings(weights_dir=tiny_weights_dir, device="cpu", memory_mode="stream", host_memory=8, fp8_weights=True)
    engine = build_engine(["cpu"], **s.engine_options())
    assert engine.memory_mode == "stream" and engine.host_capacity == 8 * 2**30
    assert engine.options.fp8_weights and not engine.options.text_int8
