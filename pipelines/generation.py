"""Stages 2-4 of a generation on a loaded pipeline: encode prompt -> denoise -> decode.

Engine.generate runs the whole sequence (1. resolve and load, 2-4 here, 5. write the mp4). The
stages call the stock diffusers pipeline, not a copy of it: k5serve encodes the prompts itself (to
keep the negative one between jobs and to time the stage), runs the pipeline on the embeddings with
`output_type="latent"` (its own timesteps, latents, I2V conditioning and loop, with denoise.py's
StepRunner as the transformer's forward), and decodes the latents as the pipeline would have. Each
stage is timed by the StageClock; cancellation is checked after every step and between the decode's
temporal windows (decode.py).
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from . import memory, video_to_video
from .cancel import Cancellation
from .clock import StageClock
from .decode import decode_in_chunks, vae_input
from .expand import expand
from .images import load_image
from .negatives import NegativePromptCache, PromptEmbeds
from .placement import plan_dict, text_encoders_on
from .request import ResolvedRequest
from .variants import HD_SIZES

StepCallback = Callable[[int, int], None]
# (phase, done, total) around the denoising steps: ("loading", 0, 1) as Engine.generate_frames starts
# loading the variant, ("encoding", 0, 1) as stage 2 starts (so a watcher tells a slow load from a
# slow encode), then ("decoding", i, n) from i=0 as the decode starts and after each of its n temporal
# windows (decode.py); ("writing", 0, 1) from Engine.generate
PhaseCallback = Callable[[str, int, int], None]
LOADING, ENCODING, DECODING, WRITING = "loading", "encoding", "decoding", "writing"
MAX_SEQUENCE_LENGTH = 256  # Qwen tokens per prompt, as the official pipelines (diffusers defaults to 512)


@dataclass
class Frames:
    """What stages 2-4 produced, and how."""

    frames: Any  # (F, H, W, 3) float frames in [0, 1]; the latents (1, T, H/8, W/8, C) if not decoded
    timings: dict[str, float]  # seconds: load, encode_prompt, denoise, decode (as far as it got)
    step_times: list[float] = field(default_factory=list)  # seconds of each denoising step
    acceleration: str = "none"  # what ran: "regular" only when a MagCache calibration exists
    cached_steps: int = 0  # transformer evaluations answered from the MagCache
    forwards: int = 0  # real transformer evaluations (a batched cond+uncond counts once)
    batched_steps: int = 0  # of which batched cond+uncond
    memory_plan: dict = field(default_factory=dict)
    revised_prompt: str | None = None  # the prompt as encoded, when expansion rewrote it (expand.py)
    approximations: list[str] = field(default_factory=list)  # opt-in 8-bit weights (quant.py)


@dataclass(frozen=True)
class Settings:
    """The engine's choices that shape a run."""

    device: str
    cfg_batch: bool = True  # cond and uncond in one transformer call when the plan allows (exact)
    vae_tiling: bool = False  # forced on; else the memory plan decides per request


