"""Will a request fit this device? Peak GPU memory estimates and the memory mode that makes it fit.

Torch-free arithmetic (the server calls it at submit time through Engine.prepare). Basis:

* Weights: exact parameter counts of the diffusers/transformers models built from the published
  configs (tests/pipelines/test_bench_generate.py builds them on the meta device and checks these numbers).
  bf16 on CUDA, except what diffusers keeps in fp32 (`_keep_in_fp32_modules`: time embeddings and
  modulations, 0.28 B params in Lite, 2.38 B in Pro).
* Denoising activations, per visual token and per batch element, inside one CrossDiT block in eager
  bf16: the bf16 residual stream and attention output (4·d bytes) plus the larger of the fp32
  AdaLN temporaries (3 live fp32 copies: 12·d) and the FFN hidden + GELU output (2 x 2·f). Blocks
  run one after another, so one block's peak is the peak. Lite: 35.8 KB/token, Pro: 81.9 KB/token;
  a 5 s 768x512 clip has 47,616 tokens (1.7 GB Lite, 3.9 GB Pro per batch element). CFG batching
  doubles it.
* VAE decode: diffusers decodes HunyuanVideo in temporal chunks of 17 frames; the peak is at full
  resolution in the last up block (128 channels): about 4 live tensors of 128 x 17 x H x W bf16.
  Spatial tiling (256 px tiles) bounds H x W by 256 x 256.
* Text encoding (Qwen2.5-VL-7B on at most 128+256 tokens) needs well under 1 GB of activations.
* Streaming modes (pipelines/streaming.py): block streaming keeps on the device everything of the
  transformer but its visual blocks, plus STREAM_PREFETCH blocks in flight (the one computing, the
  next one copying in); their modulations are computed on the host (precomputed per step), so the
  streamed blocks are bf16 only. Text-encoder streaming keeps CLIP and at most two Qwen leaves (the
  largest: its 545 M-parameter embedding and LM head) on the device. FFN chunking (FFN_CHUNKS pieces
  of the sequence) divides the FFN hidden term of the activations.
* Host RAM: what each mode keeps off the device lives in host memory (pinned for the streamed
  parts, so the copies can overlap compute); `Footprint.host` counts it, and the plan refuses a
  mode whose host copies do not fit `host_capacity`.
* Headroom: 25 % on activations (allocator fragmentation, kernel workspaces) and 1.5 GiB of the
  device for the CUDA context and cuBLAS/cuDNN workspaces.

These are analytic estimates; bench/RESULTS.md records measured peaks next to them once a GPU run
exists. On CPU there is no limit (capacity None).
"""

from __future__ import annotations

from dataclasses import dataclass

from .variants import Variant

GiB = 2**30
CONTEXT_RESERVE = int(1.5 * GiB)
ACTIVATION_MARGIN = 1.25
VAE_CHUNK_FRAMES = 17
VAE_TILE = 256
VAE_LIVE_TENSORS = 4
TEXT_ACTIVATIONS = int(0.75 * GiB)
HOST_RESERVE = 8 * GiB  # host RAM for the OS, Python, torch, the server and the loading buffers

# Exact parameter counts (meta-device builds of the published configs).
QWEN_PARAMS = 8_292_166_656  # Qwen2.5-VL-7B-Instruct, vision tower included (the pipeline loads it)
CLIP_PARAMS = 123_060_480  # CLIP ViT-L/14 text model
VAE_PARAMS = 246_478_803  # HunyuanVideo VAE


QWEN_EMBED_PARAMS = 544_997_376  # its token embedding; the LM head is as large (152,064 x 3,584)


@dataclass(frozen=True)
class DiT:
    params: int
    fp32_params: int  # of which kept in fp32 by diffusers
    model_dim: int
    ff_dim: int
    visual_blocks: int = 0
    block_params: int = 0  # one visual block, its modulation included
    modulation_params: int = 0  # one visual block's modulation (fp32)

    @property
    def streamed_params(self) -> int:
        """Parameters of the visual blocks less their modulations: what block streaming moves."""
        return self.visual_blocks * (self.block_params - self.modulation_params)


