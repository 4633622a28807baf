"""Encoded negative prompts kept between jobs: the default one is the same for every job.

Exact: the pipeline would run the same deterministic `encode_prompt` on every call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .variants import DEFAULT_NEGATIVE_PROMPT

CACHE_SIZE = 8  # encoded negative prompts kept per engine; the default one is kept even past it


@dataclass(frozen=True)
class PromptEmbeds:
    """One encoded prompt, as the Kandinsky 5 pipelines take it (`prompt_embeds_*` / `prompt_cu_seqlens`)."""

    qwen: Any  # (1, tokens, 3584) Qwen2.5-VL hidden states
    clip: Any  # (1, 768) CLIP pooled embedding
    cu_seqlens: Any  # (2,) int32: [0, tokens]


Encode = Callable[[str], PromptEmbeds]


class NegativePromptCache:
    """Encoded negative prompts by (variant, text). `enabled=False` encodes on every call (to
    measure the cache, bench/generate.py --ablate)."""

    def __init__(self, enabled: bool = True, size: int = CACHE_SIZE):
        self.enabled = enabled
        self.size = size
        self._embeds: dict[tuple[str, str], PromptEmbeds] = {}

    def get(self, variant: str, negative: str | None, encode: Encode) -> PromptEmbeds:
        """The embeddings of `negative` (None: the default negative prompt) for `variant`."""
        text = DEFAULT_NEGATIVE_PROMPT if negative is None else negative
        key = (variant, text)
        embeds = self._embeds.get(key) if self.enabled else None
        if embeds is None:
            embeds = encode(text)
            if self.enabled and (text == DEFAULT_NEGATIVE_PROMPT or len(self._embeds) < self.size):
                self._embeds[key] = embeds
        return embeds