def run(
    pipe,
    r: ResolvedRequest,
    *,
    settings: Settings,
    plan: memory.Footprint | None,
    negatives: NegativePromptCache,
    clock: StageClock,
    cancel: Cancellation,
    on_step: StepCallback | None = None,
    on_phase: PhaseCallback | None = None,
    decode: bool = True,
    group: Group | None = None,
    image: Any = None,
) -> Frames:
    """Stages 2-4 for `r` on `pipe` (loaded; `clock` has timed the load). `decode=False` stops after
    the denoising loop and returns the latents (warm-up). With `group` this process is one rank of a
    sequence-parallel group (pipelines/group.py): only its leader encodes (the others receive the
    embeddings) and decodes; every rank denoises. `image`: an I2V pass's first frame, already
    loaded (an extension's continuation, pipelines/extension.py); default: `r.image` from disk. A
    request with a source `video` starts from it (video_to_video.py: its own stage, encode_video)."""
    import torch

    from .denoise import StepRunner, magcache_for
    from .lean import ffn_chunks

    cfg = r.guidance > 1.0
    cache = None
    # MagCache's calibration follows a whole schedule: a video-to-video runs only its tail, exactly
    if r.acceleration == "regular" and r.strength == 1.0:
        cache = magcache_for(r.variant.name, r.steps, cfg=cfg, hd=(r.width, r.height) in HD_SIZES)
    pipe.vae.use_tiling = bool(settings.vae_tiling or (plan is not None and plan.vae_tiling))
    try:
        with torch.no_grad():
            # 2. encode prompt (the negative one comes from the cache after its first job)
            if on_phase is not None:
                on_phase(ENCODING, 0, 1)
            with clock.stage("encode_prompt"):
                encoded = None
                if group is None or group.leader:
                    with text_encoders_on(pipe, settings.device):
                        encoded = _encode(pipe, r, negatives, cfg)
                if group is not None:
                    encoded = group.share_prompts(encoded)  # the leader's, on every rank
                revised, prompt, negative = encoded

            # 3. denoise (a video-to-video from its source, encoded first)
            start, start_step = None, 0
            if r.video:
                with clock.stage("encode_video"):
                    start, start_step = video_to_video.start_latents(pipe, r), video_to_video.start_index(r)
                cancel.raise_if_cancelled()
            pair = (negative.qwen, negative.clip) if negative is not None else None
            batch = settings.cfg_batch and (plan is None or plan.cfg_batch)
            make_runner = StepRunner if group is None else group.step_runner
            runner = make_runner(pipe.transformer, pair, batch_cfg=batch, magcache=cache)
            steps = StepMonitor(runner, clock, r.steps - start_step, on_step, cancel)
            scheduled = video_to_video.window(pipe.scheduler, start_step) if r.video else contextlib.nullcontext()
            chunks = plan.ffn_chunks if plan is not None else 1  # FFN chunking (lean.py), from the memory plan
            with clock.stage("denoise"), runner.install(), scheduled, ffn_chunks(pipe.transformer, chunks):
                if image is None and r.variant.task == "i2v":
                    image = load_image(r.image, r.width, r.height)
                steps.start()
                latents = denoise(pipe, r, prompt, negative, image, steps, start)
            done = Frames(
                frames=latents,
                timings=clock.timings,
                step_times=steps.step_times,
                acceleration="regular" if cache is not None else "none",
                cached_steps=cache.skipped if cache is not None else 0,
                forwards=runner.forwards,
                batched_steps=runner.batched,
                memory_plan=plan_dict(plan),
                revised_prompt=revised,
                approximations=list(getattr(pipe, "_k5_approximations", ())),
            )
            if not decode or (group is not None and not group.leader):
                return done
            cancel.raise_if_cancelled()  # the last chance to skip the VAE

            # 4. decode, window by window (decode.py: the same frames as decode_latents)
            on_chunk = functools.partial(on_phase, DECODING) if on_phase is not None else None
            with clock.stage("decode"):
                done.frames = decode_in_chunks(pipe, latents, cancel, on_chunk)[0]
            return done
    finally:
        pipe.maybe_free_model_hooks()  # model offload: every model back off the GPU, also on failure


class Group(Protocol):
    """This process as one rank of a sequence-parallel group (pipelines/group.py implements it)."""

    leader: bool  # rank 0: encodes, decodes, writes

    def share_prompts(self, encoded: tuple | None) -> tuple:
        """The leader's (revised, prompt, negative) on every rank (the others pass None)."""
        ...

    def step_runner(self, transformer, negative, *, batch_cfg: bool, magcache) -> Any:
        """The StepRunner (denoise.py) for this rank and request: CFG-parallel where the layout says so."""
        ...


def _encode(pipe, r: ResolvedRequest, negatives: NegativePromptCache, cfg: bool) -> tuple:
    """Stage 2: (revised prompt or None, prompt embeddings, negative embeddings or None)."""
    revised = expand(pipe, r) if r.expand_prompt else None  # the official pipelines' rewrite
    prompt = encode_prompt(pipe, revised if revised is not None else r.prompt)
    negative = None
    if cfg:
        negative = negatives.get(r.variant.name, r.negative_prompt, lambda text: encode_prompt(pipe, text))
    return revised, prompt, negative


