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

# Exact parameter counts (meta-device builds of the published configs).
QWEN_PARAMS = 8_292_166_656  # Qwen2.5-VL-7B-Instruct, vision tower included (the pipeline loads it)
CLIP_PARAMS = 123_060_480  # CLIP ViT-L/14 text model
VAE_PARAMS = 246_478_803  # HunyuanVideo VAE


@dataclass(frozen=True)
class DiT:
    params: int
    fp32_params: int  # of which kept in fp32 by diffusers
    model_dim: int
    ff_dim: int


DITS: dict[str, DiT] = {
    "lite": DiT(2_007_702_848, 278_808_064, 1792, 7168),
    "pro": DiT(19_311_325_248, 2_381_539_328, 4096, 16384),
    "tiny": DiT(131_000, 0, 48, 96),
}
TINY_COMPONENT_BYTES = 4 * 400_000  # tiny text encoders + VAE in fp32

MODES = ("gpu", "offload_text", "offload_model")  # fastest first
MODE_WORDS = {
    "gpu": "with every model on the GPU",
    "offload_text": "with the text encoders off the GPU while denoising",
    "offload_model": "even with offload",
}


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


def denoise_activations(variant: Variant, width: int, height: int, frames: int, batch: int) -> int:
    dit = DITS[variant.family]
    per_token = 4 * dit.model_dim + max(12 * dit.model_dim, 4 * dit.ff_dim)
    return int(ACTIVATION_MARGIN * batch * tokens(width, height, frames) * per_token)


def decode_activations(width: int, height: int, frames: int, tiling: bool) -> int:
    h, w = (min(height, VAE_TILE), min(width, VAE_TILE)) if tiling else (height, width)
    chunk = min(frames, VAE_CHUNK_FRAMES)
    live = VAE_LIVE_TENSORS * 128 * chunk * h * w * 2
    output = 3 * frames * height * width * 4  # the decoded clip (fp32 after postprocessing)
    return int(ACTIVATION_MARGIN * live) + output


def estimate(
    variant: Variant, width: int, height: int, frames: int, mode: str, cfg_batch: bool, vae_tiling: bool
) -> Footprint:
    """Peak bytes per phase for one request under `mode` (see the module docstring for the basis)."""
    if mode not in MODES:
        raise ValueError(f"memory mode must be one of {', '.join(MODES)}, got {mode!r}")
    w = weight_bytes(variant)
    batch = 2 if cfg_batch and variant.guidance > 1.0 else 1
    act = denoise_activations(variant, width, height, frames, batch)
    dec = decode_activations(width, height, frames, vae_tiling)
    text_act = TEXT_ACTIVATIONS if not variant.demo else 0
    if mode == "gpu":
        resident = w["transformer"] + w["text"] + w["vae"]
        text, denoise, decode = resident + text_act, resident + act, resident + dec
    elif mode == "offload_text":  # text encoders come in for encoding only
        resident = w["transformer"] + w["vae"]
        text, denoise, decode = resident + w["text"] + text_act, resident + act, resident + dec
    else:  # offload_model: one model on the GPU at a time
        text, denoise, decode = w["text"] + text_act, w["transformer"] + act, w["vae"] + dec
    return Footprint(mode, batch == 2, vae_tiling, text, denoise, decode, w)


def usable(capacity: int | None) -> int | None:
    """Bytes a generation may use on a device of `capacity` bytes (None: no limit, e.g. CPU)."""
    return None if capacity is None else capacity - CONTEXT_RESERVE


def plan(
    variant: Variant,
    width: int,
    height: int,
    frames: int,
    capacity: int | None,
    mode: str = "auto",
    cfg_batch: bool = True,
    vae_tiling: bool | None = None,
    resident: int = 0,
) -> Footprint | None:
    """The fastest plan that fits, or None if none does.

    `mode` "auto" tries gpu, then offload_text, then offload_model; a fixed mode tries only itself.
    Within a mode: CFG batching before sequential CFG, untiled VAE decode before tiled
    (`vae_tiling` True/False forces it). No capacity (CPU): the fastest plan. `resident`: bytes that
    stay on the device beside this request (other variants' models, pipelines/residency.py).
    """
    limit = usable(capacity)
    if limit is not None:
        limit -= resident
    modes = MODES if mode == "auto" else (mode,)
    batches = (True, False) if cfg_batch else (False,)
    tilings = (False, True) if vae_tiling is None else (vae_tiling,)
    for m in modes:
        for b in batches:
            for t in tilings:
                fp = estimate(variant, width, height, frames, m, b, t)
                if limit is None or fp.peak <= limit:
                    return fp
    return None


def max_frames_that_fit(variant: Variant, width: int, height: int, capacity: int, mode: str = "auto") -> int:
    """The largest 4k+1 frame count that fits at this size (0 if not even one frame does)."""
    best = 0
    for frames in range(1, variant.max_frames + 1, 4):
        if plan(variant, width, height, frames, capacity, mode) is None:
            break
        best = frames
    return best


def no_fit_message(variant: Variant, width: int, height: int, frames: int, capacity: int, mode: str = "auto") -> str:
    """'768x512, 241 frames needs about 61 GiB on this 24 GiB GPU even with offload; use at most ...'."""
    frugal = "offload_model" if mode == "auto" else mode
    need = estimate(variant, width, height, frames, frugal, cfg_batch=False, vae_tiling=True).peak + CONTEXT_RESERVE
    best = max_frames_that_fit(variant, width, height, capacity, mode)
    advice = f"use at most {best} frames or a smaller size" if best else "use a smaller size or a smaller model"
    return (
        f"{width}x{height}, {frames} frames needs about {need / GiB:.0f} GiB on this {capacity / GiB:.0f} GiB GPU "
        f"{MODE_WORDS[frugal]} ({variant.name}); {advice}"
    )
