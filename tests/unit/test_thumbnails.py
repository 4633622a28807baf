"""server/thumbnails.py: poster frames and spritesheets decoded back from real mp4s (ffmpeg + Pillow)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipelines.video import write_mp4
from server import thumbnails
from server.thumbnails import SpriteLayout, sprite_layout

STEP = 7  # frame i is flat gray i*STEP: a tile's mean says which frame it shows


def gray_clip(path, frames: int, width: int, height: int):
    levels = np.arange(frames, dtype=np.uint8) * STEP
    write_mp4(np.broadcast_to(levels[:, None, None, None], (frames, height, width, 3)).copy(), path)
    return path


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return gray_clip(tmp_path_factory.mktemp("thumbs") / "output.mp4", 33, 64, 48)


def test_layout_spaces_frames_evenly_with_both_ends():
    layout = sprite_layout(1280, 720, 97)
    assert layout.frames[0] == 0 and layout.frames[-1] == 96 and len(layout.frames) == 16
    assert (layout.columns, layout.rows, layout.tile_width, layout.tile_height) == (4, 4, 256, 144)
    assert layout.size == (1024, 576)
    assert sprite_layout(720, 1280, 481).size == (576, 1024)
    # fewer frames than tiles: each once; small videos are not enlarged
    assert sprite_layout(64, 48, 5) == SpriteLayout((0, 1, 2, 3, 4), 4, 2, 64, 48)
    assert sprite_layout(64, 48, 1) == SpriteLayout((0,), 1, 1, 64, 48)
    with pytest.raises(ValueError):
        sprite_layout(64, 48, 0)


def test_probe_counts_frames_without_decoding(clip):
    assert thumbnails.probe(clip) == (64, 48, 33)


def test_poster_is_the_first_frame_as_webp(clip, tmp_path):
    image = Image.open(io.BytesIO(thumbnails.poster_webp(clip)))
    assert image.format == "WEBP" and image.size == (64, 48)
    assert abs(float(np.asarray(image.convert("L")).mean()) - 0) < 3


def test_spritesheet_tiles_show_the_chosen_frames(clip):
    image = Image.open(io.BytesIO(thumbnails.spritesheet_jpg(clip)))
    layout = sprite_layout(64, 48, 33)
    assert image.format == "JPEG" and image.size == layout.size == (256, 192)
    pixels = np.asarray(image.convert("L"), dtype=float)
    for k, frame in enumerate(layout.frames):
        row, col = divmod(k, layout.columns)
        tile = pixels[row * 48 + 4 : (row + 1) * 48 - 4, col * 64 + 4 : (col + 1) * 64 - 4]
        assert abs(tile.mean() - frame * STEP) < 3, (k, frame, tile.mean())


def test_short_portrait_clip_and_a_file_that_is_not_a_video(tmp_path):
    short = gray_clip(tmp_path / "short.mp4", 3, 48, 96)
    image = Image.open(io.BytesIO(thumbnails.spritesheet_jpg(short)))
    assert image.size == (3 * 48, 96)
    bogus = tmp_path / "bogus.mp4"
    bogus.write_bytes(b"not a video")
    for make in (thumbnails.spritesheet_jpg, thumbnails.poster_webp):
        with pytest.raises(ValueError, match="could not read"):
            make(bogus)


def test_cached_makes_a_preview_once_next_to_the_video(clip):
    calls = []

    def make():
        calls.append(1)
        return b"preview"

    path = thumbnails.cached(clip, "thumbnail.webp", make)
    assert path == clip.with_name("thumbnail.webp") and path.read_bytes() == b"preview"
    assert thumbnails.cached(clip, "thumbnail.webp", make) == path and calls == [1]
    assert [p.name for p in clip.parent.iterdir() if p.name.endswith(".part")] == []
