"""fp8 compute on the GPU (pipelines/fp8_compute.py): the tiny model's frames drift against bf16,
its latents too, and the per-step time of each (both eager, so the times compare the matmuls); then
fp8 with compile on (CUDA's default: what a user starts) against fp8 eager. Needs compute
capability 8.9+ (Ada, Hopper, Blackwell); an older card skips these and must refuse the mode at
start-up (last test).

Bounds, as tests/pipelines/test_fp8_compute.py on the CPU: the frames move by less than 10 % of
what changing the seed moves them (the same request on the CPU, fp32 against fp8 compute: 5.2 %);
the latents' relative L2 change stays under 10 % (CPU: 3.6 %, one e4m3 rounding of ~2.6 % per
operand, not compounding over 4 steps).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.device import FP8_MIN_CAPABILITY as MIN_CAPABILITY
from pipelines.engine import Engine
from pipelines.fp8_compute import FP8_COMPUTE, Fp8Linear
from pipelines.request import GenerationRequest

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

REQ = dict(variant="kandinsky5-tiny-t2v", prompt="a red fox", width=128, height=128, num_frames=17, steps=4, seed=1)
fp8_card = pytest.mark.skipif(
    torch.cuda.is_available() and torch.cuda.get_device_capability() < MIN_CAPABILITY,
    reason="fp8 compute needs compute capability 8.9+",
)


@pytest.fixture(scope="module")
def runs(tiny_weights_dir):
    """bf16 and fp8-compute engines, each run twice on the same request (the second run's step
    times are the warm ones), and bf16 on a second seed (the seed gap)."""
    bf16 = Engine(tiny_weights_dir, device="cuda", compile=False)
    fp8 = Engine(tiny_weights_dir, device="cuda", compile=False, fp8_compute=True)
    out = {}
    for name, engine in (("bf16", bf16), ("fp8", fp8)):
        engine.generate_frames(GenerationRequest(**REQ))  # warm-up: CUDA context, kernel selection
        out[name] = engine.generate_frames(GenerationRequest(**REQ))
        out[name + "_latents"] = engine.generate_frames(GenerationRequest(**REQ), decode=False)
    out["seed"] = bf16.generate_frames(GenerationRequest(**{**REQ, "seed": 2}))
    out["pipe"] = fp8.pipeline("kandinsky5-tiny-t2v")
    return out


@fp8_card
def test_frames_and_latents_drift_are_bounded_and_labelled(runs):
    bf16, fp8 = runs["bf16"], runs["fp8"]
    assert fp8.approximations == [FP8_COMPUTE] and bf16.approximations == []
    assert isinstance(runs["pipe"].transformer.visual_transformer_blocks[0].self_attention.to_query, Fp8Linear)
    seed_gap = float(np.abs(bf16.frames - runs["seed"].frames).mean())
    drift = float(np.abs(fp8.frames - bf16.frames).mean())
    a, b = (torch.as_tensor(runs[k + "_latents"].frames).float().cpu() for k in ("bf16", "fp8"))
    latent_drift = float((b - a).norm() / a.norm())
    print(f"fp8 compute on CUDA: frames drift {drift:.4f} ({drift / seed_gap:.1%} of the seed gap {seed_gap:.4f}),")
    print(f"  latents relative L2 {latent_drift:.4f}")
    assert 0 < drift < 0.10 * seed_gap
    assert 0 < latent_drift < 0.10


@fp8_card
def test_per_step_time_is_reported(runs):
    """Reported, not asserted (never a test on wall-clock speed): the tiny model's steps are launch
    bound; bench/fp8_compute.py times the layers at Lite's and Pro's sizes."""
    per_step = {k: float(np.median(runs[k].step_times)) for k in ("bf16", "fp8")}
    print(f"tiny per step: bf16 {per_step['bf16'] * 1e3:.2f} ms, fp8 compute {per_step['fp8'] * 1e3:.2f} ms")
    assert all(t > 0 for t in per_step.values()) and len(runs["fp8"].step_times) == REQ["steps"]


@fp8_card
def test_compiled_blocks_match_eager_fp8(tiny_weights_dir, runs):
    """Regional compile (fullgraph) over the Fp8Linear layers: _scaled_mm through inductor."""
    compiled = Engine(tiny_weights_dir, device="cuda", fp8_compute=True)  # compile: CUDA's default
    done = compiled.generate_frames(GenerationRequest(**REQ))
    assert done.approximations == [FP8_COMPUTE]
    assert np.abs(done.frames - runs["fp8"].frames).max() < 2e-2  # bf16 kernel fusion, as test_gpu.py


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() >= MIN_CAPABILITY,
    reason="only a card before compute capability 8.9 refuses",
)
def test_an_older_card_refuses_at_start_up(tiny_weights_dir):
    with pytest.raises(ValueError, match=r"compute capability 8\.9 or newer"):
        Engine(tiny_weights_dir, device="cuda", fp8_compute=True)
