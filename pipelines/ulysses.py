"""Ulysses sequence parallelism for the Kandinsky 5 transformer: one video's visual tokens split
across the ranks of a group (pipelines/group.py runs the ranks).

What is split and where (diffusers 0.42.1 `Kandinsky5Transformer3DModel`):
- The visual tokens, after `fractal_flatten` (it runs inside the transformer's forward, so the split
  cannot be at the root module): a forward pre-hook on every visual block narrows the visual RoPE
  (the forward hands the full one to each block) to this rank's slice of the token sequence, and on
  the first block the visual tokens too; a forward hook on the last block gathers them back. Blocks
  are otherwise per token (LayerNorm, modulation, FFN), so each rank runs them on its slice.
- The visual self-attention: q, k, v are projected, normalised and rotated on the local slice (all
  per token), then ONE all-to-all turns "my tokens, all heads" into "all tokens, my heads"; the
  attention runs on whole sequences for H/n heads, and a second all-to-all turns the result back.
  Nabla's sparse mask is built after the first all-to-all, from the full sequence, per head (its
  score map and top-cdf cut are per head), so it is the mask one process would build for those
  heads: exact. diffusers' own context parallelism builds it from the local chunk and refuses nabla.
- Text stays replicated (text blocks run whole on every rank); the cross-attention stays local (each
  visual token attends to the whole text on its own rank): exact, and no communication.

Uneven splits are allowed (Lite at 7 ranks: 31 x 32 x 48 tokens is not a multiple of 7): the
all-to-alls take split sizes. The degree must divide the heads (variants.valid_sp_degrees).

The fork: `UlyssesAttnProcessor.__call__` is the self-attention branch of diffusers'
`Kandinsky5AttnProcessor.__call__` with the all-to-all inserted between the RoPE and the nabla mask
(no hook point exists there); pipelines/upstream.py pins that class, so an upgrade that changes it
fails tests/pipelines/test_fork_pin.py naming this file.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Shard:
    """This rank's part of one sequence-parallel group, for the current request."""

    group: dist.ProcessGroup
    rank: int  # in `group`
    size: int  # the degree

    def sizes(self, total: int) -> list[int]:
        """Tokens per rank for a sequence of `total` (as torch.tensor_split: the first ones get one more)."""
        base, extra = divmod(total, self.size)
        return [base + (1 if i < extra else 0) for i in range(self.size)]

    def span(self, total: int) -> tuple[int, int]:
        """(start, length) of this rank's tokens."""
        sizes = self.sizes(total)
        return sum(sizes[: self.rank]), sizes[self.rank]


class Layout:
    """The current request's shard on this rank, read by the hooks and processors of one
    transformer; None = not split (degree 1, or a CFG-parallel half of one device)."""

    def __init__(self) -> None:
        self.shard: Shard | None = None
        self.total = 0  # tokens of the whole sequence in the current call (set by the first block)


# ---- collectives -------------------------------------------------------------------------------


