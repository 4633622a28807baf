"""Engine factories that Ray actors import by path in the Ray tests ("ray_fakes:fake_engine"):
the actor builds a FakeEngine in its own process, exactly where the real engine would be built."""

from __future__ import annotations

import time
from pathlib import Path

from fakes import FakeEngine

from server.settings import Settings

# what `k5serve serve` passes every engine (Settings.engine_options): a fake has no use for them.
# Read from Settings itself: a hand-kept list missed the options added later (host_memory, fp8_...)
# and every actor failed to build its fake.
ENGINE_OPTIONS = tuple(Settings.model_construct().engine_options())


def fake_engine(
    devices: list[str], *, pause_dir: str | None = None, build_time: float = 0.0, **kwargs: object
) -> FakeEngine:
    """A FakeEngine on `devices` (as the actor sees them); `pause_dir` as a string (it crossed the
    wire); `build_time`: seconds the construction takes (a real engine's takes a while);
    FakeEngine's keywords pass through, the real engine's options are dropped."""
    time.sleep(build_time)
    fake = {k: v for k, v in kwargs.items() if k not in ENGINE_OPTIONS}
    return FakeEngine(device=",".join(devices), pause_dir=Path(pause_dir) if pause_dir else None, **fake)