DITS: dict[str, DiT] = {
    "lite": DiT(2_007_702_848, 278_808_064, 1792, 7168, 32, 59_668_480, 8_273_664),
    "pro": DiT(19_311_325_248, 2_381_539_328, 4096, 16384, 60, 306_254_336, 37_785_600),
    "tiny": DiT(131_056, 0, 48, 96, 2, 42_384, 14_256),
}
TINY_COMPONENT_BYTES = 4 * 400_000  # tiny text encoders + VAE in fp32

# Fastest first. Every mode is exact (the same frames as "gpu"); they differ in what is on the device.
MODES = ("gpu", "offload_text", "stream_text", "offload_model", "stream")
MODE_WORDS = {
    "gpu": "with every model on the GPU",
    "offload_text": "with the text encoders off the GPU while denoising",
    "stream_text": "with the text encoder streamed layer by layer",
    "offload_model": "with one model on the GPU at a time",
    "stream": "even streaming the transformer block by block",
}
STREAM_PREFETCH = 2  # visual blocks on the device at once while streaming: the computing one + the next
FFN_CHUNKS = 4  # as ComfyUI: the FFN of each block on a quarter of the sequence at a time


@dataclass(frozen=True)
class Footprint:
    """Estimated peak bytes of one generation, by phase, and the plan it assumes."""

    mode: str
    cfg_batch: bool
    vae_tiling: bool
    text: int  # peak while encoding the prompt
    denoise: int  # peak while denoising
    decode: int  # peak while decoding
    weights: dict[str, int]
    ffn_chunks: int = 1  # the FFN runs on this many pieces of the sequence (exact)
    host: int = 0  # host RAM the mode keeps weights in (pinned where streamed)

    @property
    def peak(self) -> int:
        return max(self.text, self.denoise, self.decode)


