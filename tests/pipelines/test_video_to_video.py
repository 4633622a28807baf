"""Remix / edit (video-to-video) and extensions on the tiny models, CPU: strength 1.0 is a plain
generation bit for bit, a remix keeps the source's size and length, an extension is stitched with
no frame twice at the seam, and a clip longer than one pass is made by chained extension in one run."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from pipelines.clips import probe, read_frames
from pipelines.errors import InvalidRequest
from pipelines.extension import continuation_pass, run_passes
from pipelines.request import GenerationRequest, ResolvedRequest, resolve
from pipelines.video import read_mp4

T2V = "kandinsky5-tiny-t2v"
PROMPT = "a red fox running through snow"


def t2v(**kw) -> GenerationRequest:
    args = dict(variant=T2V, prompt=PROMPT, width=64, height=48, num_frames=9, steps=2, seed=7)
    return GenerationRequest(**{**args, **kw})


@pytest.fixture(scope="module")
def source(engine, tmp_path_factory):
    """A 9-frame 64x48 clip made by the engine (as a finished job's output is)."""
    path = tmp_path_factory.mktemp("src") / "source.mp4"
    engine.generate(t2v(seed=3), path)
    return path


class ListSink:
    def __init__(self):
        self.parts: list[np.ndarray] = []

    def send(self, frames):
        self.parts.append(np.asarray(frames))

    @property
    def frames(self) -> np.ndarray:
        return np.concatenate(self.parts)


# ---- video-to-video -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plain(engine):
    """A plain text-to-video of the prompt the remixes use, at the source's size and length."""
    return engine.generate_frames(t2v(prompt="a cat on a wooden floor")).frames


def test_strength_one_is_a_plain_generation_bit_for_bit(engine, source, plain):
    """The remix path (source decoded, VAE-encoded, mixed with the seed's noise at sigma 1, scheduler
    window from step 0) with strength 1.0 equals a plain generation with the same seed."""
    remix = engine.prepare(
        GenerationRequest(
            variant=T2V, prompt="a cat on a wooden floor", video=str(source), strength=1.0, steps=2, seed=7
        )
    )
    assert (remix.video, remix.strength, remix.width, remix.height, remix.num_frames) == (str(source), 1.0, 64, 48, 9)
    done = engine.generate_frames(remix)
    assert "encode_video" in done.timings  # the source really went through the VAE
    assert np.array_equal(plain, done.frames)


def test_a_remix_keeps_the_sources_size_and_length_and_runs_the_strengths_steps(engine, source, plain):
    req = GenerationRequest(variant=T2V, prompt="a cat on a wooden floor", video=str(source), strength=0.5, seed=7)
    r = engine.prepare(dataclasses.replace(req, steps=4))
    assert (r.width, r.height, r.num_frames) == (64, 48, 9)
    seen = []
    remixed = engine.generate_frames(r, on_step=lambda i, n: seen.append((i, n))).frames
    assert seen == [(1, 2), (2, 2)]  # int(4 * 0.5) steps: the tail of the schedule
    assert remixed.shape == (9, 48, 64, 3)
    assert np.abs(remixed - plain).mean() > 0.01  # it started from the source, not from noise


def test_remix_refuses_what_it_cannot_keep(source):
    with pytest.raises(InvalidRequest) as bad:
        resolve(GenerationRequest(variant=T2V, prompt=PROMPT, video=str(source), num_frames=17))
    assert bad.value.field == "num_frames"
    with pytest.raises(InvalidRequest) as bad:
        resolve(GenerationRequest(variant=T2V, prompt=PROMPT, video=str(source), strength=0.0))
    assert bad.value.field == "strength"
    with pytest.raises(InvalidRequest) as bad:
        resolve(GenerationRequest(variant=T2V, prompt=PROMPT, video=__file__))
    assert bad.value.field == "video" and "not a readable video" in bad.value.message


# ---- extensions and long clips --------------------------------------------------------------


def test_an_extension_is_the_source_then_the_new_pass_without_its_conditioning_frame(engine, source):
    r = engine.prepare(GenerationRequest(variant=T2V, prompt="it keeps running", extend=str(source), num_frames=16,
                                         steps=2, seed=5))  # fmt: skip
    assert (r.source_frames, r.num_frames, r.passes, r.extensions) == (9, 25, [9, 16], 1)
    assert r.continuation == "kandinsky5-tiny-i2v" and (r.width, r.height) == (64, 48)
    sink, seen = ListSink(), []
    done = run_passes(engine, r, sink, on_step=lambda i, n: seen.append((i, n)), on_phase=None, cancel=_token())
    stitched = sink.frames
    assert done.frames == len(stitched) == 25
    src = np.stack(list(read_frames(str(source), 64, 48)))
    assert np.array_equal(stitched[:9], src)  # the source, untouched
    # the new pass, re-run alone: the stitch keeps its frames 1.. and drops frame 0, the conditioning one
    from PIL import Image

    alone = engine.generate_frames(continuation_pass(r, 1, 16, r.prompt), image=Image.fromarray(src[-1])).frames
    alone = np.clip(alone * 255, 0, 255).round().astype(np.uint8)
    assert len(alone) == 17 and np.array_equal(stitched[9:], alone[1:])
    assert not np.array_equal(stitched[8], stitched[9])  # no frame twice at the seam
    assert seen == [(1, 2), (2, 2)]


def test_a_clip_longer_than_one_pass_is_chained_in_one_run(engine, tmp_path):
    r = engine.prepare(t2v(num_frames=41, seed=11))  # tiny makes 25 frames per pass
    assert r.passes == [25, 16] and r.continuation == "kandinsky5-tiny-i2v"
    seen, phases = [], []
    result = engine.generate(
        r, tmp_path / "long.mp4", on_step=lambda i, n: seen.append((i, n)), on_phase=lambda p, i, n: phases.append(p)
    )
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]  # one progress scale across both passes
    # the first pass's load and encode, the last pass's decode: one run's phases, in order, once each
    assert phases[:3] == ["loading", "encoding", "decoding"] and phases[-1] == "writing"
    assert set(phases[3:-1]) == {"decoding"}
    frames, _meta = read_mp4(result.path)
    assert result.num_frames == len(frames) == 41 and frames.shape[1:3] == (48, 64)
    assert probe(str(result.path)).frames == 41


