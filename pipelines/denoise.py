"""k5serve's transformer step: CFG in one batched call, and MagCache step skipping (opt-in).

How it plugs into diffusers: the stock Kandinsky 5 pipelines call `self.transformer(...)` twice per
denoising step when guidance > 1 (conditional, then unconditional, batch 1 each). For one pipeline
call the Engine sets a `StepRunner` as the transformer's `forward` (an instance attribute, restored
afterwards). Everything else (latents, scheduler, I2V conditioning, VAE decode) stays the
pipeline's own code, so the output is the stock output.

CFG batching. On the conditional call the runner evaluates [cond, uncond] in one transformer call of
batch 2 and keeps the unconditional half for the pipeline's second call, which it checks is for the
same latents and timestep. The transformer takes no text attention mask and the two prompts have
different token counts, so the shorter text embedding is zero-padded and its padding is masked as a
key in the text self-attention and the cross-attention (`MaskedAttnProcessor`). Why that is exact:
every other text op is per token (projection, LayerNorm, FFN, modulation), the text RoPE positions
of the real tokens are unchanged (0..n-1), padded rows are never a key that is attended to, and the
visual tokens only see the text through the (masked) cross-attention. With equal lengths no mask is
used at all. tests/pipelines/test_cfg_batch.py checks batched == sequential in fp32.

MagCache ("regular" acceleration, approximate): kandinsky-5's own `magcache_utils.py` semantics,
threshold 0.12, at most K=2 consecutive skips, the first 20 % of steps always computed, with the
official calibrated magnitude ratios (variants.MAG_RATIOS). A skipped step runs the embeddings, the
text blocks and the output layer but reuses the previous step's residual of the visual blocks
(nearly all of the compute). Cond and uncond keep separate accumulators as upstream; in a batched
step the visual blocks are skipped only if both branches would skip, otherwise both are computed
(more conservative than upstream when they disagree; with the official ratios they rarely do).

Pinned: every diffusers object this module copies or leans on is hashed in pipelines/upstream.py;
tests/pipelines/test_fork_pin.py fails, naming it and what here to re-check, when a diffusers upgrade changes one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# ---- masked text attention -----------------------------------------------------------------


class TextKeyMask:
    """Shared by every masked processor of one transformer: the key mask of the current call."""

    def __init__(self) -> None:
        self.batched = False  # True during a batched CFG call
        self.key_mask: torch.Tensor | None = None  # (B, 1, 1, L) bool, True = a real text token


def _processor_base():
    from diffusers.models.transformers.transformer_kandinsky import Kandinsky5AttnProcessor

    return Kandinsky5AttnProcessor


def _make_masked_processor_class():
    base = _processor_base()

    class MaskedAttnProcessor(base):
        """Kandinsky5AttnProcessor plus an optional key mask for text keys (padding in a CFG batch).

        With no mask set it is the stock processor, call for call.
        """

        def __init__(self, state: TextKeyMask):
            super().__init__()
            self.state = state

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, rotary_emb=None, sparse_params=None):
            if not self.state.batched or encoder_hidden_states is None:
                return super().__call__(attn, hidden_states, encoder_hidden_states, rotary_emb, sparse_params)
            from diffusers.models.attention_dispatch import dispatch_attention_fn

            # The stock cross-attention (diffusers 0.42.1), except: keys and values are projected one
            # sample at a time (a few text rows round differently inside a bigger GEMM), and padded
            # text keys are masked.
            text = encoder_hidden_states
            query = attn.to_query(hidden_states)
            key = torch.cat([attn.to_key(text[i : i + 1]) for i in range(text.shape[0])])
            value = torch.cat([attn.to_value(text[i : i + 1]) for i in range(text.shape[0])])
            query = query.reshape(*query.shape[:-1], attn.num_heads, -1)
            key = key.reshape(*key.shape[:-1], attn.num_heads, -1)
            value = value.reshape(*value.shape[:-1], attn.num_heads, -1)
            query = attn.query_norm(query.float()).type_as(query)
            key = attn.key_norm(key.float()).type_as(key)
            mask = self.state.key_mask
            if mask is None:
                out = dispatch_attention_fn(
                    query, key, value, backend=self._attention_backend, parallel_config=self._parallel_config
                )
            else:  # masks: plain SDPA (the flash backends take none); cross-attention is a small share
                out = F.scaled_dot_product_attention(
                    query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=mask
                ).transpose(1, 2)
            return attn.out_layer(out.flatten(-2, -1))

    return MaskedAttnProcessor


def _per_sample_class(base):
    class PerSample(base):
        """Evaluates a batch one sample at a time: a Linear on a (1, n) input may round differently
        from the same rows inside a (2, n) input (GEMV vs GEMM kernels), and these tiny per-sample
        layers (time embedding, pooled text, AdaLN modulations) feed every block."""

        def forward(self, x):
            if x.shape[0] == 1:
                return super().forward(x)
            return torch.cat([super(PerSample, self).forward(x[i : i + 1]) for i in range(x.shape[0])])

    PerSample.__name__ = PerSample.__qualname__ = f"PerSample{base.__name__}"
    return PerSample


def install_masked_text_attention(transformer) -> TextKeyMask:
    """Prepare a transformer for batched CFG: key-masked cross-attention, per-sample tiny layers.

    Call before `set_attention_backend` (which then sets the backend on these processors too).
    Idempotent: returns the transformer's existing state if already installed. With batch 1 (the
    stock pipeline's calls) every changed module computes exactly what it did before.
    """
    from diffusers.models.transformers import transformer_kandinsky as tk

    state = getattr(transformer, "_k5_text_mask", None)
    if state is not None:
        return state
    state = TextKeyMask()
    cls = _make_masked_processor_class()
    for block in transformer.visual_transformer_blocks:
        block.cross_attention.set_processor(cls(state))
    swaps = {base: _per_sample_class(base) for base in (tk.Kandinsky5Modulation, tk.Kandinsky5TimeEmbeddings)}
    for module in transformer.modules():
        if type(module) in swaps:
            module.__class__ = swaps[type(module)]
    transformer._k5_text_mask = state
    return state


# ---- MagCache --------------------------------------------------------------------------------


def _nearest_interp(values: list[float], length: int) -> list[float]:
    """kandinsky-5 magcache_utils.nearest_interp (numpy round = round half to even, as here)."""
    if length == 1:
        return [values[-1]]
    scale = (len(values) - 1) / (length - 1)
    return [values[round(i * scale)] for i in range(length)]


@dataclass
class MagCache:
    """Per-generation MagCache state for `steps` steps, upstream's parameters and decisions."""

    ratios: list[float]  # the official calibration: cond/uncond interleaved, without the leading [1, 1]
    steps: int
    cfg: bool
    threshold: float = 0.12
    max_skips: int = 2
    retention: float = 0.2
    skipped: int = 0  # branch evaluations answered from the cache
    _mag: tuple[list[float], list[float]] = field(init=False)
    _acc_ratio: list[float] = field(default_factory=lambda: [1.0, 1.0])
    _acc_steps: list[int] = field(default_factory=lambda: [0, 0])
    _acc_err: list[float] = field(default_factory=lambda: [0.0, 0.0])
    _step: list[int] = field(default_factory=lambda: [0, 0])
    residual: list[torch.Tensor | None] = field(default_factory=lambda: [None, None])

    def __post_init__(self) -> None:
        mag = [1.0, 1.0, *self.ratios]
        cond, uncond = mag[0::2], mag[1::2]
        if len(mag) != self.steps * 2:
            cond, uncond = _nearest_interp(cond, self.steps), _nearest_interp(uncond, self.steps)
        self._mag = (cond, uncond)

    def wants_skip(self, branch: int) -> bool:
        """Upstream's decision for this branch's next evaluation (updates its accumulators)."""
        step = self._step[branch]
        self._step[branch] += 1
        # Upstream counts calls: cnt = 2*step + branch (no-CFG runs advance cnt by 2).
        cnt = 2 * step + (branch if self.cfg else 0)
        if cnt < int(self.steps * 2 * self.retention) or self.residual[branch] is None:
            return False
        ratio = self._mag[branch][min(step, self.steps - 1)]
        self._acc_ratio[branch] *= ratio
        self._acc_steps[branch] += 1
        self._acc_err[branch] += abs(1.0 - self._acc_ratio[branch])
        if self._acc_err[branch] < self.threshold and self._acc_steps[branch] <= self.max_skips:
            return True
        self.computed(branch)
        return False

    def computed(self, branch: int) -> None:
        """The branch was evaluated in full: its accumulators restart."""
        self._acc_ratio[branch], self._acc_steps[branch], self._acc_err[branch] = 1.0, 0, 0.0


