"""Where the engine's pipelines come from (a weights folder, or pipelines built in memory) and the
cache of the ones it has loaded, each placed on the device per its variant's memory mode."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from .errors import WeightsMissing
from .layout import is_complete, missing_parts, variant_dir
from .loader import LoadOptions
from .residency import Residency
from .variants import VARIANTS, Variant


class PipelineSource(Protocol):
    """What an Engine loads its pipelines from."""

    def complete(self) -> list[str]:
        """The real (non-demo) variants this source can provide."""
        ...

    def missing(self, name: str) -> WeightsMissing:
        """The error for variant `name`, which it cannot provide: what is missing, and where."""
        ...

    def load(self, variant: Variant, options: LoadOptions, shared: Mapping[str, Any] | None = None) -> Any:
        """The variant's pipeline, configured by k5serve per `options` (loader.configure_pipeline).
        `shared`: components already loaded that it uses instead of its own (a source may ignore it)."""
        ...

    def content_ids(self, name: str) -> dict[str, str]:
        """{component: content id} of variant `name`'s components (content.py): equal ids, equal bytes."""
        ...


class WeightsFolder:
    """Checkpoints on disk, one folder per variant (pipelines/layout.py). The tiny demo variants are
    built into it on first use."""

    def __init__(self, weights_dir: Path):
        self.weights_dir = Path(weights_dir)

    def complete(self) -> list[str]:
        return [n for n, v in VARIANTS.items() if not v.demo and is_complete(variant_dir(self.weights_dir, n))]

    def missing(self, name: str) -> WeightsMissing:
        folder = variant_dir(self.weights_dir, name)
        return WeightsMissing(name, str(folder), missing_parts(folder))

    def load(self, variant: Variant, options: LoadOptions, shared: Mapping[str, Any] | None = None) -> Any:
        from .loader import load_pipeline

        self._ensure(variant.name)
        return load_pipeline(variant, variant_dir(self.weights_dir, variant.name), options, shared)

    def content_ids(self, name: str) -> dict[str, str]:
        from .content import content_ids

        self._ensure(name)
        return content_ids(variant_dir(self.weights_dir, name))

    def _ensure(self, name: str) -> None:
        if VARIANTS[name].demo:
            from .tiny import ensure_tiny

            ensure_tiny(self.weights_dir, name)


class InMemoryPipelines:
    """Pipelines already built in this process, by variant name (bench/generate.py --full builds
    the full-size architectures with random weights; there is no checkpoint folder).

    Each is configured (attention, compile, tiling, placement) the first time an engine loads it,
    with that engine's options, and then served as it is to every engine that loads it again, so
    several engines can share one source and its modules. `configured=True`: they were configured
    already (e.g. `engine.pipeline(name)` of another engine) and are served as they are.
    """

    def __init__(self, pipes: Mapping[str, Any], configured: bool = False):
        unknown = [n for n in pipes if n not in VARIANTS]
        if unknown:
            raise ValueError(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(sorted(VARIANTS))}")
        self.pipes = dict(pipes)
        self._configured = set(self.pipes) if configured else set()

    def complete(self) -> list[str]:
        return [n for n in self.pipes if not VARIANTS[n].demo]

    def missing(self, name: str) -> WeightsMissing:
        return WeightsMissing(name, "(pipelines built in memory)", [f"a built {name} pipeline"])

    def content_ids(self, name: str) -> dict[str, str]:
        """Object identity: pipelines built in memory share exactly the modules they were built with."""
        pipe = self.pipes.get(name)
        if pipe is None:
            raise self.missing(name)
        return {c: f"object:{id(m):x}" for c, m in pipe.components.items() if m is not None and c != "scheduler"}

    def load(self, variant: Variant, options: LoadOptions, shared: Mapping[str, Any] | None = None) -> Any:
        from .loader import configure_pipeline

        pipe = self.pipes.get(variant.name)
        if pipe is None:
            raise self.missing(variant.name)
        if variant.name not in self._configured:
            configure_pipeline(pipe, variant, options)
            self._configured.add(variant.name)
        return pipe


class LoadedPipelines:
    """The engine's loaded pipelines, one per variant, loaded from `source` on first use with the
    memory mode `mode_for(name)` decides. Components identical to ones already loaded are shared
    (`residency`); a pipeline that lost a model for want of host RAM is loaded again when next asked for."""

    def __init__(
        self,
        source: PipelineSource,
        options: LoadOptions,
        mode_for: Callable[[str], str],
        residency: Residency | None = None,
    ):
        self.source = source
        self.options = options
        self.mode_for = mode_for
        self.residency = residency if residency is not None else Residency(options.device)
        self._pipes: dict[str, Any] = {}
        self._ids: dict[str, dict[str, str]] = {}

    def get(self, name: str) -> Any:
        pipe = self._pipes.get(name)
        if pipe is not None:
            self.residency.use(name)
            return pipe
        options = dataclasses.replace(self.options, memory_mode=self.mode_for(name))
        ids = self.ids(name)
        shared = self.residency.shared_for(name, ids, options.placement)
        pipe = self.source.load(VARIANTS[name], options, shared)
        self._pipes[name] = pipe
        self.residency.register(name, pipe, ids, options.placement)
        return pipe

    def ids(self, name: str) -> dict[str, str]:
        """Variant `name`'s content ids (hashed once per process, then read from beside the weights)."""
        if name not in self._ids:
            self._ids[name] = self.source.content_ids(name)
        return self._ids[name]

    def make_room(self, name: str, fits: Callable[[int], bool]) -> None:
        """Evict other variants' models, least recently used transformers first, until `fits(bytes
        left resident beside variant name)` or nothing is left to evict."""
        keep = set(self.ids(name).items())
        while not fits(self.residency.device_bytes(keep)):
            dropped = self.residency.evict_one(keep)
            if dropped is None:
                return
            for variant in dropped:
                self._pipes.pop(variant, None)

    def names(self) -> list[str]:
        return sorted(self._pipes)
