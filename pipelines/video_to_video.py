"""Video-to-video (remix, edit): a new video that keeps a source's structure, on the stock pipeline.

diffusers' img2img rule on the flow-matching schedule, for video: the source mp4 is decoded
(clips.read_frames: 24 fps, fitted to the request's size), encoded with the VAE (the latent mean:
no random draw, so the seed's noise is the one a plain generation draws), and mixed with that noise
at the noise level where the last `int(steps * strength)` steps of the schedule start
(`scheduler.scale_noise`, the flow-matching forward process x_t = sigma*noise + (1 - sigma)*x_0).
The stock pipeline then denoises from there with the new prompt: it is given those latents and a
scheduler whose timesteps start at that step (`window`). The first sigma of the schedule is 1, so
strength 1.0 starts from the noise itself and is a plain generation, bit for bit
(tests/pipelines/test_video_to_video.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np

from .clips import read_frames
from .request import ResolvedRequest
from .request_video import steps_to_run


def start_index(r: ResolvedRequest) -> int:
    """The schedule step a video-to-video starts at (0 for strength 1.0)."""
    return r.steps - steps_to_run(r.steps, r.strength)


def start_latents(pipe, r: ResolvedRequest) -> Any:
    """The latents the denoising starts from (B, T, H/8, W/8, C [+ the T2V pipeline's visual
    conditioning channels]): the source's, noised to the start step's sigma."""
    import torch
    from diffusers.utils.torch_utils import randn_tensor

    device, dtype = pipe._execution_device, pipe.transformer.dtype
    frames = np.stack(list(read_frames(r.video, r.width, r.height, limit=r.num_frames)))
    if len(frames) != r.num_frames:  # the file changed since admission counted its frames
        raise ValueError(f"the source video has {len(frames)} frames, {r.num_frames} were planned")

    # the noise, drawn exactly as Kandinsky5T2VPipeline.prepare_latents draws it (diffusers 0.42.1)
    temporal, spatial = pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial
    channels = pipe.transformer.config.in_visual_dim
    shape = (1, (r.num_frames - 1) // temporal + 1, r.height // spatial, r.width // spatial, channels)
    generator = torch.Generator(device="cpu").manual_seed(r.seed)
    noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)

    # the source: uint8 (F, H, W, 3) -> [-1, 1] (1, 3, F, H, W), as the video processor normalises
    video = torch.from_numpy(frames).to(device=device, dtype=pipe.vae.dtype).permute(3, 0, 1, 2)[None]
    video = video / 127.5 - 1.0
    source = pipe.vae.encode(video).latent_dist.mode() * pipe.vae.config.scaling_factor
    source = source.permute(0, 2, 3, 4, 1).to(device=device, dtype=dtype)  # (B, T, H/8, W/8, C)

    scheduler = pipe.scheduler
    scheduler.set_timesteps(r.steps, device=device)
    start = start_index(r)
    scheduler.set_begin_index(start)
    latents = scheduler.scale_noise(source, scheduler.timesteps[start : start + 1], noise).to(dtype)
    if pipe.transformer.visual_cond:  # prepare_latents' zero conditioning and mask, as for T2V
        mask = torch.zeros((*shape[:-1], 1), dtype=dtype, device=device)
        latents = torch.cat([latents, torch.zeros_like(latents), mask], dim=-1)
    return latents


@contextlib.contextmanager
def window(scheduler, start: int) -> Iterator[None]:
    """For one pipeline call: the scheduler's `set_timesteps` keeps only the steps from `start` on
    and starts its step index there (diffusers' `get_timesteps` + `set_begin_index` of its img2img
    pipelines, which the Kandinsky 5 pipelines do not have)."""
    original = scheduler.set_timesteps

    def set_timesteps(*args, **kwargs):
        original(*args, **kwargs)
        scheduler.timesteps = scheduler.timesteps[start:]
        scheduler.set_begin_index(start)

    scheduler.set_timesteps = set_timesteps
    try:
        yield
    finally:
        del scheduler.set_timesteps