# ---- the step runner ---------------------------------------------------------------------------


def transformer_forward(
    tr,
    hidden_states,
    encoder_hidden_states,
    timestep,
    pooled_projections,
    visual_rope_pos,
    text_rope_pos,
    scale_factor=(1.0, 1.0, 1.0),
    sparse_params=None,
    residual: torch.Tensor | None = None,
    want_residual: bool = False,
):
    """Kandinsky5Transformer3DModel.forward (diffusers 0.42.1), op for op, inference only.

    `encoder_hidden_states` may be a list (one unpadded text per batch element): the text path
    (embedding, text blocks) then runs per element, exactly as in a batch-1 call, and the refined
    texts are zero-padded to the longest for the (masked) cross-attention.
    With `residual` the visual blocks are skipped and `residual` is added instead (MagCache).
    Returns (sample, visual-block residual or None).
    """
    from diffusers.models.transformers.transformer_kandinsky import fractal_flatten, fractal_unflatten

    texts = encoder_hidden_states if isinstance(encoder_hidden_states, list) else [encoder_hidden_states]
    pooled = [tr.pooled_text_embeddings(pooled_projections[i : i + 1]) for i in range(pooled_projections.shape[0])]
    time_embed = tr.time_embeddings(timestep) + torch.cat(pooled)
    visual_embed = tr.visual_embeddings(hidden_states)
    refined = []
    for i, text in enumerate(texts):
        t_embed = time_embed if len(texts) == 1 else time_embed[i : i + 1]
        text_embed = tr.text_embeddings(text)
        text_rope = tr.text_rope_embeddings(text_rope_pos[: text.shape[1]]).unsqueeze(dim=0)
        for block in tr.text_transformer_blocks:
            text_embed = block(text_embed, t_embed, text_rope)
        refined.append(text_embed)
    longest = max(t.shape[1] for t in refined)
    text_embed = torch.cat([F.pad(t, (0, 0, 0, longest - t.shape[1])) for t in refined])

    visual_shape = visual_embed.shape[:-1]
    visual_rope = tr.visual_rope_embeddings(visual_shape, visual_rope_pos, scale_factor)
    to_fractal = sparse_params["to_fractal"] if sparse_params is not None else False
    visual_embed, visual_rope = fractal_flatten(visual_embed, visual_rope, visual_shape, block_mask=to_fractal)
    if residual is not None:
        visual_embed = visual_embed + residual
        new_residual = None
    else:
        before = visual_embed
        for block in tr.visual_transformer_blocks:
            visual_embed = block(visual_embed, text_embed, time_embed, visual_rope, sparse_params)
        new_residual = visual_embed - before if want_residual else None
    visual_embed = fractal_unflatten(visual_embed, visual_shape, block_mask=to_fractal)
    return tr.out_layer(visual_embed, text_embed, time_embed), new_residual


