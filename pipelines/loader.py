"""Load a Kandinsky 5 pipeline from a local folder: never the network.

Components are loaded one by one so that the Qwen tokenizer comes in as a plain
`Qwen2Tokenizer`: the hub repos declare `Qwen2VLProcessor`, which cannot be built without
torchvision (tiny_pipeline.md pitfall 1), and the pipelines only ever call the tokenizer part.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: every call below is local_files_only
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from .errors import WeightsMissing
from .layout import missing_parts
from .variants import Variant

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadOptions:
    device: str = "cpu"  # a concrete torch device string: cpu, cuda, cuda:N
    offload: bool = False  # model CPU offload (accelerate): one component on the GPU at a time
    vae_tiling: bool = False
    compile: bool = False  # torch.compile the repeated transformer blocks (the Engine turns it on for CUDA)
    # Where the weights live on CUDA (pipelines/memory.py): "gpu" all resident; "offload_text" the
    # text encoders on the CPU except while encoding; "offload_model" one model on the GPU at a time;
    # "stream_text" / "stream" (streaming.py) the text encoder / and the visual blocks streamed.
    memory_mode: str = "gpu"
    # Opt-in approximate weight storage (quant.py): int8 Qwen, scaled fp8 transformer blocks.
    text_int8: bool = False
    fp8_weights: bool = False
    # Opt-in fp8 matmuls in the transformer blocks (fp8_compute.py; the Engine refuses it without sm_89+).
    fp8_compute: bool = False

    @property
    def placement(self) -> str:
        if not self.device.startswith("cuda"):
            # everything on the one device; the streaming modes still run their hooks (exactness tests)
            return self.memory_mode if self.memory_mode in ("stream_text", "stream") else "gpu"
        return "offload_model" if self.offload else self.memory_mode


def attention_backend(device: str, nabla: bool) -> str:
    """The fastest exact attention backend importable here, as a diffusers backend name.

    nabla sparse attention builds a FlexAttention BlockMask, which only the flex backend takes.
    On CUDA: FlashAttention 3 (Hopper), then FlashAttention 2, then torch SDPA ("native"), which
    itself dispatches to its flash / cuDNN kernels. Sage is not picked automatically: its SM90
    kernels have produced noisy video (kandinsky_model.md, issue table row 6).
    """
    import importlib.util

    if nabla:
        return "flex"
    if not device.startswith("cuda"):
        return "native"
    if importlib.util.find_spec("flash_attn_interface") is not None:
        return "_flash_3"
    if importlib.util.find_spec("flash_attn") is not None:
        return "flash"
    return "native"


def pick_device(requested: str = "auto") -> str:
    """auto -> cuda if available else cpu; validates cuda / cuda:N."""
    import torch

    requested = (requested or "auto").strip().lower()
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cpu":
        return "cpu"
    if requested == "cuda" or requested.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {requested!r} requested but CUDA is not available")
        if ":" in requested:
            index = requested.split(":", 1)[1]
            if not index.isdigit() or int(index) >= torch.cuda.device_count():
                raise ValueError(f"device {requested!r}: there are {torch.cuda.device_count()} CUDA devices")
        return requested
    raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {requested!r}")


def dtype_for(device: str):
    import torch

    # bf16 on CUDA (the checkpoints' training precision), fp32 on CPU (bf16 matmuls are slow there).
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def load_pipeline(variant: Variant, folder: Path, options: LoadOptions, shared: Mapping[str, Any] | None = None):
    """Build the variant's diffusers pipeline from `folder`, placed per `options`. `shared`: components
    already loaded (byte-identical ones of another variant, residency.py), used instead of reading them."""
    folder = Path(folder)
    missing = missing_parts(folder)
    if missing:
        raise WeightsMissing(variant.name, str(folder), missing)

    import diffusers
    import transformers

    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()

    dtype = dtype_for(options.device)
    local = {"local_files_only": True}
    readers = {
        "transformer": lambda: diffusers.Kandinsky5Transformer3DModel.from_pretrained(
            folder, subfolder="transformer", dtype=dtype, **local
        ),
        "vae": lambda: diffusers.AutoencoderKLHunyuanVideo.from_pretrained(
            folder, subfolder="vae", dtype=dtype, **local
        ),
        "text_encoder": lambda: transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
            folder / "text_encoder", dtype=dtype, **local
        ),
        "text_encoder_2": lambda: transformers.CLIPTextModel.from_pretrained(
            folder / "text_encoder_2", dtype=dtype, **local
        ),
        "tokenizer": lambda: transformers.Qwen2Tokenizer.from_pretrained(folder / "tokenizer", **local),
        "tokenizer_2": lambda: transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer_2", **local),
        # never shared: a scheduler keeps its step state
        "scheduler": lambda: diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(
            folder, subfolder="scheduler", **local
        ),
    }
    shared = dict(shared or {})
    components = {name: shared[name] if name in shared else read() for name, read in readers.items()}

    cls = getattr(diffusers, variant.pipeline_class)
    pipe = cls(**components)
    configure_pipeline(pipe, variant, options)
    log.info(
        "loaded %s from %s on %s (%s, %s%s)",
        variant.name,
        folder,
        options.device,
        str(dtype).replace("torch.", ""),
        options.placement,
        f"; shared: {', '.join(sorted(shared))}" if shared else "",
    )
    return pipe


def configure_pipeline(pipe, variant: Variant, options: LoadOptions) -> None:
    """k5serve's set-up of a built pipeline: attention, compilation, tiling, placement on the device.

    Also used by bench/generate.py --full on pipelines built in memory from the published configs.
    """
    from .denoise import install_masked_text_attention
    from .lean import install_ffn_chunking

    transformer, vae = pipe.transformer, pipe.vae
    pipe.set_progress_bar_config(disable=True)

    install_masked_text_attention(transformer)  # before the backend is set: it applies to these too
    install_ffn_chunking(transformer)  # one chunk (the stock call) unless a run's memory plan says more
    placement = options.placement
    quantize(pipe, options)  # before compile and placement: they see the quantized layers
    backend = attention_backend(options.device, nabla=transformer.config.get("attention_type") == "nabla")
    set_attention_backend(transformer, backend)
    if backend == "flex" and options.device.startswith("cuda"):
        use_fused_flex_attention()  # also when the blocks run eagerly (compile off, or its fallback)
    elif backend == "flex":
        from .flex_cpu import use_dense_flex_on_cpu

        use_dense_flex_on_cpu()  # eager flex on the CPU would ignore nabla's block mask
    if options.compile:
        # Compile the 32/60 identical CrossDiT blocks once (regional compile: seconds, not minutes).
        # Streamed blocks run diffusers' offload hooks (compiler-disabled) and host modulations in
        # their forward: those need graph breaks, so fullgraph only when nothing is streamed.
        transformer.compile_repeated_blocks(fullgraph=placement != "stream", dynamic=True)
    if options.vae_tiling:
        vae.enable_tiling()
    if placement in ("stream_text", "stream"):
        from .streaming import place_streamed

        place_streamed(pipe, options.device, placement)
    elif placement == "offload_model":
        pipe.enable_model_cpu_offload(device=options.device)
    elif placement == "offload_text":
        pipe.to(options.device)
        pipe.text_encoder.to("cpu")  # the engine brings them in for each encode
        pipe.text_encoder_2.to("cpu")
    else:
        pipe.to(options.device)


def quantize(pipe, options: LoadOptions) -> None:
    """The opt-in approximate weight storage (quant.py) and fp8 compute (fp8_compute.py); labels each
    on the pipeline for every result."""
    from . import fp8_compute, quant

    labels = list(getattr(pipe, "_k5_approximations", ()))
    # fp8 compute first: it takes the attention and FFN-in Linears, fp8 storage then the rest (FFN out)
    if options.fp8_compute and fp8_compute.FP8_COMPUTE not in labels:
        fp8_compute.convert_transformer(pipe.transformer)
        labels.append(fp8_compute.FP8_COMPUTE)
    if options.text_int8 and quant.TEXT_INT8 not in labels:
        quant.quantize_text_encoder_int8(pipe.text_encoder)
        labels.append(quant.TEXT_INT8)
    if options.fp8_weights and quant.TRANSFORMER_FP8 not in labels:
        quant.quantize_transformer_fp8(pipe.transformer)
        labels.append(quant.TRANSFORMER_FP8)
    pipe._k5_approximations = labels


def drop_compiled(transformer) -> list[tuple]:
    """Run `transformer`'s compiled blocks eagerly from now on; returns the (module, compiled call)
    pairs, for a caller that puts them back."""
    dropped = [(m, m._compiled_call_impl) for m in transformer.modules() if getattr(m, "_compiled_call_impl", None)]
    for module, _ in dropped:
        module._compiled_call_impl = None
    return dropped


def set_attention_backend(transformer, backend: str) -> None:
    """Set `backend` on every attention processor of `transformer`, and nowhere else.

    diffusers' `set_attention_backend` also makes the backend the process-wide default, which every
    processor without one of its own follows: loading a nabla variant (flex) would switch the other
    loaded variants, and stock pipelines, to flex. So every processor gets its backend explicitly,
    "native" included, and the process default is put back.
    """
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    default = _AttentionBackendRegistry.get_active_backend()[0]
    transformer.set_attention_backend(backend)
    _AttentionBackendRegistry.set_active_backend(default)


def use_fused_flex_attention() -> None:
    """Route diffusers' flex attention backend through a compiled flex_attention (process-wide, idempotent).

    Called eagerly, FlexAttention runs its reference implementation, which materialises the whole
    fp32 score matrix: for Pro at 768x512x121 that is 32 heads x 47,616^2 tokens, about 290 GB, so
    every nabla variant (all of Pro, Lite 10 s) would run out of memory whenever the blocks are not
    compiled. Compiled, it is the fused block-sparse kernel. diffusers reads `flex_attention` as a
    module global of attention_dispatch; it gets a copy of torch's module whose `flex_attention` is
    compiled (a module, not a proxy object, so Dynamo reads it plainly inside compiled blocks).
    """
    import types

    import torch
    from diffusers.models import attention_dispatch

    module = attention_dispatch.flex_attention
    if module is None or getattr(module, "_k5_fused", False):
        return
    fused = types.ModuleType(module.__name__)
    fused.__dict__.update({k: v for k, v in vars(module).items() if not k.startswith("__")})
    fused.flex_attention = torch.compile(module.flex_attention, dynamic=True)
    fused._k5_fused = True
    fused._k5_original = module  # for stock_flex_attention
    attention_dispatch.flex_attention = fused


@contextlib.contextmanager
def stock_flex_attention() -> Iterator[None]:
    """diffusers' flex backend on torch's own (eager) flex_attention inside, as stock diffusers runs
    it; the fused one again after, if `use_fused_flex_attention` had installed it (bench/generate.py
    times stock diffusers this way)."""
    from diffusers.models import attention_dispatch

    module = attention_dispatch.flex_attention
    attention_dispatch.flex_attention = getattr(module, "_k5_original", module)
    try:
        yield
    finally:
        attention_dispatch.flex_attention = module