def encode_prompt(pipe, text: str) -> PromptEmbeds:
    """`text` encoded as the pipelines encode a prompt (Qwen + CLIP, at most 256 tokens).

    The call of diffusers 0.42.1 `Kandinsky5T2VPipeline.__call__`, "# 3. Encode input prompt"
    (pipelines/kandinsky5/pipeline_kandinsky.py lines 803-831; pipeline_kandinsky_i2v.py from line
    874 the same), for one prompt or one negative prompt.
    """
    qwen, clip, cu_seqlens = pipe.encode_prompt(
        prompt=[text],
        max_sequence_length=MAX_SEQUENCE_LENGTH,
        device=pipe._execution_device,
        dtype=pipe.transformer.dtype,
    )
    return PromptEmbeds(qwen, clip, cu_seqlens)


def denoise(
    pipe, r: ResolvedRequest, prompt: PromptEmbeds, negative: PromptEmbeds | None, image, steps, latents=None
) -> Any:
    """The stock pipeline on the encoded prompts up to its latents (B, T, H/8, W/8, C): timesteps,
    noise from the request's seed, I2V conditioning, the denoising loop (calling `steps` after each
    step) and, for I2V, its first-frame normalisation. `latents`: where to start instead of the
    seed's noise (a video-to-video; its scheduler window is set by the caller)."""
    import torch

    kwargs = dict(
        prompt_embeds_qwen=prompt.qwen,
        prompt_embeds_clip=prompt.clip,
        prompt_cu_seqlens=prompt.cu_seqlens,
        height=r.height,
        width=r.width,
        num_frames=r.num_frames,
        num_inference_steps=r.steps,
        guidance_scale=r.guidance,
        generator=torch.Generator(device="cpu").manual_seed(r.seed),
        output_type="latent",
        callback_on_step_end=steps,
        max_sequence_length=MAX_SEQUENCE_LENGTH,
    )
    if negative is not None:
        kwargs.update(
            negative_prompt_embeds_qwen=negative.qwen,
            negative_prompt_embeds_clip=negative.clip,
            negative_prompt_cu_seqlens=negative.cu_seqlens,
        )
    if image is not None:
        kwargs["image"] = image
    if latents is not None:
        kwargs["latents"] = latents
    return pipe(**kwargs).frames


def decode_latents(pipe, latents) -> Any:
    """Latents (B, T, H/8, W/8, C) -> float frames (B, F, H, W, 3) in [0, 1], exactly as the pipeline.

    Mirrors diffusers 0.42.1 `Kandinsky5T2VPipeline.__call__`, "# 11. Decode latents to video"
    (pipelines/kandinsky5/pipeline_kandinsky.py lines 941-965), which `Kandinsky5I2VPipeline.__call__`
    repeats (pipeline_kandinsky_i2v.py lines 1018-1042), with num_videos_per_prompt=1 and
    output_type="np". The one-shot reference: the engine decodes the same frames window by window
    (decode.decode_in_chunks); tests/pipelines/test_pipelines.py checks the engine's frames equal stock
    diffusers' bit for bit, tests/pipelines/test_decode.py the two decodes.
    """
    video = pipe.vae.decode(vae_input(pipe, latents)).sample
    return pipe.video_processor.postprocess_video(video, output_type="np")


class StepMonitor:
    """diffusers' `callback_on_step_end` for one run: times each step, reports progress, and stops
    the run on cancel. Raising Cancelled (rather than diffusers' `_interrupt`) leaves the pipeline
    at once: no further step and no decode."""

    def __init__(self, runner, clock: StageClock, total: int, on_step: StepCallback | None, cancel: Cancellation):
        self.runner = runner  # its first transformer call is where step 1 starts
        self.clock = clock
        self.total = total
        self.on_step = on_step
        self.cancel = cancel
        self.step_times: list[float] = []
        self._last = 0.0

    def start(self) -> None:
        """Call just before the pipeline runs."""
        self._last = self.clock.now()

    def __call__(self, _pipe, i: int, _t, _kwargs: dict) -> dict:
        now = self.clock.now()
        if not self.step_times and self.runner.started_at is not None:
            self._last = max(self._last, self.runner.started_at)  # not the latents' or the image's set-up
        self.step_times.append(now - self._last)
        self.cancel.raise_if_cancelled()
        if self.on_step is not None:
            self.on_step(i + 1, self.total)
            self.cancel.raise_if_cancelled()  # a cancel from the progress listener stops here
        self._last = time.perf_counter()  # the progress listeners' time is not step time
        return {}
