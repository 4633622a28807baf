"""The generation engine: what the server calls. Request in, mp4 out, with progress and cancellation.

One Engine per device. The server uses exactly: `demo`, `device`, `available()`, `prepare()`,
`generate()`, `warmup()` and `memory_in_use()`. The engine decides demo mode: with no real
checkpoint in its source, every variant is served by the tiny random-weight model at demo size
(design.md "Demo mode"). Its parts: sources.py (where pipelines come from, the loaded ones),
placement.py (memory modes, fit checks), generation.py (the stages), negatives.py, warmup.py,
device.py (device errors, memory), clock.py (stage timing).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from . import device as dev
from . import generation, memory
from .cancel import Cancellation, CancelToken
from .clock import StageClock
from .generation import LOADING, WRITING, Frames, PhaseCallback, StepCallback
from .loader import LoadOptions, pick_device
from .negatives import NegativePromptCache
from .placement import MEMORY_MODES, Placement
from .preparer import Preparer
from .request import GenerationRequest, GenerationResult, ResolvedRequest
from .residency import Residency
from .sources import LoadedPipelines, PipelineSource, WeightsFolder
from .variants import VARIANTS

log = logging.getLogger(__name__)


class Engine:
    """Runs Kandinsky 5 generations on one device. Not re-entrant: one worker thread calls it."""

    def __init__(
        self,
        weights_dir: Path,
        device: str = "auto",
        models: list[str] | None = None,
        require_weights: bool = False,
        offload: bool = False,
        vae_tiling: bool = False,
        compile: bool | None = None,
        memory_mode: str = "auto",
        device_memory: int | None = None,
        host_memory: int | None = None,
        cfg_batch: bool = True,
        negative_cache: bool = True,
        source: PipelineSource | None = None,
        text_encoder_int8: bool = False,
        fp8_weights: bool = False,
        fp8_compute: bool = False,
        share_components: bool = True,
        host_cache: int | None = None,
    ):
        """`weights_dir`: the checkpoints folder (pipelines/layout.py). `memory_mode`: auto (decided
        per variant from the device memory, pipelines/memory.py) or gpu / offload_text /
        offload_model; `offload` forces offload_model. `device_memory`: bytes the device has
        (default: what CUDA reports; None on CPU = no limit). `host_memory`: bytes of host RAM the
        offloading and streaming modes may fill (default: the machine's RAM on CUDA; None on the CPU =
        not checked). `compile`: None = on for CUDA (True
        also compiles on the CPU, slow to build for small gains: the tests use it). `cfg_batch`: cond
        and uncond in one transformer call when memory allows (exact; pipelines/denoise.py).
        `negative_cache`: keep encoded negative prompts between jobs (exact; off only to measure it).
        `source`: where the pipelines come from instead of `weights_dir`, e.g.
        `sources.InMemoryPipelines` for pipelines built in this process (bench/generate.py --full).
        `text_encoder_int8` / `fp8_weights`: opt-in approximate weight storage (pipelines/quant.py),
        labelled in every result made with it. `fp8_compute`: opt-in fp8 matmuls in the transformer
        blocks (pipelines/fp8_compute.py; approximate, labelled); ValueError on a device without them
        (CPU, CUDA before compute capability 8.9). `host_cache`: bytes of host RAM evicted models may take
        (residency.py; None: what the host has available then; 0: evicted models are dropped).
        `share_components`: load byte-identical text encoders, tokenizers and VAE once (residency.py;
        off only to compare and measure)."""
        self.weights_dir = Path(weights_dir)
        self.device = pick_device(device)
        if memory_mode not in MEMORY_MODES:
            raise ValueError(f"memory mode must be one of {', '.join(MEMORY_MODES)}, got {memory_mode!r}")
        self.memory_mode = "offload_model" if offload else memory_mode
        if fp8_compute and (reason := dev.fp8_unsupported(self.device)):
            raise ValueError(reason)
        self.capacity = device_memory if device_memory is not None else dev.capacity(self.device)
        self.host_capacity = host_memory if host_memory is not None else dev.host_capacity(self.device)
        compile = dev.is_cuda(self.device) if compile is None else compile
        self.options = LoadOptions(
            device=self.device,
            offload=offload,
            vae_tiling=vae_tiling,
            compile=compile,
            text_int8=text_encoder_int8,
            fp8_weights=fp8_weights,
            fp8_compute=fp8_compute,
        )
        self.placements = Placement(self.capacity, self.memory_mode, cfg_batch, vae_tiling, self.host_capacity)
        self.negatives = NegativePromptCache(enabled=negative_cache)
        self.source = source if source is not None else WeightsFolder(self.weights_dir)
        self.residency = Residency(self.device, host_cache, share_components)
        self._pipes = LoadedPipelines(self.source, self.options, self.placements.mode, self.residency)
        self._settings = generation.Settings(self.device, cfg_batch, vae_tiling)
        self._lock = threading.Lock()
        # The sequence-parallel group this engine is a rank of, during a group's job (pipelines/group.py)
        self.group: generation.Group | None = None
        # admission's half (torch-free, shared with the HTTP front end of process workers)
        self.preparer = Preparer(self.source, self.placements, models, require_weights, str(self.weights_dir))
        self.models, self.present, self.demo = self.preparer.models, self.preparer.present, self.preparer.demo

    # ---- what can run --------------------------------------------------------------------

    def available(self) -> list[str]:
        """Variant names this engine serves (all of them in demo mode, via the tiny model)."""
        return self.preparer.available()

    def prepare(self, req: GenerationRequest) -> ResolvedRequest:
        """Validate and resolve `req` for this engine: defaults, demo stand-in, fit check
        (pipelines/preparer.py).

        Raises InvalidRequest or WeightsMissing. The server calls it once, at admission, and stores
        the result; `generate` runs that result as it is.
        """
        return self.preparer.prepare(req)

    # ---- memory ----------------------------------------------------------------------------

    def placement(self, name: str) -> str:
        """Where variant `name`'s weights live (its memory mode), decided before it is loaded."""
        return self.placements.mode(name)

    def memory_plan(self, r: ResolvedRequest) -> memory.Footprint | None:
        """The plan for this request under its variant's placement, beside what other variants keep
        resident now (None: it does not fit)."""
        if self.capacity is None:
            return self.placements.plan(r)
        resident = self.residency.device_bytes(self._pipes.ids(r.variant.name).items())
        return self.placements.plan(r, resident)

    def memory_in_use(self) -> int | None:
        """Device memory this process holds, in bytes: torch's reserved counter on CUDA (cached
        blocks included: they are as unavailable to others as live tensors; device.memory_in_use).
        None on the CPU: not measured there."""
        return dev.memory_in_use(self.device)

    # ---- pipelines -------------------------------------------------------------------------

    def pipeline(self, name: str, r: ResolvedRequest | None = None):
        """The loaded pipeline for variant `name` (loads it on first use), with room made for it:
        other variants' models leave the device (residency.py) until `r`'s plan fits beside what
        stays (without `r`: the variant at its default size, one frame)."""
        self._make_room(name, r)
        return self._pipes.get(name)

    def _make_room(self, name: str, r: ResolvedRequest | None) -> None:
        if self.capacity is None:
            return  # no budget (CPU without --device-memory): nothing is ever evicted
        if r is not None:
            size = (r.width, r.height, r.num_frames)
        else:
            w, h = VARIANTS[name].default_size
            size = (w, h, 1)

        def shape(fp: memory.Footprint | None) -> tuple | None:
            return None if fp is None else (fp.mode, fp.cfg_batch, fp.vae_tiling)

        best = shape(self.placements.plan_size(name, *size))  # on a device holding nothing else

        def fits(resident: int) -> bool:
            # what stays must leave room for the very plan an empty device allows, not a slower one
            fp = shape(self.placements.plan_size(name, *size, resident))
            return fp is not None and (best is None or fp == best)

        self._pipes.make_room(name, fits)

    def loaded(self) -> list[str]:
        """Names of the variants whose pipelines are loaded."""
        return self._pipes.names()

    def describe(self) -> dict:
        """What this engine holds now (server/engine_protocol.py `describe`)."""
        return {
            "variants": self.loaded(),
            "resident": self.residency.resident(),
            "host": self.residency.host(),
            "counters": dict(self.residency.counters),
            "memory_in_use": self.memory_in_use(),
        }

    def warmup(self) -> None:
        """Load what will be served (the tiny models in demo mode, else --models) and, with
        compilation on, run each once so it is compiled before the first request (warmup.py)."""
        from .warmup import warm_up

        warm_up(self)

    # ---- generation ------------------------------------------------------------------------

    def generate(
        self,
        req: ResolvedRequest | GenerationRequest,
        output: Path,
        *,
        on_step: StepCallback | None = None,
        on_phase: PhaseCallback | None = None,
        cancel: Cancellation | None = None,
    ) -> GenerationResult:
        """Generate and write the mp4 at `output` (atomically). Nothing is written on failure.

        A ResolvedRequest (from `prepare`) runs exactly as it is; a GenerationRequest is prepared
        first. `on_step(i, n)` follows the denoising steps, `on_phase(phase, i, n)` what comes around
        them: ("loading", 0, 1) before the variant is loaded, ("encoding", 0, 1) before the prompt is
        encoded, then ("decoding", i, n) as the decode starts (i=0) and after each of its n temporal
        windows, then ("writing", 0, 1). Raises Cancelled (checked before loading, after every step, between
        the decode's windows and before writing), OutOfMemory or DeviceFailure (device.py).
        """
        from .video import write_mp4

        cancel = cancel if cancel is not None else CancelToken()
        r = self._resolved(req)
        self._log_demo(r)
        if r.continuation is not None:  # an extension, or longer than one pass: made in passes
            from .extension import generate as generate_in_passes

            return generate_in_passes(self, r, Path(output), on_step=on_step, on_phase=on_phase, cancel=cancel)
        done = self.generate_frames(r, on_step=on_step, on_phase=on_phase, cancel=cancel)
        cancel.raise_if_cancelled()
        if on_phase is not None:
            on_phase(WRITING, 0, 1)
            cancel.raise_if_cancelled()  # a cancel from the progress listener stops here

        # 5. write
        with StageClock(self.device, done.timings).stage("write"):
            size = write_mp4(done.frames, Path(output), fps=r.variant.fps)
        return GenerationResult(
            path=Path(output),
            variant=r.variant.name,
            width=r.width,
            height=r.height,
            num_frames=r.num_frames,
            fps=r.variant.fps,
            steps=r.steps,
            seed=r.seed,
            file_size=size,
            demo=r.demo or r.variant.demo,
            timings=done.timings,
            step_times=done.step_times,
            acceleration=done.acceleration,
            cached_steps=done.cached_steps,
            memory_plan=done.memory_plan,
            revised_prompt=done.revised_prompt,
            approximations=done.approximations,
        )

    def generate_frames(
        self,
        req: ResolvedRequest | GenerationRequest,
        *,
        on_step: StepCallback | None = None,
        on_phase: PhaseCallback | None = None,
        cancel: Cancellation | None = None,
        decode: bool = True,
        image=None,
    ) -> Frames:
        """Stages 1-4 of `generate` for one pass: the frames (F, H, W, 3) in [0, 1] and how they were
        made, no file. `decode=False` stops at the latents (warm-up). `image`: an I2V pass's first
        frame already loaded (a continuation pass, extension.py) instead of `req.image`."""
        cancel = cancel if cancel is not None else CancelToken()

        # 1. resolve (only a raw request: an admitted one is never re-resolved) and load
        r = self._resolved(req)
        cancel.raise_if_cancelled()
        if on_phase is not None:
            on_phase(LOADING, 0, 1)
        clock = StageClock(self.device)
        with self._lock, dev.device_errors(self.device, r.width, r.height, r.num_frames):
            with clock.stage("load"):
                pipe = self.pipeline(r.variant.name, r)
            cancel.raise_if_cancelled()
            # 2. encode prompt, 3. denoise, 4. decode
            return generation.run(
                pipe,
                r,
                settings=self._settings,
                plan=self.memory_plan(r),
                negatives=self.negatives,
                clock=clock,
                cancel=cancel,
                on_step=on_step,
                on_phase=on_phase,
                decode=decode,
                group=self.group,
                image=image,
            )

    def _resolved(self, req: ResolvedRequest | GenerationRequest) -> ResolvedRequest:
        return req if isinstance(req, ResolvedRequest) else self.prepare(req)

    @staticmethod
    def _log_demo(r: ResolvedRequest) -> None:
        if r.demo:
            log.warning(
                "DEMO MODE: %s served by %s at %dx%d, %d frames (random weights, output is noise)",
                r.requested.variant,
                r.variant.name,
                r.width,
                r.height,
                r.num_frames,
            )
        elif r.variant.demo:
            log.info("%s is a tiny random-weight model: output is noise", r.variant.name)
