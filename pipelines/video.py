"""Frames -> H.264 mp4 (yuv420p, faststart), written atomically via imageio-ffmpeg."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import numpy as np


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """Float frames in [0, 1] (diffusers output_type='np') -> uint8, as diffusers' export does."""
    if frames.dtype == np.uint8:
        return frames
    return (np.clip(frames, 0.0, 1.0) * 255).round().astype(np.uint8)


def write_mp4(frames: np.ndarray, path: Path, fps: int = 24, crf: int = 18) -> int:
    """Write (F, H, W, 3) frames to `path` atomically; returns the file size in bytes."""
    frames = to_uint8(np.asarray(frames))
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected frames shaped (F, H, W, 3), got {frames.shape}")
    with Mp4Writer(path, frames.shape[2], frames.shape[1], fps=fps, crf=crf) as writer:
        writer.send(frames)
        return writer.commit()


class Mp4Writer:
    """Frames -> H.264 mp4 at `path`, sent in parts (a clip made in passes is never whole in memory).

    The file appears under its final name only once complete: ffmpeg writes a temp file in the same
    folder, which `commit()` fsyncs and renames over `path`. Leaving the `with` block without a
    commit (an error, a cancel) removes the temp file.
    """

    def __init__(self, path: Path, width: int, height: int, fps: int = 24, crf: int = 18):
        import imageio_ffmpeg

        self.path, self.size = Path(path), (width, height)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.stem}.", suffix=".mp4.part", dir=self.path.parent)
        os.close(fd)
        self.tmp = Path(tmp)
        self.frames = 0
        self._writer = imageio_ffmpeg.write_frames(
            tmp,
            (width, height),
            fps=fps,
            codec="libx264",
            pix_fmt_in="rgb24",
            pix_fmt_out="yuv420p",
            quality=None,
            macro_block_size=1,
            output_params=["-crf", str(crf), "-movflags", "+faststart", "-f", "mp4"],
            ffmpeg_log_level="error",
        )
        self._writer.send(None)

    def send(self, frames: np.ndarray) -> None:
        """Append (F, H, W, 3) frames (uint8, or floats in [0, 1])."""
        frames = to_uint8(np.asarray(frames))
        width, height = self.size
        if frames.ndim != 4 or frames.shape[1:] != (height, width, 3):
            raise ValueError(f"expected frames shaped (F, {height}, {width}, 3), got {frames.shape}")
        for frame in frames:
            self._writer.send(np.ascontiguousarray(frame))
        self.frames += len(frames)

    def commit(self) -> int:
        """Finish the file and move it into place; returns its size in bytes."""
        self._writer.close()
        with open(self.tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(self.tmp, self.path)
        return self.path.stat().st_size

    def __enter__(self) -> Mp4Writer:
        return self

    def __exit__(self, *exc) -> None:
        if self.tmp.exists():  # not committed
            with contextlib.suppress(Exception):  # the write already failed: the temp file goes either way
                self._writer.close()
            self.tmp.unlink(missing_ok=True)


def read_mp4(path: Path) -> tuple[np.ndarray, dict]:
    """Decode an mp4 back to (F, H, W, 3) uint8 frames plus ffmpeg's metadata (fps, size)."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    w, h = meta["size"]
    frames = [np.frombuffer(buf, dtype=np.uint8).reshape(h, w, 3) for buf in reader]
    return np.stack(frames) if frames else np.zeros((0, h, w, 3), np.uint8), meta
