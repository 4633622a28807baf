"""CFG batching and MagCache step caching (pipelines/denoise.py) on the tiny pipelines, CPU, fp32.

Batched: cond and uncond in one transformer call per step. It must give the sequential output:
bit-identical when the two prompts have the same token count (no padding), and within 1e-4 on
frames in [0, 1] when the shorter text is padded and masked (fp32 rounding of the masked softmax).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.denoise import MagCache, StepRunner, magcache_for, transformer_forward
from pipelines.engine import Engine
from pipelines.mag_ratios import MAG_RATIOS
from pipelines.request import GenerationRequest

T2V = "kandinsky5-tiny-t2v"
I2V = "kandinsky5-tiny-i2v"
PROMPT = "a red fox running through snow"
SAME_LENGTH_NEGATIVE = "a red cat running through snow"  # 6 tokens, like PROMPT (checked below)
BATCHED_ATOL = 1e-4


@pytest.fixture(scope="module")
def batched(tiny_weights_dir):
    return Engine(tiny_weights_dir, device="cpu", cfg_batch=True)


@pytest.fixture(scope="module")
def sequential(tiny_weights_dir):
    return Engine(tiny_weights_dir, device="cpu", cfg_batch=False)


def t2v(**kw) -> GenerationRequest:
    args = dict(variant=T2V, prompt=PROMPT, width=64, height=64, num_frames=9, steps=4, seed=3)
    return GenerationRequest(**{**args, **kw})


def i2v(image, **kw) -> GenerationRequest:
    args = dict(variant=I2V, prompt="a red fox", image=str(image), width=64, height=64, num_frames=17, steps=3, seed=3)
    return GenerationRequest(**{**args, **kw})


class ForwardCounter:
    """Counts real transformer evaluations and their batch sizes (the output layer runs once each)."""

    def __init__(self, pipe):
        self.batches: list[int] = []
        self._hooks = [
            pipe.transformer.out_layer.register_forward_hook(lambda _m, args, _o: self.batches.append(args[0].shape[0]))
        ]
        self.visual_blocks = 0
        block = pipe.transformer.visual_transformer_blocks[0]
        self._hooks.append(block.register_forward_hook(lambda *_: self._count_block()))

    def _count_block(self):
        self.visual_blocks += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()


def run(engine, req, name=T2V):
    with ForwardCounter(engine.pipeline(name)) as counter:
        done = engine.generate_frames(req)
    return done.frames, counter, done


def test_same_length_prompts_batched_is_bit_identical_and_one_call_per_step(batched, sequential):
    pipe = batched.pipeline(T2V)
    lengths = [len(pipe.tokenizer(p)["input_ids"]) for p in (PROMPT, SAME_LENGTH_NEGATIVE)]
    assert lengths[0] == lengths[1]  # precondition: no padding needed
    req = t2v(negative_prompt=SAME_LENGTH_NEGATIVE)
    a, count_a, info_a = run(batched, req)
    b, count_b, info_b = run(sequential, req)
    assert np.array_equal(a, b)
    assert count_a.batches == [2] * 4 and info_a.batched_steps == 4  # one call of batch 2 per step
    assert count_b.batches == [1] * 8 and info_b.batched_steps == 0  # stock: two calls per step


@pytest.mark.parametrize("negative", [None, "blurry", "bright colours, sunshine, a very long negative prompt"])
def test_t2v_batched_equals_sequential_with_padding(batched, sequential, negative):
    req = t2v(negative_prompt=negative)
    a, count_a, _ = run(batched, req)
    b, count_b, _ = run(sequential, req)
    np.testing.assert_allclose(a, b, rtol=0, atol=BATCHED_ATOL)
    assert len(count_a.batches) == 4 and len(count_b.batches) == 8


def test_i2v_batched_equals_sequential(batched, sequential, test_image):
    a, count_a, _ = run(batched, i2v(test_image), I2V)
    b, count_b, _ = run(sequential, i2v(test_image), I2V)
    assert np.isfinite(a).all()
    np.testing.assert_allclose(a, b, rtol=0, atol=BATCHED_ATOL)
    assert count_a.batches == [2] * 3 and count_b.batches == [1] * 6


def test_guidance_one_is_one_call_per_step_unbatched(batched):
    _, counter, info = run(batched, t2v(guidance=1.0))
    assert counter.batches == [1] * 4 and info.batched_steps == 0


def test_transformer_level_batched_output_matches_each_single_call(batched):
    """One batched call == the two batch-1 calls, on random inputs with different text lengths."""
    tr = batched.pipeline(T2V).transformer
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 8, 8, 33, generator=g)
    cond, neg = torch.randn(1, 11, 32, generator=g), torch.randn(1, 5, 32, generator=g)
    pc, pn = torch.randn(1, 32, generator=g), torch.randn(1, 32, generator=g)
    t = torch.tensor([700.0])
    rope = [torch.arange(3), torch.arange(4), torch.arange(4)]
    runner = StepRunner(tr, negative=(neg, pn), batch_cfg=True)
    with torch.no_grad(), runner.install():
        out_c = tr(x, cond, t, pc, rope, torch.arange(11), return_dict=False)[0]
        out_u = tr(x, neg, t, pn, rope, torch.arange(5), return_dict=False)[0]
        ref_c, _ = transformer_forward(tr, x, cond, t, pc, rope, torch.arange(11))
        ref_u, _ = transformer_forward(tr, x, neg, t, pn, rope, torch.arange(5))
    assert runner.forwards == 1 and runner.batched == 1
    torch.testing.assert_close(out_c, ref_c, rtol=0, atol=1e-5)
    torch.testing.assert_close(out_u, ref_u, rtol=0, atol=1e-5)


def test_uncond_call_for_other_latents_is_computed_not_taken_from_the_batch(batched):
    tr = batched.pipeline(T2V).transformer
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(1, 3, 8, 8, 33, generator=g), torch.randn(1, 3, 8, 8, 33, generator=g)
    cond, neg = torch.randn(1, 7, 32, generator=g), torch.randn(1, 7, 32, generator=g)
    pc, pn = torch.randn(1, 32, generator=g), torch.randn(1, 32, generator=g)
    t = torch.tensor([300.0])
    rope = [torch.arange(3), torch.arange(4), torch.arange(4)]
    runner = StepRunner(tr, negative=(neg, pn), batch_cfg=True)
    with torch.no_grad(), runner.install():
        tr(x, cond, t, pc, rope, torch.arange(7))
        out = tr(y, neg, t, pn, rope, torch.arange(7)).sample  # different latents: must not reuse
        ref, _ = transformer_forward(tr, y, neg, t, pn, rope, torch.arange(7))
    assert runner.forwards == 2
    assert torch.equal(out, ref)
    assert "forward" not in vars(tr)  # the stock forward is back


def test_stock_forward_is_restored_and_stock_calls_unchanged(batched):
    """Outside a generation the transformer is the stock module: the installed processors and
    per-sample layers compute exactly what diffusers' own would (batch 1)."""
    from diffusers import Kandinsky5Transformer3DModel

    tr = batched.pipeline(T2V).transformer
    stock = Kandinsky5Transformer3DModel.from_config(tr.config).eval()
    stock.load_state_dict(tr.state_dict())
    g = torch.Generator().manual_seed(2)
    args = (
        torch.randn(1, 3, 8, 8, 33, generator=g),
        torch.randn(1, 9, 32, generator=g),
        torch.tensor([500.0]),
        torch.randn(1, 32, generator=g),
        [torch.arange(3), torch.arange(4), torch.arange(4)],
        torch.arange(9),
    )
    with torch.no_grad():
        assert torch.equal(tr(*args).sample, stock(*args).sample)


