"""Source videos (pipelines/clips.py, torch-free): read at 24 fps and fitted to the size that runs,
counted the way they are read; long clips cut into passes."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.clips import plan_passes, probe, read_frames
from pipelines.errors import InvalidRequest
from pipelines.request_video import steps_to_run
from pipelines.variants import VARIANTS, fit_size


@pytest.fixture(scope="module")
def clip_30fps(tmp_path_factory):
    """1.5 s of 100x60 noise at 30 fps: another rate and a size no model makes."""
    import imageio_ffmpeg

    path = tmp_path_factory.mktemp("clips") / "phone.mp4"
    rng = np.random.default_rng(0)
    writer = imageio_ffmpeg.write_frames(str(path), (100, 60), fps=30, macro_block_size=1, ffmpeg_log_level="error")
    writer.send(None)
    for _ in range(45):
        writer.send(np.ascontiguousarray(rng.integers(0, 255, (60, 100, 3), dtype=np.uint8)))
    writer.close()
    return path


def test_a_30fps_clip_is_resampled_to_24_and_counted_as_read(clip_30fps):
    info = probe(str(clip_30fps))
    assert (info.width, info.height, info.fps, info.frames) == (100, 60, 30.0, 36)  # 1.5 s at 24 fps
    frames = list(read_frames(str(clip_30fps), 64, 48))
    assert len(frames) == info.frames and frames[0].shape == (48, 64, 3) and frames[0].dtype == np.uint8
    assert len(list(read_frames(str(clip_30fps), 64, 48, limit=9))) == 9


def test_what_is_not_a_video_is_refused_by_name(tmp_path):
    bad = tmp_path / "x.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42FAKE" * 10)
    for path in (bad, tmp_path / "missing.mp4"):
        with pytest.raises(InvalidRequest) as info:
            probe(str(path))
        assert info.value.field == "video" and str(tmp_path) not in str(info.value.value)  # no server path


def test_sizes_fit_the_model_and_passes_cover_the_clip():
    lite = VARIANTS["kandinsky5-lite-t2v-sft-5s"]
    assert fit_size(lite, 768, 512) == (768, 512)
    assert fit_size(lite, 1280, 720) == (768, 512) and fit_size(lite, 720, 1280) == (512, 768)
    assert fit_size(VARIANTS["kandinsky5-tiny-t2v"], 1280, 720) == (256, 144)
    assert plan_passes(289, 121, 120) == [121, 84, 84]
    assert plan_passes(125, 121, 120) == [109, 16]  # the last pass adds at least 16 frames
    assert plan_passes(121, 121, 120) == [121] and plan_passes(2881, 121, 120)[0] == 121
    assert sum(plan_passes(2881, 121, 120)) == 2881 and min(plan_passes(2881, 121, 120)[1:]) >= 16
    assert [steps_to_run(16, s) for s in (1.0, 0.5, 0.3, 0.01)] == [16, 8, 5, 1]
