"""Nabla's sparse attention on the CPU with the semantics of the GPU kernel.

nabla builds its FlexAttention BlockMask with `mask_mod=None` (diffusers 0.42.1 `nablaT_v2`), and
torch's eager flex_attention applies only `mask_mod`: on the CPU it silently computes full attention.
The compiled CPU kernel fails on that mask ("'kv_indices' was not declared"). So on the CPU the block
mask is expanded to a dense token mask (`BlockMask.to_dense()`, one entry per 64x64 block) and run
with SDPA: the attention the fused GPU kernel computes (which skips exactly those blocks). Dense costs
S^2 bytes of mask: fine at the sizes a CPU runs (the tiny demo model), and only ever used there.
"""

from __future__ import annotations


def use_dense_flex_on_cpu() -> None:
    """Route diffusers' flex backend through `dense_flex_attention` for CPU tensors (process-wide,
    idempotent; CUDA tensors go to whatever flex_attention was installed before, e.g. the fused one)."""
    import types

    from diffusers.models import attention_dispatch

    module = attention_dispatch.flex_attention
    if module is None or getattr(module, "_k5_dense_cpu", False):
        return
    inner = module.flex_attention

    def flex_attention(query, key, value, score_mod=None, block_mask=None, **kwargs):
        if query.device.type != "cpu" or block_mask is None or score_mod is not None or kwargs.get("return_lse"):
            return inner(query, key, value, score_mod=score_mod, block_mask=block_mask, **kwargs)
        return dense_flex_attention(query, key, value, block_mask, scale=kwargs.get("scale"))

    wrapped = types.ModuleType(module.__name__)
    wrapped.__dict__.update({k: v for k, v in vars(module).items() if not k.startswith("__")})
    wrapped.flex_attention = flex_attention
    wrapped._k5_dense_cpu = True
    wrapped._k5_original = getattr(module, "_k5_original", module)  # loader.stock_flex_attention: stock diffusers
    attention_dispatch.flex_attention = wrapped


def dense_flex_attention(query, key, value, block_mask, scale=None):
    """flex_attention(q, k, v, block_mask=...) for a mask without mask_mod: (B, H, S, D) in and out."""
    import torch.nn.functional as F

    q_block, kv_block = block_mask.BLOCK_SIZE
    dense = block_mask.to_dense().bool()  # (B, H, S/q_block, S/kv_block)
    mask = dense.repeat_interleave(q_block, dim=-2).repeat_interleave(kv_block, dim=-1)
    mask = mask[..., : query.shape[-2], : key.shape[-2]]
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)
