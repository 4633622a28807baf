"""Admission's half of the engine, torch-free: which variants are served and what a request
becomes (`prepare`), without a device.

The Engine uses it, and so does the HTTP front end when the engines run in worker processes
(server/pool.py): the front end never imports torch, so it cannot build an Engine, but it must
resolve, pick the demo stand-in, check the weights and the memory fit exactly as the engine would.
What it needs of the device is one number, `capacity` (bytes; None on the CPU), which the front
end learns from a probe subprocess (server/devices.py).
"""

from __future__ import annotations

import dataclasses

from .errors import WeightsMissing
from .placement import Placement
from .request import GenerationRequest, ResolvedRequest, resolve
from .sources import PipelineSource
from .variants import TINY_I2V, TINY_T2V, VARIANTS


class Preparer:
    def __init__(
        self,
        source: PipelineSource,
        placements: Placement,
        models: list[str] | None = None,
        require_weights: bool = False,
        where: str = "weights",
    ):
        """`source`: where checkpoints are (complete() / missing()); `placements`: memory modes and
        fit checks for the device's capacity; `models`: the variants to serve (None: every one
        present); `where`: the weights folder, for messages."""
        unknown = [m for m in models or [] if m not in VARIANTS]
        if unknown:
            raise ValueError(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(sorted(VARIANTS))}")
        self.source = source
        self.placements = placements
        self.where = where
        self.models = list(models or [])
        self.present = [n for n in source.complete() if not self.models or n in self.models]
        self.demo = not self.present
        if self.demo and require_weights:
            wanted = self.models or ["kandinsky5-lite-t2v-distilled-5s"]
            raise WeightsMissing(wanted[0], f"{where}/{wanted[0]}", ["a complete checkpoint"])
        for name in self.models:
            if not VARIANTS[name].demo and name not in self.present and not self.demo:
                self.raise_missing(name)

    def available(self) -> list[str]:
        """Variant names served (all of them in demo mode, via the tiny model)."""
        if self.demo:
            return sorted(VARIANTS)
        return sorted(self.present + [n for n, v in VARIANTS.items() if v.demo])

    def runs(self) -> list[str]:
        """The variants whose weights will really run: the tiny models in demo mode (they stand in
        for every variant), else --models or every checkpoint present. A sequence-parallel degree
        is checked against these (pipelines.variants.sp_degree_problem)."""
        if self.demo:
            return [TINY_T2V, TINY_I2V]
        return list(self.models or self.present)

    def prepare(self, req: GenerationRequest) -> ResolvedRequest:
        """Validate and resolve `req`: defaults, demo stand-in, weights present, memory fit.
        Raises InvalidRequest or WeightsMissing."""
        resolved = resolve(req)
        if resolved.variant.demo:
            return resolved
        if self.demo:
            return resolved.as_demo()
        if resolved.variant.name not in self.present:
            self.raise_missing(resolved.variant.name)
        if resolved.continuation is None:
            self.placements.check_fits(resolved)
            return resolved
        # a clip in passes (pipelines/extension.py): each pass must run here
        if resolved.continuation not in self.present:
            self.raise_missing(resolved.continuation)
        from .extension import continuation_pass

        passes = resolved.passes
        if not resolved.extend:
            self.placements.check_fits(dataclasses.replace(resolved, num_frames=passes[0], continuation=None))
        for added in sorted(set(passes[1:])):
            self.placements.check_fits(continuation_pass(resolved, 1, added, resolved.prompt))
        return resolved

    def raise_missing(self, name: str) -> None:
        if self.models and name not in self.models and name in self.source.complete():
            folder = f"{self.where}/{name}"
            raise WeightsMissing(name, folder, [f"--models entry (serving only {', '.join(self.models)})"])
        raise self.source.missing(name)
