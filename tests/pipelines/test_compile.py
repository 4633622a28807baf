"""Compiled transformer blocks and fused flex attention, checked on the CPU (issue 6).

torch.compile traces the same graphs on the CPU as on CUDA (inductor then emits C++ instead of
Triton): with `fullgraph=True` any graph break in k5serve's attention processors, the per-sample
layers or the batched CFG step fails here. tests/gpu/test_gpu.py repeats the compile checks in bf16 on
CUDA. Compiling the tiny model takes about 40 s on two cores, hence one module-scoped engine.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch._dynamo

from pipelines.engine import Engine
from pipelines.loader import use_fused_flex_attention
from pipelines.request import GenerationRequest
from pipelines.warmup import warm_compiled

REQ = dict(variant="kandinsky5-tiny-t2v", prompt="a red fox", width=128, height=128, num_frames=17, steps=4, seed=1)


def _graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


@pytest.fixture(scope="module")
def compiled(tiny_weights_dir):
    torch._dynamo.reset()
    engine = Engine(tiny_weights_dir, device="cpu", compile=True)
    warm_compiled(engine, "kandinsky5-tiny-t2v")  # what warmup() does for each served variant
    return engine


def test_warm_up_compiles_the_repeated_blocks(compiled):
    pipe = compiled.pipeline("kandinsky5-tiny-t2v")
    # warm_compiled falls back to eager (and clears these) if compilation fails
    assert all(b._compiled_call_impl is not None for b in pipe.transformer.visual_transformer_blocks)
    assert _graphs() > 0


def test_compiled_output_matches_eager(compiled, engine):
    """Batched CFG with a key-masked cross-attention (the prompts differ in length), compiled vs eager."""
    a = compiled.generate_frames(GenerationRequest(**REQ)).frames
    b = engine.generate_frames(GenerationRequest(**REQ)).frames
    assert np.abs(a - b).max() < 5e-3 and np.abs(a - b).mean() < 5e-4  # fp32 kernel-fusion rounding
    c = compiled.generate_frames(GenerationRequest(**{**REQ, "prompt": "a blue whale"})).frames
    assert np.abs(a - c).max() > 1e-2  # still follows the prompt


def test_requests_of_the_same_shape_reuse_the_compiled_graphs(compiled):
    compiled.generate_frames(GenerationRequest(**REQ))
    before = _graphs()
    long_prompt = "a blue whale swimming slowly through a very deep and very dark ocean, cinematic light"
    compiled.generate_frames(GenerationRequest(**{**REQ, "prompt": long_prompt, "seed": 7}))
    compiled.generate_frames(GenerationRequest(**{**REQ, "negative_prompt": "blurry", "seed": 8}))
    assert _graphs() == before  # other prompt lengths and negative prompts: no recompilation


def test_fused_flex_attention_never_materialises_the_scores(reference_flex_calls):
    from diffusers.models import attention_dispatch
    from torch.nn.attention.flex_attention import create_block_mask

    calls = reference_flex_calls
    q, k, v = (torch.randn(1, 256, 2, 16) for _ in range(3))  # (batch, tokens, heads, head dim)
    mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, 1, 2, 256, 256, device="cpu", BLOCK_SIZE=64)

    eager = attention_dispatch.dispatch_attention_fn(q, k, v, attn_mask=mask, backend="flex")
    assert calls[0] == 1  # diffusers' flex backend, as stock: the reference implementation

    use_fused_flex_attention()
    fused_module = attention_dispatch.flex_attention
    use_fused_flex_attention()
    assert attention_dispatch.flex_attention is fused_module  # idempotent
    fused = attention_dispatch.dispatch_attention_fn(q, k, v, attn_mask=mask, backend="flex")
    block = torch.compile(
        lambda q, k, v: attention_dispatch.dispatch_attention_fn(q, k, v, attn_mask=mask, backend="flex"),
        fullgraph=True,  # inside compiled blocks: traced through, no graph break
    )
    inside = block(q, k, v)
    assert calls[0] == 1  # neither call ran the reference
    torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(inside, eager, rtol=1e-5, atol=1e-5)