def test_extension_limits(source):
    with pytest.raises(InvalidRequest):
        resolve(GenerationRequest(variant=T2V, prompt=PROMPT, extend=str(source), seconds=21))
    with pytest.raises(InvalidRequest) as bad:
        resolve(GenerationRequest(variant=T2V, prompt=PROMPT, extend=str(source), source_extensions=6))
    assert "six" in bad.value.message
    with pytest.raises(InvalidRequest):
        resolve(t2v(num_frames=2885))  # 120 s at most


def test_resolved_requests_round_trip_and_old_records_load(engine, source):
    r = engine.prepare(GenerationRequest(variant=T2V, prompt=PROMPT, extend=str(source), num_frames=16))
    assert ResolvedRequest.from_dict(r.to_dict()) == r
    old = {k: v for k, v in engine.prepare(t2v()).to_dict().items() if k not in ("video", "strength", "continuation")}
    loaded = ResolvedRequest.from_dict(old)
    assert loaded.video is None and loaded.strength == 1.0 and loaded.passes == [9]


def _token():
    from pipelines.cancel import CancelToken

    return CancelToken()


def test_demo_mode_makes_remixes_extensions_and_long_clips_on_the_tiny_models(engine, source):
    lite = "kandinsky5-lite-t2v-sft-5s"  # no weights here: demo mode
    remix = engine.prepare(GenerationRequest(variant=lite, prompt=PROMPT, video=str(source)))
    assert (remix.demo, remix.variant.name, remix.num_frames, remix.strength) == (True, T2V, 9, 0.5)
    assert (remix.width, remix.height) == (256, 160)  # Lite's 768x512 for a 4:3 source, at demo size
    ext = engine.prepare(GenerationRequest(variant=lite, prompt=PROMPT, extend=str(source), seconds=4))
    assert ext.demo and ext.continuation == "kandinsky5-tiny-i2v" and ext.passes == [9, 24]  # one tiny pass
    long = engine.prepare(GenerationRequest(variant=lite, prompt=PROMPT, num_frames=289))
    assert long.demo and long.continuation is None and long.passes == [25]  # cut to one tiny pass


def test_a_cancel_in_a_later_pass_stops_the_run_and_leaves_no_file(engine, tmp_path):
    from pipelines.cancel import CancelToken
    from pipelines.errors import Cancelled

    token, out = CancelToken(), tmp_path / "cut.mp4"

    def on_step(i, n):
        if i == 3:  # the first step of the second pass
            token.cancel()

    with pytest.raises(Cancelled):
        engine.generate(engine.prepare(t2v(num_frames=29)), out, on_step=on_step, cancel=token)  # [13, 16]
    assert list(tmp_path.iterdir()) == []  # not the first pass's frames, nor a temp file
