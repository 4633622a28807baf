"""Warm-up: load what will be served and, with compilation on, build the compiled blocks at start-up
rather than in the first user's request."""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Protocol

from .errors import Cancelled, DeviceFailure, OutOfMemory
from .loader import LoadOptions
from .request import GenerationRequest, ResolvedRequest, resolve
from .variants import TINY_I2V, TINY_T2V, VARIANTS

log = logging.getLogger(__name__)


class Warmable(Protocol):
    """What warm-up uses of an Engine (pipelines/engine.py)."""

    demo: bool
    models: list[str]
    options: LoadOptions

    def pipeline(self, name: str) -> Any: ...

    def generate_frames(self, req: ResolvedRequest, *, decode: bool = True) -> Any: ...


def warm_up(engine: Warmable) -> None:
    """Load the tiny models in demo mode, else the engine's --models (or nothing); compile each."""
    names = [TINY_T2V, TINY_I2V] if engine.demo else engine.models
    for name in names:
        engine.pipeline(name)
        if engine.options.compile:
            warm_compiled(engine, name)


def warm_compiled(engine: Warmable, name: str) -> None:
    """Run variant `name` once at its default request (2 steps, latents only) to compile it.

    If compilation fails here (no Triton, no C compiler, an unsupported op), the blocks go back to
    eager mode with a warning instead of failing every request.
    """
    from .loader import drop_compiled

    v = VARIANTS[name]
    tmp = Path(tempfile.mkdtemp(prefix="k5warm"))
    try:
        image = None
        if v.task == "i2v":
            from PIL import Image

            image = str(tmp / "warm.png")
            Image.new("RGB", v.default_size, (127, 127, 127)).save(image)
        # The variant's own defaults, as they are (no demo size, no fit check: it is the variant itself).
        r = resolve(GenerationRequest(variant=name, prompt="warm-up", image=image, steps=2, seed=0))
        t0 = time.perf_counter()
        try:
            engine.generate_frames(r, decode=False)
        except (Cancelled, OutOfMemory, DeviceFailure):
            raise
        except Exception as exc:  # a compiler failure: serve eagerly rather than not at all
            log.warning("compiling %s failed (%s); running it without torch.compile", name, exc)
            drop_compiled(engine.pipeline(name).transformer)
            return
        log.info("warmed %s (compiled blocks) in %.1f s", name, time.perf_counter() - t0)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
