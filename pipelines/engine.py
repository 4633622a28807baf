"""The generation engine: validated request -> frames -> mp4, with progress and cancellation.

One Engine per device. It owns the loaded pipelines (one per variant, loaded on first use or at
warm-up) and decides demo mode: with no real checkpoint under the weights folder, every variant
is served by the tiny random-weight model at demo size (design.md "Demo mode").
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from . import memory
from .errors import Cancelled, DeviceFailure, InvalidRequest, OutOfMemory, WeightsMissing
from .layout import is_complete, variant_dir
from .request import CancelToken, GenerationRequest, GenerationResult, ResolvedRequest, resolve
from .variants import DEFAULT_NEGATIVE_PROMPT, HD_SIZES, VARIANTS

log = logging.getLogger(__name__)

StepCallback = Callable[[int, int], None]
MAX_SEQUENCE_LENGTH = 256  # Qwen tokens per prompt, as the official pipelines (diffusers defaults to 512)
NEGATIVE_CACHE_SIZE = 8  # encoded negative prompts kept per engine (the default one always)
MEMORY_MODES = ("auto", *memory.MODES)


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
        cfg_batch: bool = True,
        negative_cache: bool = True,
    ):
        """`memory_mode`: auto (decided per variant from the device memory, pipelines/memory.py) or
        gpu / offload_text / offload_model. `device_memory`: bytes the device has (default: what CUDA
        reports; None on CPU = no limit). `compile`: None = on for CUDA (True also compiles on the CPU,
        slow to build for small gains: the tests use it). `cfg_batch`: cond and uncond
        in one transformer call when memory allows (exact; pipelines/denoise.py). `negative_cache`: keep
        encoded negative prompts between jobs (exact; off only to measure it, bench/generate.py --ablate)."""
        from .loader import LoadOptions, pick_device

        self.weights_dir = Path(weights_dir)
        self.device = pick_device(device)
        if memory_mode not in MEMORY_MODES:
            raise ValueError(f"memory mode must be one of {', '.join(MEMORY_MODES)}, got {memory_mode!r}")
        self.memory_mode = "offload_model" if offload else memory_mode
        self.capacity = device_memory if device_memory is not None else _device_capacity(self.device)
        self.cfg_batch = cfg_batch
        self.negative_cache = negative_cache
        cuda = self.device.startswith("cuda")
        self.options = LoadOptions(
            device=self.device, offload=offload, vae_tiling=vae_tiling, compile=cuda if compile is None else compile
        )
        unknown = [m for m in models or [] if m not in VARIANTS]
        if unknown:
            raise ValueError(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(sorted(VARIANTS))}")
        self.models = list(models or [])
        present = [n for n, v in VARIANTS.items() if not v.demo and is_complete(variant_dir(self.weights_dir, n))]
        self.present = [n for n in present if not self.models or n in self.models]
        self.demo = not self.present
        if self.demo and require_weights:
            wanted = self.models or ["kandinsky5-lite-t2v-distilled-5s"]
            raise WeightsMissing(wanted[0], str(self.weights_dir / wanted[0]), ["a complete checkpoint"])
        for name in self.models:
            if not VARIANTS[name].demo and name not in self.present and not self.demo:
                self._raise_missing(name)
        self._pipes: dict[str, object] = {}
        self._negative_cache: dict[tuple[str, str], dict] = {}
        self._lock = threading.Lock()

    # ---- what can run --------------------------------------------------------------------

    def available(self) -> list[str]:
        """Variant names this engine serves (all of them in demo mode, via the tiny model)."""
        if self.demo:
            return sorted(VARIANTS)
        return sorted(self.present + [n for n, v in VARIANTS.items() if v.demo])

    def _raise_missing(self, name: str) -> None:
        from .layout import missing_parts

        folder = variant_dir(self.weights_dir, name)
        if self.models and name not in self.models and is_complete(folder):
            missing = [f"--models entry (serving only {', '.join(self.models)})"]
        else:
            missing = missing_parts(folder)
        raise WeightsMissing(name, str(folder), missing)

    def prepare(self, req: GenerationRequest) -> ResolvedRequest:
        """Validate and resolve `req` for this engine. Raises InvalidRequest or WeightsMissing."""
        resolved = resolve(req)
        if resolved.variant.demo:
            return resolved
        if self.demo:
            return resolved.as_demo()
        if resolved.variant.name not in self.present:
            self._raise_missing(resolved.variant.name)
        self._check_fits(resolved)
        return resolved

    # ---- memory ----------------------------------------------------------------------------

    def placement(self, name: str) -> str:
        """Where variant `name`'s weights live (memory mode), decided before it is loaded.

        auto: the fastest mode in which the variant's largest request (largest size, full clip) fits.
        """
        if self.capacity is None:  # CPU: no limit, one device
            return "gpu"
        if self.memory_mode != "auto":
            return self.memory_mode
        v = VARIANTS[name]
        sizes = v.sizes or ((memory.VAE_TILE, memory.VAE_TILE),)
        sd = [s for s in sizes if s not in HD_SIZES] or list(sizes)
        w, h = max(sd, key=lambda s: s[0] * s[1])
        fp = memory.plan(v, w, h, v.max_frames, self.capacity)
        return fp.mode if fp is not None else "offload_model"

    def memory_plan(self, r: ResolvedRequest) -> memory.Footprint | None:
        """The plan for this request under its variant's placement (None: it does not fit)."""
        tiling = True if self.options.vae_tiling else None
        return memory.plan(
            r.variant,
            r.width,
            r.height,
            r.num_frames,
            self.capacity,
            self.placement(r.variant.name),
            self.cfg_batch,
            tiling,
        )

    def _check_fits(self, r: ResolvedRequest) -> None:
        if self.capacity is None or self.memory_plan(r) is not None:
            return
        mode = self.placement(r.variant.name)
        message = memory.no_fit_message(r.variant, r.width, r.height, r.num_frames, self.capacity, mode)
        if memory.max_frames_that_fit(r.variant, r.width, r.height, self.capacity, mode):
            raise InvalidRequest("num_frames", r.num_frames, message)
        raise InvalidRequest("width", r.width, message)

    # ---- loading ---------------------------------------------------------------------------

    def pipeline(self, name: str):
        """The loaded pipeline for variant `name` (loads it on first use)."""
        pipe = self._pipes.get(name)
        if pipe is None:
            from .loader import load_pipeline

            folder = variant_dir(self.weights_dir, name)
            if VARIANTS[name].demo:
                from .tiny import ensure_tiny

                ensure_tiny(self.weights_dir, name)
            options = dataclasses.replace(self.options, memory_mode=self.placement(name))
            pipe = load_pipeline(VARIANTS[name], folder, options)
            self._pipes[name] = pipe
        return pipe

    def adopt(self, name: str, pipe) -> None:
        """Serve variant `name` with an already built and configured pipeline (bench/generate.py --full
        builds full-size random-weight pipelines in memory; there is no checkpoint folder)."""
        self._pipes[name] = pipe
        if name not in self.present:
            self.present.append(name)
        self.demo = False

    def warmup(self) -> None:
        """Load what will be served: the tiny models in demo mode, else --models (or nothing).

        With compilation on, also run each variant once (2 steps, no decode) at its default request
        so the compiled blocks are built at start-up, not in the first user's request.
        """
        names = ["kandinsky5-tiny-t2v", "kandinsky5-tiny-i2v"] if self.demo else self.models
        for name in names:
            self.pipeline(name)
            if self.options.compile:
                self.warm_compiled(name)

    def warm_compiled(self, name: str) -> None:
        """Run variant `name` once at its default request (2 steps, latents only) to compile it.

        If compilation fails here (no Triton, no C compiler, an unsupported op), the blocks go back
        to eager mode with a warning instead of failing every request.
        """
        import shutil
        import tempfile

        v = VARIANTS[name]
        tmp = Path(tempfile.mkdtemp(prefix="k5warm"))
        try:
            image = None
            if v.task == "i2v":
                from PIL import Image

                image = str(tmp / "warm.png")
                Image.new("RGB", v.default_size, (127, 127, 127)).save(image)
            r = resolve(GenerationRequest(variant=name, prompt="warm-up", image=image, steps=2, seed=0))
            t0 = time.perf_counter()
            try:
                self.generate_frames(r, output_type="latent")
            except (Cancelled, OutOfMemory, DeviceFailure):
                raise
            except Exception as exc:  # a compiler failure: serve eagerly rather than not at all
                log.warning("compiling %s failed (%s); running it without torch.compile", name, exc)
                from .loader import drop_compiled

                drop_compiled(self.pipeline(name).transformer)
                return
            log.info("warmed %s (compiled blocks) in %.1f s", name, time.perf_counter() - t0)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    # ---- generation ------------------------------------------------------------------------

    def generate_frames(
        self,
        req: GenerationRequest | ResolvedRequest,
        *,
        on_step: StepCallback | None = None,
        cancel: CancelToken | None = None,
        timings: dict[str, float] | None = None,
        info: dict | None = None,
        output_type: str = "np",
    ):
        """Run the diffusion pipeline; returns float frames (F, H, W, 3) in [0, 1].

        `info` (filled in): step_times, acceleration, cached_steps, forwards, batched_steps, memory_plan.
        """
        import torch

        from .denoise import StepRunner, magcache_for

        r = req if isinstance(req, ResolvedRequest) else self.prepare(req)
        timings = {} if timings is None else timings
        info = {} if info is None else info
        cancel = cancel or CancelToken()
        cancel.raise_if_cancelled()

        with self._lock, self._device_errors(r):
            t0 = time.perf_counter()
            pipe = self.pipeline(r.variant.name)
            timings["load"] = time.perf_counter() - t0
            cancel.raise_if_cancelled()
            fp = self.memory_plan(r)
            step_times: list[float] = []
            last = [0.0]

            def step_end(_pipe, i: int, _t, _kwargs: dict) -> dict:
                # Raising (rather than diffusers' `_interrupt`) skips the VAE decode entirely.
                self._sync()
                now = time.perf_counter()
                if not step_times and runner.started_at is not None:
                    last[0] = max(last[0], runner.started_at)  # step 1 starts at its first transformer call
                step_times.append(now - last[0])
                last[0] = now
                cancel.raise_if_cancelled()
                if on_step is not None:
                    on_step(i + 1, r.steps)
                    cancel.raise_if_cancelled()  # a cancel from the progress listener stops here
                last[0] = time.perf_counter()  # progress listeners' time is not step time
                return {}

            kwargs = dict(
                prompt=r.prompt,
                negative_prompt=r.negative_prompt,
                height=r.height,
                width=r.width,
                num_frames=r.num_frames,
                num_inference_steps=r.steps,
                guidance_scale=r.guidance,
                generator=torch.Generator(device="cpu").manual_seed(r.seed),
                output_type=output_type,
                callback_on_step_end=step_end,
                max_sequence_length=MAX_SEQUENCE_LENGTH,
            )
            if r.variant.task == "i2v":
                kwargs["image"] = load_image(r.image, r.width, r.height)
            cfg = r.guidance > 1.0
            cache = None
            if r.acceleration == "regular":
                hd = (r.width, r.height) in HD_SIZES
                cache = magcache_for(r.variant.name, r.steps, cfg=cfg, hd=hd)
            pipe.vae.use_tiling = bool(self.options.vae_tiling or (fp is not None and fp.vae_tiling))
            t1 = time.perf_counter()
            with _stage_timer(pipe, timings, self.device), self._text_encoders_on_demand(pipe):
                try:
                    negative = None
                    if cfg:
                        embeds = self._negative_embeds(r.variant.name, pipe, r.negative_prompt)
                        kwargs.update(embeds)
                        negative = (embeds["negative_prompt_embeds_qwen"], embeds["negative_prompt_embeds_clip"])
                    batch = self.cfg_batch and (fp is None or fp.cfg_batch)
                    runner = StepRunner(pipe.transformer, negative, batch_cfg=batch, magcache=cache)
                    with runner.install():
                        self._sync()
                        last[0] = time.perf_counter()
                        frames = pipe(**kwargs).frames[0]
                finally:
                    pipe.maybe_free_model_hooks()  # only the normal return path does this itself
            timings["pipeline"] = time.perf_counter() - t1
            timings["denoise"] = timings["pipeline"] - timings.get("encode_prompt", 0.0) - timings.get("decode", 0.0)
            info.update(
                step_times=step_times,
                acceleration="regular" if cache is not None else "none",
                cached_steps=cache.skipped if cache is not None else 0,
                forwards=runner.forwards,
                batched_steps=runner.batched,
                memory_plan=_plan_dict(fp),
            )
        return frames

    def _sync(self) -> None:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def _text_encoders_on_demand(self, pipe) -> Iterator[None]:
        """offload_text placement: the text encoders come onto the GPU for each encode, then leave."""
        if getattr(pipe.text_encoder, "device", None) is None or pipe.text_encoder.device.type != "cpu":
            yield
            return
        if not self.device.startswith("cuda"):
            yield
            return
        previous = vars(pipe).get("encode_prompt")
        encode = pipe.encode_prompt

        def on_gpu(*args, **kwargs):
            pipe.text_encoder.to(self.device)
            pipe.text_encoder_2.to(self.device)
            try:
                return encode(*args, **kwargs)
            finally:
                pipe.text_encoder.to("cpu")
                pipe.text_encoder_2.to("cpu")

        pipe.encode_prompt = on_gpu
        try:
            yield
        finally:
            if previous is None:
                del pipe.encode_prompt
            else:
                pipe.encode_prompt = previous

    def generate(
        self,
        req: GenerationRequest | ResolvedRequest,
        output: Path,
        *,
        on_step: StepCallback | None = None,
        cancel: CancelToken | None = None,
    ) -> GenerationResult:
        """Generate and write the mp4 at `output` (atomically). Nothing is written on failure."""
        from .video import write_mp4

        r = req if isinstance(req, ResolvedRequest) else self.prepare(req)
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
        timings: dict[str, float] = {}
        info: dict = {}
        frames = self.generate_frames(r, on_step=on_step, cancel=cancel, timings=timings, info=info)
        if cancel is not None:
            cancel.raise_if_cancelled()
        t0 = time.perf_counter()
        size = write_mp4(frames, Path(output), fps=r.variant.fps)
        timings["write"] = time.perf_counter() - t0
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
            timings=timings,
            step_times=info["step_times"],
            acceleration=info["acceleration"],
            cached_steps=info["cached_steps"],
            memory_plan=info["memory_plan"],
        )

    def _negative_embeds(self, name: str, pipe, negative: str | None) -> dict:
        """Encoded negative prompt, cached per variant: the default one is the same for every job.

        Exact: the pipeline would run the same deterministic encode_prompt on every call.
        """
        text = DEFAULT_NEGATIVE_PROMPT if negative is None else negative
        key = (name, text)
        cached = self._negative_cache.get(key)
        if cached is None:
            import torch

            with torch.no_grad():
                qwen, clip, cu_seqlens = pipe.encode_prompt(
                    prompt=[text],
                    max_sequence_length=MAX_SEQUENCE_LENGTH,
                    device=pipe._execution_device,
                    dtype=pipe.transformer.dtype,
                )
            cached = {
                "negative_prompt_embeds_qwen": qwen,
                "negative_prompt_embeds_clip": clip,
                "negative_prompt_cu_seqlens": cu_seqlens,
            }
            if self.negative_cache and (
                text == DEFAULT_NEGATIVE_PROMPT or len(self._negative_cache) < NEGATIVE_CACHE_SIZE
            ):
                self._negative_cache[key] = cached
        return cached

    @contextlib.contextmanager
    def _device_errors(self, r: ResolvedRequest) -> Iterator[None]:
        """Turn torch's device errors into the engine's typed ones, freeing memory on OOM."""
        import torch

        try:
            yield
        except Cancelled:
            raise
        except torch.OutOfMemoryError as exc:
            _free_memory()
            raise OutOfMemory(
                f"out of GPU memory at {r.width}x{r.height}, {r.num_frames} frames on {self.device}; "
                "try a smaller size or fewer frames, or start the server with offload enabled"
            ) from exc
        except RuntimeError as exc:
            if "CUDA error" in str(exc) or "CUBLAS_STATUS" in str(exc):
                raise DeviceFailure(f"unrecoverable device error on {self.device}: {exc}") from exc
            raise