def tokens(width: int, height: int, frames: int) -> int:
    """Visual tokens of one transformer call: latent frames x (H/16) x (W/16)."""
    return ((frames - 1) // 4 + 1) * (height // 16) * (width // 16)


def weight_bytes(variant: Variant, device_bf16: bool = True) -> dict[str, int]:
    dit = DITS[variant.family]
    if variant.demo:
        return {"transformer": 4 * dit.params, "text": TINY_COMPONENT_BYTES // 2, "vae": TINY_COMPONENT_BYTES // 2}
    width = 2 if device_bf16 else 4
    return {
        "transformer": width * dit.params + (4 - width) * dit.fp32_params,
        "text": width * (QWEN_PARAMS + CLIP_PARAMS),
        "vae": width * VAE_PARAMS,
    }


def denoise_activations(variant: Variant, width: int, height: int, frames: int, batch: int, ffn_chunks: int = 1) -> int:
    dit = DITS[variant.family]
    per_token = 4 * dit.model_dim + max(12 * dit.model_dim, 4 * dit.ff_dim // ffn_chunks)
    return int(ACTIVATION_MARGIN * batch * tokens(width, height, frames) * per_token)


def decode_activations(width: int, height: int, frames: int, tiling: bool) -> int:
    h, w = (min(height, VAE_TILE), min(width, VAE_TILE)) if tiling else (height, width)
    chunk = min(frames, VAE_CHUNK_FRAMES)
    live = VAE_LIVE_TENSORS * 128 * chunk * h * w * 2
    output = 3 * frames * height * width * 4  # the decoded clip (fp32 after postprocessing)
    return int(ACTIVATION_MARGIN * live) + output


def streamed_parts(variant: Variant) -> dict[str, int]:
    """Bytes the streaming modes place: what stays on the device and what streams from the host."""
    dit = DITS[variant.family]
    w = weight_bytes(variant)
    width = 4 if variant.demo else 2
    blocks = width * dit.streamed_params  # bf16 on CUDA
    modulations = 4 * dit.visual_blocks * dit.modulation_params  # fp32, computed on the host
    if variant.demo:
        qwen_peak, clip = w["text"], 0
    else:
        qwen_peak, clip = 2 * 2 * QWEN_EMBED_PARAMS, 2 * CLIP_PARAMS  # two of its largest leaves in flight
    return {
        "transformer_resident": w["transformer"] - blocks - modulations,
        "blocks_in_flight": min(STREAM_PREFETCH, dit.visual_blocks) * blocks // max(dit.visual_blocks, 1),
        "blocks_host": blocks,
        "modulations_host": modulations,
        "text_device": qwen_peak + clip,
        "text_host": w["text"] - clip,
    }


def estimate(
    variant: Variant,
    width: int,
    height: int,
    frames: int,
    mode: str,
    cfg_batch: bool,
    vae_tiling: bool,
    ffn_chunks: int = 1,
) -> Footprint:
    """Peak bytes per phase for one request under `mode` (see the module docstring for the basis)."""
    if mode not in MODES:
        raise ValueError(f"memory mode must be one of {', '.join(MODES)}, got {mode!r}")
    w = weight_bytes(variant)
    batch = 2 if cfg_batch and variant.guidance > 1.0 else 1
    act = denoise_activations(variant, width, height, frames, batch, ffn_chunks)
    dec = decode_activations(width, height, frames, vae_tiling)
    text_act = TEXT_ACTIVATIONS if not variant.demo else 0
    s = streamed_parts(variant)
    host = 0
    if mode == "gpu":
        resident = w["transformer"] + w["text"] + w["vae"]
        text, denoise, decode = resident + text_act, resident + act, resident + dec
    elif mode == "offload_text":  # text encoders come in for encoding only
        resident = w["transformer"] + w["vae"]
        text, denoise, decode = resident + w["text"] + text_act, resident + act, resident + dec
        host = w["text"]
    elif mode == "stream_text":  # the text encoder streams through; the rest stays
        resident = w["transformer"] + w["vae"]
        text, denoise, decode = resident + s["text_device"] + text_act, resident + act, resident + dec
        host = s["text_host"]
    elif mode == "offload_model":  # one model on the GPU at a time
        text, denoise, decode = w["text"] + text_act, w["transformer"] + act, w["vae"] + dec
        host = sum(w.values())
    else:  # stream: text encoder and visual blocks stream through, modulations on the host
        resident = s["transformer_resident"] + w["vae"]
        text = resident + s["text_device"] + text_act
        denoise = resident + s["blocks_in_flight"] + act
        decode = resident + dec
        host = s["text_host"] + s["blocks_host"] + s["modulations_host"]
    return Footprint(mode, batch == 2, vae_tiling, text, denoise, decode, w, ffn_chunks, host)


def usable(capacity: int | None) -> int | None:
    """Bytes a generation may use on a device of `capacity` bytes (None: no limit, e.g. CPU)."""
    return None if capacity is None else capacity - CONTEXT_RESERVE


def host_limit(host_capacity: int | None) -> int | None:
    """Host bytes weights may take on a host of `host_capacity` bytes of RAM (None: not checked):
    HOST_RESERVE is left for the OS, Python, torch and the server."""
    return None if host_capacity is None else host_capacity - HOST_RESERVE


def plan(
    variant: Variant,
    width: int,
    height: int,
    frames: int,
    capacity: int | None,
    mode: str = "auto",
    cfg_batch: bool = True,
    vae_tiling: bool | None = None,
    host_capacity: int | None = None,
    resident: int = 0,
) -> Footprint | None:
    """The fastest plan that fits, or None if none does.

    `mode` "auto" tries the MODES fastest first; a fixed mode tries only itself. Within a mode: CFG
    batching before sequential CFG, untiled VAE decode before tiled (`vae_tiling` True/False forces
    it), the whole FFN before FFN chunking. A plan fits when its peak fits the device and its host
    copies fit `host_capacity` (None: host RAM not checked). No capacity (CPU): the fastest plan.
    `resident`: bytes that stay on the device beside this request (other variants' models,
    pipelines/residency.py).
    """
    limit = usable(capacity)
    if limit is not None:
        limit -= resident
    host = host_limit(host_capacity)
    modes = MODES if mode == "auto" else (mode,)
    batches = (True, False) if cfg_batch else (False,)
    tilings = (False, True) if vae_tiling is None else (vae_tiling,)
    for m in modes:
        for b in batches:
            for t in tilings:
                for c in (FFN_CHUNKS,) if m == "stream" else (1, FFN_CHUNKS):  # stream: all frugal
                    fp = estimate(variant, width, height, frames, m, b, t, c)
                    fits_host = host is None or fp.host <= host
                    if (limit is None or fp.peak <= limit) and fits_host:
                        return fp
    return None


def max_frames_that_fit(
    variant: Variant, width: int, height: int, capacity: int, mode: str = "auto", host_capacity: int | None = None
) -> int:
    """The largest 4k+1 frame count that fits at this size (0 if not even one frame does)."""
    best = 0
    for frames in range(1, variant.max_frames + 1, 4):
        if plan(variant, width, height, frames, capacity, mode, host_capacity=host_capacity) is None:
            break
        best = frames
    return best


def frugal(
    variant: Variant, width: int, height: int, frames: int, mode: str = "auto", host_capacity: int | None = None
) -> Footprint:
    """The smallest-peak plan of `mode` (auto: of the modes whose host copies fit the host)."""
    host = host_limit(host_capacity)
    modes = MODES if mode == "auto" else (mode,)
    plans = [estimate(variant, width, height, frames, m, False, True, FFN_CHUNKS) for m in modes]
    fitting = [p for p in plans if host is None or p.host <= host] or plans
    return min(fitting, key=lambda p: p.peak)


def no_fit_message(
    variant: Variant,
    width: int,
    height: int,
    frames: int,
    capacity: int,
    mode: str = "auto",
    host_capacity: int | None = None,
) -> str:
    """'768x512, 241 frames needs about 61 GiB on this 24 GiB GPU even with offload; use at most ...',
    or, when the device would have room but the host has not, how much host RAM the mode needs."""
    host = host_limit(host_capacity)
    modes = MODES if mode == "auto" else (mode,)
    device_fits = [
        p
        for p in (estimate(variant, width, height, frames, m, False, True, FFN_CHUNKS) for m in modes)
        if p.peak <= usable(capacity)
    ]
    if device_fits and host is not None and all(p.host > host for p in device_fits):
        least = min(device_fits, key=lambda p: p.host)
        return (
            f"{width}x{height}, {frames} frames fits this {capacity / GiB:.0f} GiB GPU only in memory mode "
            f"{least.mode}, which keeps about {(least.host + HOST_RESERVE) / GiB:.0f} GiB in host RAM "
            f"({least.host / GiB:.0f} GiB of weights + {HOST_RESERVE / GiB:.0f} GiB for the process); this host has "
            f"{host_capacity / GiB:.0f} GiB ({variant.name}); add host RAM or use a smaller model"
        )
    best_plan = frugal(variant, width, height, frames, mode, host_capacity)
    need = best_plan.peak + CONTEXT_RESERVE
    best = max_frames_that_fit(variant, width, height, capacity, mode, host_capacity)
    advice = f"use at most {best} frames or a smaller size" if best else "use a smaller size or a smaller model"
    return (
        f"{width}x{height}, {frames} frames needs about {need / GiB:.0f} GiB on this {capacity / GiB:.0f} GiB GPU "
        f"{MODE_WORDS[best_plan.mode]} ({variant.name}); {advice}"
    )
