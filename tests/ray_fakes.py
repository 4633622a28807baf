"""Engine factories that Ray actors import by path in the Ray tests ("ray_fakes:fake_engine"):
the actor builds a FakeEngine in its own process, exactly where the real engine would be built."""

from __future__ import annotations

from pathlib import Path

from fakes import FakeEngine


def fake_engine(devices: list[str], *, pause_dir: str | None = None, **kwargs: object) -> FakeEngine:
    """A FakeEngine on `devices` (as the actor sees them); `pause_dir` as a string (it crossed the wire)."""
    return FakeEngine(device=",".join(devices), pause_dir=Path(pause_dir) if pause_dir else None, **kwargs)