# ---- MagCache ("regular" acceleration) -------------------------------------------------------


def upstream_decisions(ratios: list[float], steps: int, cfg: bool) -> list[tuple[int, int, bool]]:
    """kandinsky-5 magcache_utils.magcache_forward's skip decisions, transcribed (6e2a805)."""
    mag = np.array([1.0] * 2 + ratios)
    if len(mag) != steps * 2:

        def interp(src, n):
            if n == 1:
                return np.array([src[-1]])
            scale = (len(src) - 1) / (n - 1)
            return src[np.round(np.arange(n) * scale).astype(int)]

        mag = np.concatenate([interp(mag[0::2], steps).reshape(-1, 1), interp(mag[1::2], steps).reshape(-1, 1)], 1)
        mag = mag.reshape(-1)
    num_steps, cnt = steps * 2, 0
    acc_err, acc_steps, acc_ratio = [0.0, 0.0], [0, 0], [1.0, 1.0]
    out = []
    while True:
        skip = False
        b = cnt % 2
        if cnt >= int(num_steps * 0.2):
            acc_ratio[b] *= mag[cnt]
            acc_steps[b] += 1
            acc_err[b] += np.abs(1 - acc_ratio[b])
            if acc_err[b] < 0.12 and acc_steps[b] <= 2:
                skip = True
            else:
                acc_err[b], acc_steps[b], acc_ratio[b] = 0, 0, 1.0
        out.append((cnt // 2, b, skip))
        cnt += 1 if cfg else 2
        if cnt >= num_steps:
            return out


@pytest.mark.parametrize("steps", [16, 28, 30, 50])
@pytest.mark.parametrize("name", ["kandinsky5-lite-t2v-sft-5s", "kandinsky5-pro-t2v-sft-5s", "kandinsky5-lite-i2v-5s"])
def test_magcache_decisions_match_upstream(name, steps):
    ratios = list(MAG_RATIOS[name])
    cache = MagCache(ratios=ratios, steps=steps, cfg=True)
    ours = []
    for step in range(steps):
        for branch in (0, 1):
            skip = cache.wants_skip(branch)
            ours.append((step, branch, skip))
            cache.residual[branch] = torch.zeros(1)  # a residual exists after every evaluation
    assert ours == upstream_decisions(ratios, steps, cfg=True)
    assert any(s for *_, s in ours)  # it does skip some


def test_magcache_no_cfg_matches_upstream():
    ratios = list(MAG_RATIOS["kandinsky5-lite-t2v-nocfg-5s"])
    cache = MagCache(ratios=ratios, steps=50, cfg=False)
    ours = []
    for step in range(50):
        ours.append((step, 0, cache.wants_skip(0)))
        cache.residual[0] = torch.zeros(1)
    assert ours == upstream_decisions(ratios, 50, cfg=False)


def test_variants_without_official_calibration_have_no_magcache():
    for kind in ("lite-t2v-distilled-5s", "lite-t2v-pretrain-5s", "pro-t2v-distilled-5s"):
        name = f"kandinsky5-{kind}"
        assert magcache_for(name, 16, cfg=False) is None
    assert magcache_for("kandinsky5-lite-t2v-sft-5s", 50, cfg=True) is not None
    hd = magcache_for("kandinsky5-pro-t2v-sft-5s", 50, cfg=True, hd=True)
    assert hd.ratios == list(MAG_RATIOS["kandinsky5-pro-t2v-sft-5s@hd"])


def test_regular_skips_visual_blocks_and_none_is_unchanged(batched, tmp_path):
    steps = 12
    base, count_none, info_none = run(batched, t2v(steps=steps))
    none, count_explicit, _ = run(batched, t2v(steps=steps, acceleration="none"))
    fast, count_regular, info_regular = run(batched, t2v(steps=steps, acceleration="regular"))
    assert np.array_equal(base, none)  # "none" is the default path, bit for bit
    assert info_none.acceleration == "none" and info_none.cached_steps == 0
    assert count_none.visual_blocks == count_explicit.visual_blocks == steps  # batched: once per step
    assert info_regular.acceleration == "regular" and info_regular.cached_steps > 0
    assert count_regular.visual_blocks < count_none.visual_blocks
    assert count_regular.visual_blocks == steps - info_regular.cached_steps // 2
    assert np.isfinite(fast).all() and 0 < np.abs(fast - base).max() < 0.5  # approximate, same video
    result = batched.generate(t2v(steps=steps, acceleration="regular"), tmp_path / "r.mp4")
    assert result.acceleration == "regular" and result.cached_steps == info_regular.cached_steps
    assert len(result.step_times) == steps


def test_regular_sequential_cfg_also_skips(sequential):
    _, count_none, _ = run(sequential, t2v(steps=12))
    _, count_regular, info = run(sequential, t2v(steps=12, acceleration="regular"))
    assert count_none.visual_blocks == 24
    assert count_regular.visual_blocks == 24 - info.cached_steps < 24


def test_bad_acceleration_is_rejected(batched):
    from pipelines.errors import InvalidRequest

    with pytest.raises(InvalidRequest) as info:
        batched.prepare(t2v(acceleration="turbo"))
    assert info.value.field == "acceleration" and "turbo" in str(info.value)


def test_fal_acceleration_reaches_the_request():
    from server.api.fal_inputs import parse, to_generation_request

    pro = "fal-ai/kandinsky5-pro/text-to-video"
    assert to_generation_request(parse(pro, {"prompt": "x"})).acceleration == "regular"  # fal's default
    assert to_generation_request(parse(pro, {"prompt": "x", "acceleration": "none"})).acceleration == "none"
    lite = to_generation_request(parse("fal-ai/kandinsky5/text-to-video", {"prompt": "x"}))
    assert lite.acceleration is None  # no such field on fal's Lite endpoints: exact