@dataclass
class _Stash:
    hidden_states: torch.Tensor
    timestep: torch.Tensor
    sample: torch.Tensor


class StepRunner:
    """Stands in for `transformer.forward` during one pipeline call (see the module docstring).

    `negative` is the (qwen, clip) pair the pipeline was given as negative embeddings; `None`
    when guidance is 1 (one call per step). `forwards` counts real transformer evaluations.
    """

    def __init__(
        self,
        transformer,
        negative: tuple[torch.Tensor, torch.Tensor] | None,
        batch_cfg: bool = True,
        magcache: MagCache | None = None,
    ):
        self.tr = transformer
        self.negative = negative
        self.batch_cfg = batch_cfg and negative is not None
        self.cache = magcache
        self.forwards = 0  # transformer evaluations (a batched cond+uncond counts once)
        self.batched = 0  # of which batched cond+uncond
        self._calls = 0
        self.started_at: float | None = None
        self._stash: _Stash | None = None
        self._state: TextKeyMask | None = getattr(transformer, "_k5_text_mask", None)

    # installed as transformer.forward for one call
    def install(self):
        import contextlib

        @contextlib.contextmanager
        def installed():
            previous = vars(self.tr).get("forward")
            self.tr.forward = self
            try:
                yield self
            finally:
                if previous is None:
                    del self.tr.forward
                else:
                    self.tr.forward = previous
                self._stash = None
                if self._state is not None:
                    self._state.key_mask, self._state.batched = None, False

        return installed()

    def __call__(
        self,
        hidden_states,
        encoder_hidden_states,
        timestep,
        pooled_projections,
        visual_rope_pos,
        text_rope_pos,
        scale_factor=(1.0, 1.0, 1.0),
        sparse_params=None,
        return_dict: bool = True,
    ):
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        if self.started_at is None:
            self.started_at = time.perf_counter()  # step timing starts here, not at prompt encoding
        hook = getattr(self.tr, "_hf_hook", None)  # accelerate model offload: bring the DiT onto the GPU
        if hook is not None:
            hook.pre_forward(self.tr)
        uncond = self.negative is not None and self._calls % 2 == 1
        self._calls += 1
        args = (visual_rope_pos, scale_factor, sparse_params)
        stash, self._stash = self._stash, None
        if uncond and stash is not None and self._same_step(stash, hidden_states, encoder_hidden_states, timestep):
            sample = stash.sample
        elif not uncond and self.batch_cfg:
            sample = self._batched(
                hidden_states, encoder_hidden_states, timestep, pooled_projections, text_rope_pos, *args
            )
        else:
            sample = self._single(
                int(uncond), hidden_states, encoder_hidden_states, timestep, pooled_projections, text_rope_pos, *args
            )
        return Transformer2DModelOutput(sample=sample) if return_dict else (sample,)

    def _same_step(self, stash: _Stash, hidden_states, encoder_hidden_states, timestep) -> bool:
        neg = self.negative[0]
        is_negative = encoder_hidden_states is neg or (
            encoder_hidden_states.shape == neg.shape and torch.equal(encoder_hidden_states, neg)
        )
        same_latents = hidden_states is stash.hidden_states or torch.equal(hidden_states, stash.hidden_states)
        return is_negative and same_latents and torch.equal(timestep, stash.timestep)

    def _evaluate(self, branches: list[int], *forward_args, **forward_kwargs) -> torch.Tensor:
        """One transformer evaluation for `branches` (batch order), with MagCache if on."""
        cache = self.cache
        residual = None
        if cache is not None:
            decisions = [cache.wants_skip(b) for b in branches]
            if all(decisions):
                cached = [cache.residual[b] for b in branches]
                residual = cached[0] if len(cached) == 1 else torch.cat(cached)
                cache.skipped += len(branches)
            else:
                for b, skip in zip(branches, decisions, strict=True):
                    if skip:
                        cache.computed(b)
        sample, new_residual = transformer_forward(
            self.tr, *forward_args, residual=residual, want_residual=cache is not None, **forward_kwargs
        )
        if residual is None:
            self.forwards += 1
            if cache is not None:
                for i, b in enumerate(branches):
                    cache.residual[b] = new_residual[i : i + 1]
        return sample

    def _single(self, branch, hidden_states, text, timestep, pooled, text_rope_pos, visual_rope_pos, scale, sparse):
        return self._evaluate(
            [branch], hidden_states, text, timestep, pooled, visual_rope_pos, text_rope_pos, scale, sparse
        )

    def _batched(self, hidden_states, text, timestep, pooled, text_rope_pos, visual_rope_pos, scale, sparse):
        neg_text, neg_pooled = self.negative
        neg_text = neg_text.to(text.dtype)
        lengths = [text.shape[1], neg_text.shape[1]]
        longest = max(lengths)
        state = self._state
        if lengths[0] != lengths[1]:
            if state is None:  # no masked processors: cannot batch exactly, stay sequential
                args = (hidden_states, text, timestep, pooled, text_rope_pos, visual_rope_pos, scale, sparse)
                return self._single(0, *args)
            positions = torch.arange(longest, device=text.device)
            state.key_mask = torch.stack([positions < n for n in lengths])[:, None, None, :]
        if state is not None:
            state.batched = True
        try:
            sample = self._evaluate(
                [0, 1],
                torch.cat([hidden_states, hidden_states]),
                [text, neg_text],
                torch.cat([timestep, timestep]),
                torch.cat([pooled, neg_pooled.to(pooled.dtype)]),
                visual_rope_pos,
                torch.arange(longest, device=text.device),
                scale,
                sparse,
            )
        finally:
            if state is not None:
                state.key_mask, state.batched = None, False
        self.batched += 1
        self._stash = _Stash(hidden_states, timestep, sample[1:2])
        return sample[0:1]


def magcache_for(variant_name: str, steps: int, cfg: bool, hd: bool = False) -> MagCache | None:
    """MagCache state for a variant at `steps`, or None when it has no official calibration."""
    from .mag_ratios import BORROWED, MAG_RATIOS

    name = BORROWED.get(variant_name, variant_name)
    ratios = (MAG_RATIOS.get(f"{name}@hd") if hd else None) or MAG_RATIOS.get(name)
    if ratios is None:
        return None
    return MagCache(ratios=list(ratios), steps=steps, cfg=cfg)