def _device_capacity(device: str) -> int | None:
    """Total bytes of the CUDA device (None on CPU: no limit)."""
    if not device.startswith("cuda"):
        return None
    import torch

    return torch.cuda.get_device_properties(torch.device(device)).total_memory


def _plan_dict(fp: memory.Footprint | None) -> dict:
    if fp is None:
        return {}
    return {
        "mode": fp.mode,
        "cfg_batch": fp.cfg_batch,
        "vae_tiling": fp.vae_tiling,
        "estimated_peak_gib": round(fp.peak / memory.GiB, 2),
    }


def _free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def load_image(path: str | None, width: int, height: int):
    """Open an RGB image and centre-crop it to the target aspect (the pipeline then resizes)."""
    from PIL import Image

    if path is None:
        raise ValueError("image-to-video needs an image")
    with Image.open(path) as src:
        img = src.convert("RGB")
    w, h = img.size
    target = width / height
    if abs(w / h - target) > 1e-3:
        if w / h > target:  # too wide: crop the sides
            new_w = round(h * target)
            left = (w - new_w) // 2
            img = img.crop((left, 0, left + new_w, h))
        else:
            new_h = round(w / target)
            top = (h - new_h) // 2
            img = img.crop((0, top, w, top + new_h))
    return img


@contextlib.contextmanager
def _stage_timer(pipe, timings: dict[str, float], device: str) -> Iterator[None]:
    """Time the pipeline's prompt encoding and VAE decode by wrapping them for one call."""
    import torch

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)

    def timed(key: str, fn):
        def wrapper(*args, **kwargs):
            sync()
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                sync()
                timings[key] = timings.get(key, 0.0) + time.perf_counter() - t

        return wrapper

    patched = [(pipe, "encode_prompt"), (pipe.vae, "decode")]
    saved = [(obj, name, vars(obj).get(name)) for obj, name in patched]
    for obj, name in patched:
        setattr(obj, name, timed("encode_prompt" if name == "encode_prompt" else "decode", getattr(obj, name)))
    try:
        yield
    finally:
        for obj, name, previous in saved:  # restore exactly what was there (usually: the class method)
            if previous is None:
                delattr(obj, name)
            else:
                setattr(obj, name, previous)
