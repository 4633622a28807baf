"""Opt-in approximate weight storage (issue 14): 8-bit Qwen, scaled fp8 transformer weights.

Never on by default; every result made with them says so (GenerationResult.approximations, the
job's log, /api/jobs). Both are weight-only: a layer keeps its weights in 8 bits with one scale per
output row and dequantizes them to the compute dtype for each call, so activations and every
accumulation stay bf16/fp32 as before.

- `int8` (the Qwen text encoder): per output row, scale = max|w| / 127, w ~ round(w / scale) * scale.
  Halves Qwen's 16.6 GB (bf16) to ~8.3 GB.
- `fp8` (the transformer's blocks, modulations excluded): float8_e4m3fn with per-row scale = max|w| /
  448 (e4m3's largest value). Unscaled e4m3 flushes every |w| below 2^-10 to zero: with Pro's fan-in
  (4,096) about 6 % of a default-initialised layer's weights (`zeroed_share`, tested), which is why
  the scale is per row. Halves the streamed/resident block bytes.

The modulations stay in their fp32 (diffusers keeps them so, and they scale every residual branch);
fp8 *compute* (sm_89+) is a GPU-only mode not built here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
INT8_MAX = 127.0
TEXT_INT8 = "text encoder int8 (weight-only, per-row scales)"
TRANSFORMER_FP8 = "transformer fp8 e4m3 weights (per-row scales)"


class RowQuantLinear(torch.nn.Module):
    """A Linear whose weight is stored quantized with one scale per output row."""

    def __init__(self, linear: torch.nn.Linear, kind: str):
        super().__init__()
        w = linear.weight.detach()
        top = FP8_MAX if kind == "fp8" else INT8_MAX
        scale = (w.abs().amax(dim=1, keepdim=True).float() / top).clamp(min=torch.finfo(torch.float32).tiny)
        scaled = w.float() / scale
        stored = scaled.to(FP8) if kind == "fp8" else scaled.round().clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
        self.kind = kind
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("qweight", stored)
        self.register_buffer("scale", scale)
        self.bias = linear.bias
        self.compute_dtype = w.dtype

    def weight_(self) -> torch.Tensor:
        return (self.qweight.float() * self.scale).to(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_().to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {self.kind}, per-row scales"


def _swap_linears(root: torch.nn.Module, kind: str, skip=lambda name: False) -> int:
    count = 0
    for name, module in list(root.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, torch.nn.Linear) and not skip(full):
                setattr(module, child_name, RowQuantLinear(child, kind))
                count += 1
    return count


def quantize_text_encoder_int8(text_encoder) -> int:
    """Qwen's language-model Linear layers to int8 (its vision tower, unused for text, and the LM
    head, whose logits the pipeline never reads, are left as they are). Returns the count."""
    return _swap_linears(text_encoder, "int8", skip=lambda n: "visual" in n or n.endswith("lm_head"))


def quantize_transformer_fp8(transformer) -> int:
    """The text and visual blocks' Linear layers to scaled fp8, modulations excluded."""
    blocks = [*transformer.text_transformer_blocks, *transformer.visual_transformer_blocks]
    return sum(_swap_linears(b, "fp8", skip=lambda n: "modulation" in n) for b in blocks)


def zeroed_share(weight: torch.Tensor, scaled: bool) -> float:
    """Share of nonzero weights that fp8 e4m3 storage turns into 0, unscaled or with per-row scales."""
    w = weight.detach().float()
    if scaled:
        w = w / (w.abs().amax(dim=1, keepdim=True) / FP8_MAX)
    nonzero = w != 0
    return float(((w.to(FP8).float() == 0) & nonzero).sum() / nonzero.sum())
