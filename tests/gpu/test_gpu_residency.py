"""GPU tier for residency (pipelines/residency.py): an evicted transformer waits in pinned host
RAM and comes back to the GPU as the same module, computing the same latents. `pytest -m gpu`."""

from __future__ import annotations

import pytest
import torch

from pipelines import memory
from pipelines.engine import Engine
from pipelines.request import GenerationRequest
from pipelines.tiny import ensure_tiny_family
from pipelines.variants import TINY_T2V

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

LITES = ["kandinsky5-lite-t2v-nocfg-5s", "kandinsky5-lite-t2v-distilled-5s"]
OPTS = dict(device="cuda", compile=False, cfg_batch=False, memory_mode="gpu")


def test_evicted_transformer_is_pinned_on_the_host_and_swaps_back(tiny_weights_dir, tmp_path):
    ensure_tiny_family(tmp_path, LITES, tiny_weights_dir / TINY_T2V)
    req = {n: GenerationRequest(variant=n, prompt="a fox", width=512, height=512, num_frames=1, steps=1, seed=2)
           for n in LITES}  # fmt: skip
    probe = Engine(tmp_path, **OPTS)
    resolved = {n: probe.prepare(r) for n, r in req.items()}
    probe.pipeline(LITES[0])
    transformer_bytes = probe.describe()["resident"][0]["bytes"]
    peak = max(probe.memory_plan(r).peak for r in resolved.values())
    engine = Engine(tmp_path, device_memory=memory.CONTEXT_RESERVE + peak + transformer_bytes // 2, **OPTS)

    first = engine.generate_frames(resolved[LITES[0]], decode=False).frames
    transformer = engine.pipeline(LITES[0]).transformer
    engine.generate_frames(resolved[LITES[1]], decode=False)
    params = list(transformer.parameters())
    assert all(p.device.type == "cpu" and p.is_pinned() for p in params)
    again = engine.generate_frames(resolved[LITES[0]], decode=False).frames
    assert engine.pipeline(LITES[0]).transformer is transformer
    assert all(p.device.type == "cuda" for p in transformer.parameters())
    counters = engine.describe()["counters"]
    assert counters["swaps"] == 1 and counters["loads"] == 5 and counters["swap_seconds"] > 0
    assert torch.equal(first, again)
