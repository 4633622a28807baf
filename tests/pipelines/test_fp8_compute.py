"""Opt-in fp8 compute (issue 14, pipelines/fp8_compute.py): which layers, the numerics, the refusal
without fp8 hardware, the label.

torch 2.13's CPU build has `torch._scaled_mm` for e4m3 with row-wise scales, so the layer that runs
on the GPU runs here too and is held to `reference_matmul` (the same math dequantized in fp32). The
engine only turns the mode on for CUDA sm_89+; the frames test below converts a CPU engine's
pipeline through the loader's own `quantize` to measure the drift the mode causes.

Bounds, and why:
- One layer at Pro's fan-in (4,096, default init, Gaussian activations): each operand rounds to e4m3
  (3 mantissa bits, ~2.6 % RMS relative error, test_quant.py); the two errors are independent, so
  the product is off by about sqrt(2) x 2.6 % = 3.7 % RMS: bound 5 %. Against the dequantized
  reference the kernel only reorders an fp32 sum: 1e-5.
- Whole frames on the tiny model: as test_quant.py's fp8 storage (<= 10 % of what changing the seed
  moves the frames), since activations and weights each carry one e4m3 rounding per converted layer.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from approx_fixtures import APPROX_REQ

from pipelines import fp8_compute, quant
from pipelines.engine import Engine
from pipelines.fp8_compute import FP8_COMPUTE, Fp8Linear
from pipelines.loader import LoadOptions, quantize
from pipelines.request import GenerationRequest

REQ = APPROX_REQ  # exact_and_seed_gap (tests/approx_fixtures.py) is this request


@pytest.fixture(scope="module")
def pro_layer():
    torch.manual_seed(0)
    return torch.nn.Linear(4096, 2048), torch.randn(2, 32, 4096)  # not square: rows and columns differ


def test_layer_matches_the_dequantized_reference_and_the_exact_layer(pro_layer):
    layer, x = pro_layer
    fp8 = Fp8Linear(layer)
    assert fp8.qweight.dtype == torch.float8_e4m3fn and fp8.scale.shape == (1, 2048)
    with torch.no_grad():
        exact, got = layer(x), fp8(x)
        xq, sx = fp8_compute.quantize_rows(x.reshape(-1, 4096))
        ref = fp8_compute.reference_matmul(xq, sx, fp8.qweight, fp8.scale, layer.bias, x.dtype).reshape(got.shape)
    assert sx.shape == (64, 1)  # one scale per token
    assert got.shape == exact.shape
    assert float((got - ref).norm() / ref.norm()) < 1e-5
    err = float((got - exact).norm() / exact.norm())
    assert 0.01 < err < 0.05


def test_per_token_scales_keep_a_quiet_token_beside_a_loud_one():
    """Why per token: beside a token 1e5 x louder, one scale for the whole tensor pushes the quiet
    token into e4m3's subnormals (measured 15 % error); its own scale keeps it at the format's ~4 %."""
    torch.manual_seed(1)
    layer = torch.nn.Linear(64, 32, bias=False)
    x = torch.randn(2, 64) * torch.tensor([[1e5], [1.0]])
    fp8 = Fp8Linear(layer)
    with torch.no_grad():
        exact, got = layer(x), fp8(x)
        tensor_scale = x.abs().amax() / quant.FP8_MAX
        xq = (x / tensor_scale).to(torch.float8_e4m3fn)
        per_tensor = fp8_compute.reference_matmul(xq, tensor_scale.expand(2, 1), fp8.qweight, fp8.scale, None, x.dtype)
    assert float((got[1] - exact[1]).norm() / exact[1].norm()) < 0.05
    assert float((per_tensor[1] - exact[1]).norm() / exact[1].norm()) > 0.10


def test_sizes_off_the_kernels_alignment_are_refused():
    with pytest.raises(ValueError, match="multiples of 16"):
        Fp8Linear(torch.nn.Linear(40, 32))


def test_refused_on_the_cpu_with_a_clear_message(tiny_weights_dir):
    with pytest.raises(ValueError, match=r"compute capability 8\.9 or newer.*device is 'cpu'.*--fp8-weights"):
        Engine(tiny_weights_dir, device="cpu", fp8_compute=True)


@pytest.fixture(scope="module")
def converted(tiny_weights_dir):
    """A CPU engine whose tiny pipeline went through the loader's quantize with fp8 compute on (the
    engine itself refuses the mode on the CPU; the layers run here all the same)."""
    engine = Engine(tiny_weights_dir, device="cpu")
    pipe = engine.pipeline("kandinsky5-tiny-t2v")
    plain = copy.deepcopy(pipe.transformer)
    quantize(pipe, LoadOptions(fp8_compute=True))
    return engine, pipe, plain


def test_attention_and_ffn_in_compute_in_fp8_modulations_and_ffn_out_do_not(converted):
    tr = converted[1].transformer
    for block in [*tr.text_transformer_blocks, *tr.visual_transformer_blocks]:
        attentions = [block.self_attention] + ([block.cross_attention] if hasattr(block, "cross_attention") else [])
        for attn in attentions:
            for proj in (attn.to_query, attn.to_key, attn.to_value, attn.out_layer):
                assert isinstance(proj, Fp8Linear)
        assert isinstance(block.feed_forward.in_layer, Fp8Linear)
        assert type(block.feed_forward.out_layer) is torch.nn.Linear
        modulation = getattr(block, "visual_modulation", None) or block.text_modulation
        assert type(modulation.out_layer) is torch.nn.Linear
        assert modulation.out_layer.weight.dtype == torch.float32
    # outside the blocks: embeddings and the final layer are untouched
    assert type(tr.visual_embeddings.in_layer) is torch.nn.Linear
    assert type(tr.out_layer.out_layer) is torch.nn.Linear
    assert type(tr.out_layer.modulation.out_layer) is torch.nn.Linear


def test_with_fp8_storage_too_the_rest_is_stored_fp8(converted):
    """Both flags: fp8 compute takes its layers first, fp8 storage the other block Linears."""
    pipe = SimpleNamespace(transformer=converted[2])
    quantize(pipe, LoadOptions(fp8_compute=True, fp8_weights=True))
    assert pipe._k5_approximations == [FP8_COMPUTE, quant.TRANSFORMER_FP8]
    block = pipe.transformer.visual_transformer_blocks[0]
    assert isinstance(block.self_attention.to_query, Fp8Linear)
    assert isinstance(block.feed_forward.out_layer, quant.RowQuantLinear)
    assert type(block.visual_modulation.out_layer) is torch.nn.Linear


def test_the_name_rule():
    assert fp8_compute.converted("self_attention.to_query")
    assert fp8_compute.converted("cross_attention.out_layer")
    assert fp8_compute.converted("feed_forward.in_layer")
    assert not fp8_compute.converted("feed_forward.out_layer")
    assert not fp8_compute.converted("visual_modulation.out_layer")


def test_frames_drift_is_bounded_and_labelled(exact_and_seed_gap, converted):
    exact, seed_gap = exact_and_seed_gap
    done = converted[0].generate_frames(GenerationRequest(**REQ))
    assert done.approximations == [FP8_COMPUTE]
    drift = float(np.abs(done.frames - exact).mean())
    print(f"fp8 compute drift {drift:.4f} = {drift / seed_gap:.1%} of the seed gap {seed_gap:.4f}")
    assert 0 < drift < 0.10 * seed_gap
