"""Stage 4 in temporal chunks (pipelines/decode.py) on the tiny real VAE, on CPU: the same frames as
the one-shot decode (generation.decode_latents, the mirror of diffusers), progress per chunk, and a
cancel during the decode that stops it before its end and leaves no file."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.decode import decode_in_chunks, windows
from pipelines.errors import Cancelled
from pipelines.generation import decode_latents
from pipelines.request import CancelToken, GenerationRequest

T2V = "kandinsky5-tiny-t2v"


def t2v(**kw) -> GenerationRequest:
    args = dict(variant=T2V, prompt="a red fox running through snow", width=64, height=64, steps=1, seed=7)
    return GenerationRequest(**{**args, **kw})


@pytest.fixture
def pipe(engine):
    pipe = engine.pipeline(T2V)
    tiling = pipe.vae.use_tiling
    yield pipe
    pipe.vae.use_tiling = tiling


def latents(frames: int, height: int = 8, width: int = 8) -> torch.Tensor:
    """Latents as the denoising loop leaves them: (1, T, H/8, W/8, 16)."""
    return torch.randn(1, frames, height, width, 16, generator=torch.Generator().manual_seed(frames))


@pytest.mark.parametrize("frames, chunks", [(3, 1), (5, 2), (7, 3), (13, 5)])
@torch.no_grad()
def test_chunked_decode_is_the_one_shot_decode_bit_for_bit(pipe, frames, chunks):
    """9 to 49 video frames; from 5 latent frames diffusers itself decodes in temporal windows."""
    z = latents(frames)
    assert len(windows(pipe.vae, frames)) == chunks
    seen = []
    chunked = decode_in_chunks(pipe, z, CancelToken(), lambda i, n: seen.append((i, n)))
    assert np.array_equal(chunked, decode_latents(pipe, z))
    assert seen == [(i, chunks) for i in range(chunks + 1)]


@torch.no_grad()
def test_chunked_decode_is_exact_with_spatial_tiles_too(pipe, monkeypatch):
    """With tiling on (memory plans for big videos), each window is decoded in spatial tiles, as in
    diffusers: the tile size is shrunk so that a 128x96 video has 4x3 tiles in each window."""
    for name, value in dict(tile_sample_min_height=32, tile_sample_min_width=32).items():
        monkeypatch.setattr(pipe.vae, name, value)
    for name, value in dict(tile_sample_stride_height=24, tile_sample_stride_width=24).items():
        monkeypatch.setattr(pipe.vae, name, value)
    pipe.vae.use_tiling = True
    z = latents(7, height=12, width=16)
    assert np.array_equal(decode_in_chunks(pipe, z, CancelToken()), decode_latents(pipe, z))


def test_engine_reports_its_phases_in_order_around_the_steps(engine, tmp_path):
    """Loading, encoding (before the first step: issue 17's "loading model", "encoding prompt"), the
    steps, then each decode chunk and the write, in one ordered stream as a watcher sees them."""
    seen = []
    engine.generate(
        t2v(num_frames=25, steps=2),
        tmp_path / "v.mp4",
        on_step=lambda i, n: seen.append(("step", i, n)),
        on_phase=lambda *p: seen.append(p),
    )
    decoding = [("decoding", i, 3) for i in range(4)]
    assert seen == [("loading", 0, 1), ("encoding", 0, 1), ("step", 1, 2), ("step", 2, 2), *decoding, ("writing", 0, 1)]


def test_cancel_during_decode_stops_before_its_end_and_writes_nothing(engine, tmp_path):
    """A cancel sent while chunk 2 of 3 decodes: chunk 3 never starts, no file is written."""
    pipe = engine.pipeline(T2V)
    decode = pipe.vae.decode
    calls = []

    def counting_decode(*args, **kwargs):
        calls.append(args[0].shape[2])  # latent frames of this call
        if len(calls) == 2:
            token.cancel()  # the client's cancel arrives while this chunk decodes
        return decode(*args, **kwargs)

    token, phases = CancelToken(), []
    pipe.vae.decode = counting_decode
    out = tmp_path / "cancelled.mp4"
    try:
        with pytest.raises(Cancelled):
            engine.generate(t2v(num_frames=25), out, on_phase=lambda *p: phases.append(p), cancel=token)
    finally:
        del pipe.vae.decode
    assert calls == [5, 4]  # two windows of the three (latent frames 0-4, 3-6), then it stopped
    assert phases[2:] == [("decoding", 0, 3), ("decoding", 1, 3), ("decoding", 2, 3)]  # after loading, encoding
    assert not out.exists() and not list(tmp_path.iterdir())
