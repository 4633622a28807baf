"""The streaming memory modes: weights live in host RAM and pass through the device as they are used.

Both are exact: the same modules compute the same ops on the same inputs; only where the weights
wait between uses changes (tests/pipelines/test_memory_modes.py checks the frames equal the
resident ones on the CPU).

- `stream_text`: the Qwen text encoder is streamed leaf by leaf (diffusers' `apply_group_offloading`,
  leaf level); CLIP, the transformer and the VAE stay on the device.
- `stream`: the text encoder as above, and the transformer's visual blocks streamed one block at a
  time (diffusers' group offloading, block level). Their modulations are computed on the host, once
  per step for every block (lean.py), so only the blocks' bf16 weights move. Everything else of the
  transformer (embeddings, text blocks, output layer: 2.1 GB of Pro's 43) and the VAE stay.

On CUDA the copies run on a side stream from pinned host memory, each block's copy issued while the
block before it computes (`_chain_prefetch`); on the CPU the same hooks run without a stream (the
"device" is the host), which is what the CPU tests exercise.

Why the blocks are hooked through a holder and chained here rather than by diffusers' lazy
prefetching: diffusers learns the order from a first call of the *top-level* module's forward, and
k5serve's StepRunner (denoise.py) stands in for the transformer's forward and calls its parts
directly, so that hook would never fire. The visual blocks always run in index order, so the chain
is written down instead of traced.
"""

from __future__ import annotations

import itertools

import torch

from .lean import install_host_modulations

STREAMED = "_k5_streamed"  # attribute set on a streamed module: the engine must not move it whole


def is_streamed(module) -> bool:
    return bool(getattr(module, STREAMED, False))


def _group_hook(module):
    from diffusers.hooks.group_offloading import _GROUP_OFFLOADING

    registry = getattr(module, "_diffusers_hook", None)
    return registry.get_hook(_GROUP_OFFLOADING) if registry is not None else None


def _chain_prefetch(blocks) -> None:
    """Block i, as it starts, issues block i+1's copy on the side stream (what diffusers'
    LazyPrefetchGroupOffloadingHook sets up after tracing a first call); block 0 loads itself."""
    hooks = [_group_hook(b) for b in blocks]
    for hook, following in itertools.pairwise(hooks):
        hook.next_group = following.group
        following.group.onload_self = False
    for hook in hooks:
        hook.group.non_blocking = True


def stream_visual_blocks(transformer, device: str) -> None:
    """Group-offload the transformer's visual blocks (one block per group) with onload to `device`;
    the rest of the transformer goes to `device`. Host modulations are installed first, so the
    streamed groups hold the blocks' weights without them."""
    from diffusers.hooks import apply_group_offloading

    install_host_modulations(transformer)
    blocks = transformer.visual_transformer_blocks
    for name, child in transformer.named_children():
        if name != "visual_transformer_blocks":
            child.to(device)
    blocks.to("cpu")
    cuda = device.startswith("cuda")
    holder = torch.nn.Module()  # a parent whose only child is the block list: no top-level group
    holder.blocks = blocks
    apply_group_offloading(
        holder,
        onload_device=torch.device(device),
        offload_device=torch.device("cpu"),
        offload_type="block_level",
        num_blocks_per_group=1,
        use_stream=cuda,
        record_stream=cuda,
    )
    if cuda:
        _chain_prefetch(list(blocks))
    setattr(transformer, STREAMED, True)


def stream_text_encoder(text_encoder, device: str) -> None:
    """Group-offload the Qwen encoder leaf by leaf with onload to `device` (streams and pinned
    copies on CUDA; diffusers then traces the leaves' order on the first encode and prefetches)."""
    from diffusers.hooks import apply_group_offloading

    text_encoder.to("cpu")
    cuda = device.startswith("cuda")
    apply_group_offloading(
        text_encoder,
        onload_device=torch.device(device),
        offload_device=torch.device("cpu"),
        offload_type="leaf_level",
        use_stream=cuda,
        record_stream=cuda,
    )
    setattr(text_encoder, STREAMED, True)


def place_streamed(pipe, device: str, mode: str) -> None:
    """Put a pipeline's models in place for memory mode `mode` (stream_text or stream)."""
    if mode not in ("stream_text", "stream"):
        raise ValueError(f"not a streaming memory mode: {mode!r}")
    stream_text_encoder(pipe.text_encoder, device)
    pipe.text_encoder_2.to(device)
    pipe.vae.to(device)
    if mode == "stream":
        stream_visual_blocks(pipe.transformer, device)
    else:
        pipe.transformer.to(device)
