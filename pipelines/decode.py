"""Stage 4, decode, in temporal chunks: the same frames as diffusers' one-shot decode, bit for bit,
with a cancel check and a progress report between chunks.

diffusers' `AutoencoderKLHunyuanVideo.decode` already decodes a video of more than
`tile_sample_min_num_frames // 4` latent frames (4, i.e. anything over 13 frames) in temporal tiles:
`_temporal_tiled_decode` runs the decoder on windows of 5 latent frames every 3 (each window alone:
the causal convolutions and the mid-block's causal attention see only their window), keeps them all,
then cross-fades the overlaps (`blend_t`). This module runs the very same windows one at a time
through `vae.decode` (framewise decoding switched off for the window, so `_decode` takes the branch
`_temporal_tiled_decode` takes for a window: spatial tiles when tiling is on, else post_quant_conv +
decoder) and then blends them with the VAE's own `blend_t` in the same order. Same ops on the same
tensors: the frames are identical (tests/pipelines/test_decode.py compares with `decode_latents`).

A 5 s video (31 latent frames) decodes in 11 windows, 10 s in 21: a cancel during the decode stops
within one window. Videos of 4 latent frames or fewer are one window, as in diffusers. Going through
`vae.decode` (not `vae.decoder`) keeps model offload's hooks: the VAE is moved in as for one call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .cancel import Cancellation

ChunkCallback = Callable[[int, int], None]  # (windows decoded, windows in all), from (0, n)


def windows(vae, latent_frames: int) -> list[int]:
    """Start latent frame of each window `vae.decode` would decode on its own ([0]: one window)."""
    size = vae.tile_sample_min_num_frames // vae.temporal_compression_ratio
    if not vae.use_framewise_decoding or latent_frames <= size:
        return [0]
    stride = vae.tile_sample_stride_num_frames // vae.temporal_compression_ratio
    return list(range(0, latent_frames, stride))


def decode_in_chunks(pipe, latents, cancel: Cancellation, on_chunk: ChunkCallback | None = None) -> Any:
    """Latents (B, T, H/8, W/8, C) -> float frames (B, F, H, W, 3) in [0, 1], exactly as
    generation.decode_latents, one temporal window at a time; raises Cancelled between windows."""
    vae = pipe.vae
    z = vae_input(pipe, latents)
    starts = windows(vae, z.shape[2])
    report = on_chunk or (lambda _i, _n: None)
    report(0, len(starts))
    if len(starts) == 1:
        cancel.raise_if_cancelled()
        video = vae.decode(z).sample
        report(1, 1)
    else:
        video = _windowed(vae, z, starts, cancel, report)
    return pipe.video_processor.postprocess_video(video, output_type="np")


def vae_input(pipe, latents) -> Any:
    """Latents (B, T, H/8, W/8, C) -> the VAE's input (B, C, T, H/8, W/8), scaled, as the pipeline."""
    batch, frames, height, width, channels = latents.shape
    latents = latents.to(pipe.vae.dtype)
    video = latents.reshape(batch, 1, frames, height, width, channels)
    video = video.permute(0, 1, 5, 2, 3, 4)  # [batch, num_videos, channels, frames, height, width]
    video = video.reshape(batch, channels, frames, height, width)
    return video / pipe.vae.config.scaling_factor


def _windowed(vae, z, starts: list[int], cancel: Cancellation, report: ChunkCallback):
    """`AutoencoderKLHunyuanVideo._temporal_tiled_decode` (diffusers 0.42.1), its decode loop split
    by window with the cancel check; the blend below is its second loop, unchanged."""
    import torch

    num_frames = z.shape[2]
    num_sample_frames = (num_frames - 1) * vae.temporal_compression_ratio + 1
    tile_latent_min_num_frames = vae.tile_sample_min_num_frames // vae.temporal_compression_ratio
    blend_num_frames = vae.tile_sample_min_num_frames - vae.tile_sample_stride_num_frames

    row = []
    framewise = vae.use_framewise_decoding
    vae.use_framewise_decoding = False  # one window per call: `_decode` takes the window's branch
    try:
        for k, i in enumerate(starts):
            cancel.raise_if_cancelled()
            tile = z[:, :, i : i + tile_latent_min_num_frames + 1, :, :]
            decoded = vae.decode(tile).sample
            if i > 0:
                decoded = decoded[:, :, 1:, :, :]
            row.append(decoded)
            report(k + 1, len(starts))
    finally:
        vae.use_framewise_decoding = framewise

    result_row = []
    for i, tile in enumerate(row):
        if i > 0:
            tile = vae.blend_t(row[i - 1], tile, blend_num_frames)
            result_row.append(tile[:, :, : vae.tile_sample_stride_num_frames, :, :])
        else:
            result_row.append(tile[:, :, : vae.tile_sample_stride_num_frames + 1, :, :])
    return torch.cat(result_row, dim=2)[:, :, :num_sample_frames]
