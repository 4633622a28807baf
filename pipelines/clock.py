"""StageClock: the one way a generation's stages are timed (seconds per stage, CUDA-synced)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from .device import synchronize


class StageClock:
    """Times named stages of one generation into `timings` (added up if a stage repeats).

    On CUDA the device is synchronised at both ends of a stage, so a stage's time is the work it
    queued, not just the launch. A stage that raises is not recorded (and not synchronised: the
    device may be the thing that failed).
    """

    def __init__(self, device: str, timings: dict[str, float] | None = None):
        self.device = device
        self.timings: dict[str, float] = {} if timings is None else timings

    def now(self) -> float:
        """perf_counter() after the device has finished its queued work."""
        synchronize(self.device)
        return time.perf_counter()

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = self.now()
        yield
        self.timings[name] = self.timings.get(name, 0.0) + self.now() - start