def seq_to_heads(x: torch.Tensor, shard: Shard, total: int) -> torch.Tensor:
    """(B, s_mine, H, D) -> (B, S, H/n, D): every rank's tokens, this rank's heads."""
    n = shard.size
    b, s, heads, d = x.shape
    send = x.reshape(b, s, n, heads // n, d).permute(2, 1, 0, 3, 4).reshape(n * s, b, heads // n, d).contiguous()
    recv = send.new_empty((total, b, heads // n, d))
    dist.all_to_all_single(recv, send, shard.sizes(total), [s] * n, group=shard.group)
    return recv.permute(1, 0, 2, 3)


def heads_to_seq(x: torch.Tensor, shard: Shard) -> torch.Tensor:
    """(B, S, H/n, D) -> (B, s_mine, H, D): the inverse of seq_to_heads."""
    n = shard.size
    b, total, h, d = x.shape
    sizes = shard.sizes(total)
    mine = sizes[shard.rank]
    send = x.permute(1, 0, 2, 3).contiguous()
    recv = send.new_empty((n * mine, b, h, d))
    dist.all_to_all_single(recv, send, [mine] * n, sizes, group=shard.group)
    return recv.reshape(n, mine, b, h, d).permute(2, 1, 0, 3, 4).reshape(b, mine, n * h, d)


def gather_tokens(x: torch.Tensor, shard: Shard, total: int) -> torch.Tensor:
    """(B, s_mine, C) -> (B, S, C) on every rank (slices padded to the longest for all_gather)."""
    sizes = shard.sizes(total)
    longest = max(sizes)
    padded = torch.nn.functional.pad(x, (0, 0, 0, longest - x.shape[1])).contiguous()
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded, group=shard.group)
    return torch.cat([p[:, :n] for p, n in zip(parts, sizes, strict=True)], dim=1)


# ---- the attention processor -------------------------------------------------------------------


def _processor_class():
    from diffusers.models.attention_dispatch import dispatch_attention_fn
    from diffusers.models.transformers.transformer_kandinsky import Kandinsky5AttnProcessor, nablaT_v2

    class UlyssesAttnProcessor(Kandinsky5AttnProcessor):
        """Kandinsky5AttnProcessor for a visual self-attention whose tokens are split across ranks.

        Unsplit (layout.shard None) or given a text (cross-attention) it is the stock processor."""

        def __init__(self, layout: Layout):
            super().__init__()
            self.layout = layout

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, rotary_emb=None, sparse_params=None):
            shard = self.layout.shard
            if shard is None or encoder_hidden_states is not None:
                return super().__call__(attn, hidden_states, encoder_hidden_states, rotary_emb, sparse_params)
            # diffusers 0.42.1 Kandinsky5AttnProcessor.__call__, self-attention branch, on this rank's tokens
            query = attn.to_query(hidden_states)
            key = attn.to_key(hidden_states)
            value = attn.to_value(hidden_states)
            shape = query.shape[:-1]
            query = query.reshape(*shape, attn.num_heads, -1)
            key = key.reshape(*shape, attn.num_heads, -1)
            value = value.reshape(*shape, attn.num_heads, -1)
            query = attn.query_norm(query.float()).type_as(query)
            key = attn.key_norm(key.float()).type_as(key)

            def apply_rotary(x, rope):
                x_ = x.reshape(*x.shape[:-1], -1, 1, 2).to(torch.float32)
                x_out = (rope * x_).sum(dim=-1)
                return x_out.reshape(*x.shape).to(torch.bfloat16)

            if rotary_emb is not None:
                query = apply_rotary(query, rotary_emb).type_as(query)
                key = apply_rotary(key, rotary_emb).type_as(key)

            # k5serve: one all-to-all for q, k and v (heads of rank j in chunk j), then whole sequences
            total = self.layout.total
            n, heads = shard.size, attn.num_heads
            qkv = torch.stack([query, key, value], dim=2)  # (B, s, 3, H, D)
            b, s, _, _, d = qkv.shape
            qkv = qkv.reshape(b, s, 3, n, heads // n, d).transpose(2, 3).reshape(b, s, 3 * heads, d)
            qkv = seq_to_heads(qkv, shard, total).reshape(b, total, 3, heads // n, d)
            query, key, value = (t.contiguous() for t in qkv.unbind(2))

            attn_mask = None
            if sparse_params is not None:  # nabla: per head, from the whole sequence (module docstring)
                attn_mask = nablaT_v2(query, key, sparse_params["sta_mask"], thr=sparse_params["P"])
            out = dispatch_attention_fn(
                query,
                key,
                value,
                attn_mask=attn_mask,
                backend=self._attention_backend,
                parallel_config=self._parallel_config,
            )
            out = heads_to_seq(out, shard)
            return attn.out_layer(out.flatten(-2, -1))

    return UlyssesAttnProcessor


# ---- installing it ----------------------------------------------------------------------------


def install(transformer, layout: Layout) -> None:
    """Make `transformer` split its visual tokens as `layout` says (idempotent; with no shard set it
    computes exactly what it did before). Keeps each processor's attention backend."""
    if getattr(transformer, "_k5_ulysses", None) is layout:
        return
    if getattr(transformer, "_k5_ulysses", None) is not None:
        raise RuntimeError("this transformer already belongs to another sequence-parallel layout")
    cls = _processor_class()
    blocks = transformer.visual_transformer_blocks

    def split(index: int):
        def pre_hook(_module, args):
            shard = layout.shard
            if shard is None:
                return None
            visual, text, time_embed, rope, sparse = args
            total = rope.shape[1]  # the forward hands every block the full RoPE
            start, length = shard.span(total)
            layout.total = total
            if index == 0:
                visual = visual.narrow(1, start, length)
            return visual, text, time_embed, rope.narrow(1, start, length), sparse

        return pre_hook

    def gather(_module, _args, output):
        shard = layout.shard
        return None if shard is None else gather_tokens(output, shard, layout.total)

    for i, block in enumerate(blocks):
        old = block.self_attention.processor
        proc = cls(layout)
        proc._attention_backend = old._attention_backend
        proc._parallel_config = old._parallel_config
        block.self_attention.set_processor(proc)
        block.register_forward_pre_hook(split(i))
    blocks[-1].register_forward_hook(gather)
    transformer._k5_ulysses = layout
