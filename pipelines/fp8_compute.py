"""Opt-in fp8 *compute* for the transformer (issue 14): fp8 x fp8 matmuls on cards that have them.

Weight storage in fp8 (quant.py, `--fp8-weights`) still multiplies in bf16: each call dequantizes.
Here both operands are float8_e4m3fn and the matmul itself runs on the tensor cores' fp8 path
(torch._scaled_mm), which needs CUDA compute capability 8.9 or newer (Ada, Hopper, Blackwell):

- the weight is stored as quant.py stores it, e4m3 with one scale per output row (max|w| / 448);
- each call quantizes the activations per token (one scale per row of the flattened input, max|x| /
  448), then `_scaled_mm(xq, wq.T, scale_a=x scales, scale_b=w scales)` accumulates in fp32 and
  writes the compute dtype: out[i, j] = sx[i] * sw[j] * sum_k xq[i, k] * wq[j, k].

Which layers: the attention projections (query, key, value, out) and the FFN's input projection of
every text and visual block. The modulations (they scale every residual branch; diffusers keeps them
fp32) and the FFN output projections stay as they were, as kandinsky-5 PR 105 (TorchAO fp8) leaves
them: the FFN output sees GELU's long-tailed activations, which per-token e4m3 handles worst. The
embeddings and the final out layer are outside the blocks and also stay.

Approximate, never on by default, labelled (FP8_COMPUTE) on every result made with it. Refused at
start-up (`device.fp8_unsupported`) on a device without fp8 matmuls: the front end refuses CPU
workers before starting them (server/pool.py), the engine any device (an older CUDA card).
"""

from __future__ import annotations

import torch

from .quant import FP8, FP8_MAX

FP8_COMPUTE = "transformer fp8 e4m3 compute (attention and FFN-in projections; per-token x per-row scales)"
# _scaled_mm's fp8 kernels take inner and output sizes in multiples of 16.
ALIGN = 16
_TINY = torch.finfo(torch.float32).tiny


def quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`t` (rows x k) as e4m3 values and one fp32 scale per row: t ~ q.float() * scale."""
    scale = (t.detach().abs().amax(dim=-1, keepdim=True).float() / FP8_MAX).clamp(min=_TINY)
    return (t.float() / scale).to(FP8), scale


def reference_matmul(xq, sx, wq, sw, bias, out_dtype) -> torch.Tensor:
    """What `_scaled_mm` computes, in plain fp32 torch: dequantize both operands, multiply, add the
    bias. The check the fp8 kernel is held to (tests), and the math in one line. `xq` (tokens x in)
    with `sx` (tokens x 1); `wq` (out x in) with `sw`, one scale per output row, (1 x out) as
    `_scaled_mm` takes it."""
    out = (xq.float() * sx) @ (wq.float() * sw.reshape(-1, 1)).t()
    return (out if bias is None else out + bias.float()).to(out_dtype)


class Fp8Linear(torch.nn.Module):
    """A Linear computing in fp8: e4m3 weight with per-row scales, activations quantized per token."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        if linear.in_features % ALIGN or linear.out_features % ALIGN:
            raise ValueError(f"fp8 compute needs sizes in multiples of {ALIGN}, got {linear}")
        qweight, scale = quantize_rows(linear.weight)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("qweight", qweight)  # (out, in), row-major: .t() is the column-major mat2
        self.register_buffer("scale", scale.reshape(1, -1))  # (1, out): scale_b of _scaled_mm
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        xq, sx = quantize_rows(rows)
        out = torch._scaled_mm(xq, self.qweight.t(), scale_a=sx, scale_b=self.scale, out_dtype=x.dtype)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, fp8 e4m3 compute, per-token x per-row scales"


def converted(name: str) -> bool:
    """Whether a Linear at `name` inside a transformer block computes in fp8: the attention
    projections and the FFN's input projection; never a modulation or the FFN's output."""
    if "modulation" in name:
        return False
    parent, _, leaf = name.rpartition(".")
    if parent.endswith("attention"):  # self_attention, cross_attention: to_query/key/value, out_layer
        return True
    return parent.endswith("feed_forward") and leaf == "in_layer"


def convert_transformer(transformer) -> list[str]:
    """Swap the converted Linears of every text and visual block for Fp8Linear. Returns their names
    relative to the transformer (block.index.path), for logs and tests."""
    names = []
    for group in ("text_transformer_blocks", "visual_transformer_blocks"):
        for index, block in enumerate(getattr(transformer, group)):
            for name, module in list(block.named_modules()):
                for child_name, child in list(module.named_children()):
                    full = f"{name}.{child_name}" if name else child_name
                    if isinstance(child, torch.nn.Linear) and converted(full):
                        setattr(module, child_name, Fp8Linear(child))
                        names.append(f"{group}.{index}.{full}")
    return names
