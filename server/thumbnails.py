"""Preview images of a finished mp4, made without torch: ffmpeg (imageio-ffmpeg) decodes, Pillow encodes.

- **Poster** (`poster_webp`): the video's first frame at the video's own size, as WebP. The first
  frame because it is what a player shows before it starts, and it is the one frame ffmpeg hands
  over without decoding the rest (for image-to-video it is the input image as the model made it).
- **Spritesheet** (`spritesheet_jpg`): `SPRITE_FRAMES` (16) frames evenly spaced over the clip,
  the first and the last included, each scaled so its longer side is at most `SPRITE_TILE` (256)
  pixels (never enlarged; both sides even), laid out left to right, top to bottom, in a grid
  `SPRITE_COLUMNS` (4) wide, as one JPEG. A clip with fewer frames shows each frame once, in
  min(frames, 4) columns. A 1280x720 clip gives a 1024x576 sheet of 256x144 tiles; 720x1280 gives
  576x1024. `sprite_layout` computes the layout (a scrubber needs it to map a tile to a time).

`cached` writes a preview next to its mp4 once (atomically) and returns its path, so the files live
and die with the output folder (a delete or an expiry removes them with the video).
"""

from __future__ import annotations

import io
import math
import os
import re
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SPRITE_FRAMES = 16
SPRITE_COLUMNS = 4
SPRITE_TILE = 256
WEBP_QUALITY = 85
JPEG_QUALITY = 85

POSTER_NAME = "thumbnail.webp"
SPRITESHEET_NAME = "spritesheet.jpg"


@dataclass(frozen=True)
class SpriteLayout:
    frames: tuple[int, ...]  # indices of the frames shown, in tile order
    columns: int
    rows: int
    tile_width: int
    tile_height: int

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the whole sheet."""
        return self.columns * self.tile_width, self.rows * self.tile_height


def sprite_layout(
    width: int, height: int, num_frames: int, frames: int = SPRITE_FRAMES, columns: int = SPRITE_COLUMNS
) -> SpriteLayout:
    """Which frames a sheet of a `width`x`height`, `num_frames`-frame clip shows, and where."""
    if width < 1 or height < 1 or num_frames < 1:
        raise ValueError(f"no frames to lay out ({width}x{height}, {num_frames} frames)")
    shown = min(frames, num_frames)
    if shown == 1:
        indices: tuple[int, ...] = (0,)
    else:  # evenly spaced, both ends included; distinct because shown <= num_frames
        indices = tuple(round(i * (num_frames - 1) / (shown - 1)) for i in range(shown))
    scale = min(1.0, SPRITE_TILE / max(width, height))
    tile_w, tile_h = (max(2, 2 * round(side * scale / 2)) for side in (width, height))
    cols = min(columns, shown)
    return SpriteLayout(indices, cols, math.ceil(shown / cols), tile_w, tile_h)


def _ffmpeg() -> str:
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def _decode(mp4: Path, output_params: list[str]) -> tuple[dict, list[np.ndarray]]:
    """ffmpeg's metadata and the (H, W, 3) uint8 frames it outputs with `output_params`."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(mp4), output_params=output_params)
    try:
        meta = next(reader)
        w, h = meta["size"]
        frames = [np.frombuffer(buf, dtype=np.uint8).reshape(h, w, 3) for buf in reader]
    except (OSError, RuntimeError) as exc:  # imageio-ffmpeg's words for "ffmpeg could not read it"
        raise ValueError(f"ffmpeg could not read the video of {mp4.name}: {str(exc)[:300]}") from exc
    finally:
        reader.close()
    return meta, frames


def probe(mp4: Path) -> tuple[int, int, int]:
    """(width, height, frames) of the video stream, without decoding it: ffmpeg copies the packets
    to nowhere and counts them (one H.264 packet per frame)."""
    cmd = [_ffmpeg(), "-hide_banner", "-nostdin", "-i", str(mp4), "-map", "0:v:0", "-c", "copy", "-f", "null", "-"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    size = re.search(r"Stream #0:\d.*?: Video: .*?, (\d{2,5})x(\d{2,5})", out.stderr)
    found = re.findall(r"frame=\s*(\d+)", out.stderr)
    if out.returncode != 0 or size is None or not found:
        raise ValueError(f"ffmpeg could not read the video of {mp4.name}: {out.stderr.strip()[-300:]}")
    return int(size[1]), int(size[2]), int(found[-1])


def poster_webp(mp4: Path) -> bytes:
    """The first frame of `mp4`, at its size, as WebP."""
    from PIL import Image

    _meta, frames = _decode(mp4, ["-frames:v", "1"])
    if not frames:
        raise ValueError(f"{mp4.name} has no video frames")
    buf = io.BytesIO()
    Image.fromarray(frames[0]).save(buf, "WEBP", quality=WEBP_QUALITY)
    return buf.getvalue()


def spritesheet_jpg(mp4: Path) -> bytes:
    """The spritesheet of `mp4` (layout: the module docstring) as JPEG. Only the chosen frames
    leave ffmpeg, already scaled to the tile size."""
    from PIL import Image

    width, height, total = probe(mp4)
    layout = sprite_layout(width, height, total)
    pick = "+".join(f"eq(n\\,{i})" for i in layout.frames)
    scale = f"scale={layout.tile_width}:{layout.tile_height}:flags=area"
    _meta, frames = _decode(mp4, ["-vf", f"select='{pick}',{scale}", "-fps_mode", "passthrough"])
    if not frames:
        raise ValueError(f"{mp4.name} has no video frames")
    frames += [frames[-1]] * (len(layout.frames) - len(frames))  # fewer frames decoded than counted
    sheet = Image.new("RGB", layout.size)
    for k, frame in enumerate(frames[: len(layout.frames)]):
        row, col = divmod(k, layout.columns)
        sheet.paste(Image.fromarray(frame), (col * layout.tile_width, row * layout.tile_height))
    buf = io.BytesIO()
    sheet.save(buf, "JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def cached(mp4: Path, name: str, make: Callable[[], bytes]) -> Path:
    """`mp4`'s sibling `name`, made by `make()` the first time (written to a temp file and renamed,
    so a concurrent reader sees the whole file or none; two racing makers both write the same)."""
    path = mp4.with_name(name)
    if path.is_file():
        return path
    data = make()
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=mp4.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
