"""Generation benchmark: k5serve's engine vs stock diffusers, same request, same process.

    python bench/generate.py --out results.json [--variants ...] [--runs 3]          # tiny, CPU or GPU
    python bench/generate.py --full --out results.json [--variants lite-distilled,lite-sft,pro-sft]

Stock = the pipeline used as the diffusers docs show: `pipe(prompt=..., ...).frames[0]` and
`export_to_video` (plus `set_attention_backend("flex")` for nabla configs, which need it to run).
k5serve = `Engine.generate` (mp4 included). Both get the same prompt, size, frames, steps, guidance
and seed; the first run of each is a warm-up (compilation for k5serve) and is not counted. JSON per
variant: stock_s, k5serve_s, speedup (median end-to-end), per-stage medians (encode_prompt,
denoise, per_step, decode, write), every denoising step's time, peak memory.

--full (CUDA only): the full-size architectures from their published configs (kandinsky_model.md
§3) with random weights made on the GPU: Lite 2B / Pro 19B transformers, Qwen2.5-VL-7B, CLIP ViT-L
text model, HunyuanVideo VAE, at 768x512, 121 frames. Nothing is downloaded. The tokenizers are
k5serve's tiny ones (ids fit the real vocabularies; prompts come out longer than with real Qwen).
It also times one bare transformer forward per variant (dense attention) and reports its
TFLOP/s against the dense bf16 peak.

--ablate: after the normal k5serve timing, each exact speed-up (CFG batching, the negative-prompt
cache, compile, the attention backend) switched off on its own, to measure each one's share. A path
that fails (stock Pro's eager FlexAttention cannot fit at 768x512x121) is reported as an error and
the run goes on; the JSON is rewritten after every variant.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.variants import NABLA_TRANSFORMER_CONFIG  # data only, no torch

# ---- full-size configs (published values; kandinsky_model.md §3, the models' config.json) -----------

LITE_DIT = dict(
    in_visual_dim=16,
    out_visual_dim=16,
    in_text_dim=3584,
    in_text_dim2=768,
    time_dim=512,
    patch_size=(1, 2, 2),
    model_dim=1792,
    ff_dim=7168,
    num_text_blocks=2,
    num_visual_blocks=32,
    axes_dims=(16, 24, 24),
    visual_cond=True,
    attention_type="regular",
)
PRO_DIT = dict(
    LITE_DIT,
    time_dim=1024,
    model_dim=4096,
    ff_dim=16384,
    num_text_blocks=4,
    num_visual_blocks=60,
    axes_dims=(32, 48, 48),
)
QWEN_TEXT = dict(
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    max_position_embeddings=128000,
    rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1000000.0},
    tie_word_embeddings=False,
    bos_token_id=151643,
    eos_token_id=151645,
)
QWEN_VISION = dict(
    depth=32,
    hidden_act="silu",
    hidden_size=1280,
    intermediate_size=3420,
    num_heads=16,
    in_chans=3,
    out_hidden_size=3584,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    window_size=112,
    fullatt_block_indexes=[7, 15, 23, 31],
    tokens_per_second=2,
)
QWEN_IDS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653)
CLIP_TEXT = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    projection_dim=768,
    hidden_act="quick_gelu",
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
)
HUNYUAN_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=16,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    norm_num_groups=32,
    scaling_factor=0.476986,
    spatial_compression_ratio=8,
    temporal_compression_ratio=4,
    mid_block_add_attention=True,
)

# bench name -> (catalogue variant, transformer config)
FULL_VARIANTS: dict[str, tuple[str, dict]] = {
    "lite-distilled": ("kandinsky5-lite-t2v-distilled-5s", LITE_DIT),
    "lite-sft": ("kandinsky5-lite-t2v-sft-5s", LITE_DIT),
    # The T2V-Pro-sft-5s-Diffusers transformer config asks for nabla (P=0.8) even at 5 s SD.
    "pro-sft": ("kandinsky5-pro-t2v-sft-5s", dict(PRO_DIT, **NABLA_TRANSFORMER_CONFIG)),
}
H100_BF16_DENSE_TFLOPS = 989.0  # NVIDIA H100 SXM spec sheet, dense (no sparsity)


def build_component(kind: str, dit_config: dict | None = None):
    """One full-size model, constructed in the current default device/dtype (meta for counting)."""
    from diffusers import AutoencoderKLHunyuanVideo, Kandinsky5Transformer3DModel
    from transformers import CLIPTextConfig, CLIPTextModel, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    if kind == "transformer":
        return Kandinsky5Transformer3DModel(**(dit_config or LITE_DIT))
    if kind == "text_encoder":
        config = Qwen2_5_VLConfig(
            text_config=QWEN_TEXT, vision_config=QWEN_VISION, tie_word_embeddings=False, **QWEN_IDS
        )
        config._attn_implementation = "sdpa"
        return Qwen2_5_VLForConditionalGeneration(config)
    if kind == "text_encoder_2":
        return CLIPTextModel(CLIPTextConfig(**CLIP_TEXT))
    if kind == "vae":
        return AutoencoderKLHunyuanVideo(**HUNYUAN_VAE)
    raise ValueError(kind)


def meta_parameter_counts() -> dict[str, int]:
    """Parameter counts of every full-size model, built on the meta device (no memory allocated)."""
    import torch

    counts = {}
    with torch.device("meta"):
        for name, dit in (("lite_transformer", LITE_DIT), ("pro_transformer", PRO_DIT)):
            counts[name] = sum(p.numel() for p in build_component("transformer", dit).parameters())
        for kind in ("text_encoder", "text_encoder_2", "vae"):
            counts[kind] = sum(p.numel() for p in build_component(kind).parameters())
    return counts


@contextlib.contextmanager
def _default_dtype(dtype):
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_full_pipeline(bench_name: str, device: str = "cuda"):
    """A full-size random-weight pipeline made directly on `device` in bf16.

    Constructed under `torch.device(device)` rather than meta + `to_empty`: construction runs each
    module's own init, which also fills the non-persistent RoPE buffers and the time embedding's
    frequency tensor (to_empty would leave those as garbage). Then: the AdaLN modulations get
    random weights (they are zero-initialised, which would make every block a no-op) and the
    modules diffusers keeps in fp32 are cast back to fp32, as `from_pretrained` would load them.
    """
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, Kandinsky5T2VPipeline

    from pipelines.tiny import build_clip_tokenizer, build_qwen_tokenizer

    name, dit_config = FULL_VARIANTS[bench_name]
    with torch.device(device), _default_dtype(torch.bfloat16), torch.no_grad():
        torch.manual_seed(0)
        transformer = build_component("transformer", dit_config).eval()
        for module in transformer.modules():
            if type(module).__name__ == "Kandinsky5Modulation":
                module.out_layer.weight.normal_(0.0, 0.02)
                module.out_layer.bias.normal_(0.0, 0.02)
        for module_name, module in transformer.named_modules():
            if module_name.split(".")[-1] in transformer._keep_in_fp32_modules:
                module.float()
        text_encoder = build_component("text_encoder").eval()
        text_encoder_2 = build_component("text_encoder_2").eval()
        vae = build_component("vae").eval()
    pipe = Kandinsky5T2VPipeline(
        transformer=transformer,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=build_qwen_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=build_clip_tokenizer(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
    )
    pipe.set_progress_bar_config(disable=True)
    return name, pipe


def forward_tflops(dit_config: dict, tokens: int, text_tokens: int) -> float:
    """Dense-attention TFLOP of one transformer forward (kandinsky_model.md §6)."""
    d, f, n, L = dit_config["model_dim"], dit_config["ff_dim"], tokens, text_tokens
    per_block = 12 * n * d * d + 4 * L * d * d + 4 * n * d * f + 4 * n * n * d + 4 * n * L * d
    return dit_config["num_visual_blocks"] * per_block / 1e12


def time_transformer_forward(pipe, dit_config: dict, device: str, frames: int = 121, iters: int = 3) -> dict:
    """One bare batch-1 forward at 768x512 (121 frames by default) with dense attention: seconds, TFLOP/s."""
    import torch

    from pipelines.loader import attention_backend

    tr = pipe.transformer
    dtype = torch.bfloat16
    t, h, w = (frames - 1) // 4 + 1, 512 // 8, 768 // 8  # latent frames and pixels (VAE: 4x time, 8x space)
    channels = 2 * dit_config["in_visual_dim"] + 1 if dit_config.get("visual_cond") else dit_config["in_visual_dim"]
    latent = torch.randn(1, t, h, w, channels, device=device, dtype=dtype)
    text = torch.randn(1, 256, dit_config["in_text_dim"], device=device, dtype=dtype)
    pooled = torch.randn(1, dit_config["in_text_dim2"], device=device, dtype=dtype)
    rope = [torch.arange(t, device=device), torch.arange(h // 2, device=device), torch.arange(w // 2, device=device)]
    backend = attention_backend(device, nabla=False)
    tr.set_attention_backend(backend)  # dense: the MFU target is about the dense forward

    times = []
    with torch.no_grad():
        for i in range(iters + 1):
            _sync(device)
            t0 = time.perf_counter()
            tr(latent, text, torch.tensor([500.0], device=device), pooled, rope, torch.arange(256, device=device))
            _sync(device)
            if i:
                times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    tflop = forward_tflops(dit_config, t * (h // 2) * (w // 2), 256)
    return {
        "attention_backend": backend,
        "seconds": round(seconds, 4),
        "tflop": round(tflop, 1),
        "tflops": round(tflop / seconds, 1),
        "fraction_of_h100_bf16_dense_peak": round(tflop / seconds / H100_BF16_DENSE_TFLOPS, 3),
    }


# ---- timing both paths ----------------------------------------------------------------------------


def _peak_memory(device: str) -> dict:
    import resource

    import torch

    out = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device.startswith("cuda"):
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        out["peak_gpu_reserved_mb"] = round(torch.cuda.max_memory_reserved(device) / 2**20, 1)
    return out


def _sync(device: str) -> None:
    """Wait for queued GPU work, so a timer reads the work and not its launch (no-op off CUDA)."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def _reset_peak(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)


def _summary(rows: list[dict], steps: int) -> dict:
    keys = sorted({k for row in rows for k in row if not isinstance(row[k], list)})
    med = {k: statistics.median(row.get(k, 0.0) for row in rows) for k in keys}
    med["per_step"] = med["denoise"] / steps
    out = {k: round(v, 4) for k, v in med.items()}
    out["step_times"] = [round(t, 4) for t in rows[len(rows) // 2].get("step_times", [])]
    return out


def time_stock(stock, resolved, args, device: str, image: Path | None) -> dict:
    """Stock diffusers as documented: pipe(...).frames[0] + export_to_video; run 0 is a warm-up."""
    import torch
    from diffusers.utils import export_to_video

    from pipelines.images import load_image

    kwargs = dict(
        prompt=args.prompt,
        height=resolved.height,
        width=resolved.width,
        num_frames=resolved.num_frames,
        num_inference_steps=resolved.steps,
        guidance_scale=resolved.guidance,
    )
    if image is not None:
        kwargs["image"] = load_image(str(image), resolved.width, resolved.height)
    rows, warmup = [], 0.0
    _reset_peak(device)
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs + 1):
            timings: dict = {"step_times": []}
            last = [0.0]

            def on_step(_p, _i, _t, _kw, timings=timings, last=last):
                _sync(device)
                now = time.perf_counter()
                timings["step_times"].append(now - last[0])
                last[0] = now
                return {}

            def first_call(*_a, last=last, seen=[]):  # noqa: B006 - one list per run
                if not seen:
                    seen.append(True)
                    _sync(device)
                    last[0] = time.perf_counter()  # step 1 starts at its first transformer call

            _sync(device)
            t0 = last[0] = time.perf_counter()
            hook = stock.transformer.register_forward_pre_hook(first_call)
            try:
                with _stock_stages(stock, timings, device):
                    generator = torch.Generator("cpu").manual_seed(0)
                    frames = stock(**kwargs, generator=generator, callback_on_step_end=on_step).frames[0]
            finally:
                hook.remove()
            t_write = time.perf_counter()
            export_to_video(list(frames), str(Path(tmp) / "stock.mp4"), fps=24)
            timings["write"] = time.perf_counter() - t_write
            timings["total"] = time.perf_counter() - t0
            spent = timings.get("encode_prompt", 0.0) + timings.get("decode", 0.0) + timings["write"]
            timings["denoise"] = timings["total"] - spent
            if i:
                rows.append(timings)
            else:
                warmup = timings["total"]
    return {"summary": _summary(rows, resolved.steps), "warmup_s": round(warmup, 3), "memory": _peak_memory(device)}


@contextlib.contextmanager
def _stock_stages(stock, timings: dict, device: str):
    """Time stock diffusers' prompt encoding and VAE decode, which run inside its own `__call__`:
    `stock.encode_prompt` and `stock.vae.decode` are wrapped for the run (instance attributes,
    removed after), each call timed by the engine's StageClock. k5serve's own stages need no such
    wrapping: the engine times them itself."""
    from pipelines.clock import StageClock

    clock = StageClock(device, timings)

    def timed(stage: str, fn):
        def wrapper(*args, **kwargs):
            with clock.stage(stage):
                return fn(*args, **kwargs)

        return wrapper

    stock.encode_prompt = timed("encode_prompt", stock.encode_prompt)
    stock.vae.decode = timed("decode", stock.vae.decode)
    try:
        yield
    finally:
        del stock.encode_prompt, stock.vae.decode  # the class methods again


def time_engine(engine, resolved, args) -> dict:
    """k5serve: Engine.generate (mp4 included); run 0 is a warm-up."""
    rows, warmup = [], 0.0
    _reset_peak(engine.device)
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs + 1):
            _sync(engine.device)
            t0 = time.perf_counter()
            result = engine.generate(resolved, Path(tmp) / "k5.mp4")
            _sync(engine.device)
            timings = dict(result.timings, total=time.perf_counter() - t0, step_times=result.step_times)
            if i:
                rows.append(timings)
            else:
                warmup = timings["total"]
    return {
        "summary": _summary(rows, resolved.steps),
        "warmup_s": round(warmup, 3),
        "memory": _peak_memory(engine.device),
        "memory_plan": result.memory_plan,
        "acceleration": result.acceleration,
        "cached_steps": result.cached_steps,
    }


def combine(resolved, stock: dict | None, k5: dict | None, runs: int, errors: dict) -> dict:
    """One variant's JSON. A path that failed has no figures, only its `<path>_error` (from `errors`)."""
    out = {
        "variant": resolved.variant.name,
        "request": {
            "width": resolved.width,
            "height": resolved.height,
            "frames": resolved.num_frames,
            "steps": resolved.steps,
            "guidance": resolved.guidance,
            "acceleration": resolved.acceleration,
        },
        "stages": {},
        "warmup_s": {},
        "memory": {},
    }
    for path, times in (("stock", stock), ("k5serve", k5)):
        if times is not None:
            out[f"{path}_s"] = times["summary"]["total"]
            out["stages"][path] = times["summary"]
            out["warmup_s"][path] = times["warmup_s"]
            out["memory"][path] = times["memory"]
    if stock is not None and k5 is not None:
        out["speedup"] = round(out["stock_s"] / out["k5serve_s"], 3)
    if k5 is not None:
        out["memory_plan"] = k5["memory_plan"]
        measured = k5["memory"].get("peak_gpu_reserved_mb")
        out["memory_estimate_vs_measured"] = {
            "mode": k5["memory_plan"].get("mode"),
            "estimated_peak_gib": k5["memory_plan"].get("estimated_peak_gib"),
            # reserved, not allocated: what the process takes from the card (the plan's basis)
            "measured_peak_gib": round(measured / 1024, 2) if measured is not None else None,
        }
        out["acceleration_applied"] = k5["acceleration"]
        out["cached_steps"] = k5["cached_steps"]
    return {**out, **errors, "runs": runs}


def _attempt(errors: dict, key: str, device: str, fn, *args):
    """fn(*args), or None with errors[key] = "Type: first line of the message".

    A failing path must not end the benchmark: stock diffusers as documented for Pro (flex
    attention, no compile) runs FlexAttention eagerly, which materialises the full fp32 score
    matrix (32 heads x 47,616^2 tokens, about 290 GB at 768x512x121) and cannot fit. Memory is
    freed after the handler, once the traceback no longer holds the failed run's tensors.
    """
    try:
        return fn(*args)
    except Exception as exc:
        errors[key] = f"{type(exc).__name__}: {next(iter(str(exc).splitlines()), '')}"
    _free(device)
    return None


def _free(device: str) -> None:
    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def time_ablations(engine, resolved, args, k5: dict) -> dict:
    """Each exact speed-up switched off on its own (issue 6), after the normal k5serve timing.

    Every row is the same request through a fresh Engine serving the same pipeline (an
    InMemoryPipelines source holding `engine.pipeline(name)`, already configured), timed like
    k5serve (one warm-up, then `--runs`). What lives on the shared modules is undone for its row
    and put back after it: compile by running the compiled blocks eagerly (`_eager`: simpler than
    ordering a compile-off row before compilation, and later rows and the bare forward still run
    compiled), the attention backend by setting torch SDPA and then the auto pick again.
    """
    from pipelines.engine import Engine
    from pipelines.loader import attention_backend
    from pipelines.sources import InMemoryPipelines

    name = resolved.variant.name
    pipe = engine.pipeline(name)
    nabla = pipe.transformer.config.get("attention_type") == "nabla"
    picked = attention_backend(engine.device, nabla)
    no_cfg = None if resolved.guidance > 1 else "no CFG at guidance <= 1"
    no_batch = no_cfg
    if not no_cfg and k5["memory_plan"].get("cfg_batch") is False:
        no_batch = "the memory plan already runs cond and uncond in separate calls"
    no_compile = None
    if not engine.options.compile:
        no_compile = "compile is off (--no-compile)" if engine.device.startswith("cuda") else "compile is off on cpu"
    no_backend = "nabla needs flex" if nabla else "the auto pick is already native" if picked == "native" else None
    rows = (
        ("cfg_batch", no_batch, {"cfg_batch": False}, contextlib.nullcontext),
        ("negative_cache", no_cfg, {"negative_cache": False}, contextlib.nullcontext),
        ("compile", no_compile, {}, lambda: _eager(pipe.transformer)),
        ("attention_backend", no_backend, {}, lambda: _attention(pipe.transformer, "native", picked)),
    )
    out = {}
    for row, skipped, overrides, switched_off in rows:
        if skipped:
            out[row] = {"skipped": skipped}
            continue
        source = InMemoryPipelines({name: pipe}, configured=True)
        twin = Engine(engine.weights_dir, engine.device, compile=engine.options.compile, source=source, **overrides)
        errors: dict = {}
        with switched_off():
            times = _attempt(errors, "error", engine.device, time_engine, twin, resolved, args)
        if times is None:
            out[row] = errors
            continue
        s = times["summary"]
        out[row] = {
            "k5serve_s": s["total"],
            "per_step": s["per_step"],
            "encode_prompt": s.get("encode_prompt", 0.0),
            "slowdown": round(s["total"] / k5["summary"]["total"], 3),
        }
    return out


@contextlib.contextmanager
def _eager(transformer):
    """The compiled blocks run eagerly inside (as warm-up's fallback), compiled after."""
    from pipelines.loader import drop_compiled

    compiled = drop_compiled(transformer)
    try:
        yield
    finally:
        for module, impl in compiled:
            module._compiled_call_impl = impl


@contextlib.contextmanager
def _attention(transformer, backend: str, restore: str):
    from pipelines.loader import set_attention_backend  # per processor; the process default stays

    set_attention_backend(transformer, backend)
    try:
        yield
    finally:
        set_attention_backend(transformer, restore)


def bench_tiny(name: str, weights: Path, args: argparse.Namespace, image: Path | None) -> dict:
    from diffusers import DiffusionPipeline

    from pipelines.engine import Engine
    from pipelines.loader import dtype_for
    from pipelines.request import GenerationRequest

    compile = False if args.no_compile else None
    engine = Engine(weights, device=args.device, compile=compile, memory_mode=_memory_mode(args))
    req = GenerationRequest(
        variant=name,
        prompt=args.prompt,
        image=str(image) if image else None,
        width=args.width,
        height=args.height,
        num_frames=args.frames,
        steps=args.steps,
        guidance=args.guidance,
        seed=0,
        acceleration=args.acceleration,
    )
    resolved = engine.prepare(req)

    def stock_path():  # the stock pipeline is freed before k5serve runs
        stock = DiffusionPipeline.from_pretrained(weights / name, dtype=dtype_for(engine.device)).to(engine.device)
        stock.set_progress_bar_config(disable=True)
        return time_stock(stock, resolved, args, engine.device, image)

    errors: dict = {}
    stock = None if getattr(args, "skip_stock", False) else _attempt(errors, "stock_error", engine.device, stock_path)
    k5 = _attempt(errors, "k5serve_error", engine.device, time_engine, engine, resolved, args)
    out = combine(resolved, stock, k5, args.runs, errors)
    if args.ablate and k5 is not None:
        out["ablations"] = time_ablations(engine, resolved, args, k5)
    return out


def bench_full(bench_name: str, args: argparse.Namespace) -> dict:
    """Full-size random-weight run on CUDA: stock first, then the same modules served by k5serve."""
    from pipelines.engine import Engine
    from pipelines.request import GenerationRequest, resolve
    from pipelines.sources import InMemoryPipelines
    from pipelines.variants import VARIANTS

    t0 = time.perf_counter()
    name, pipe = build_full_pipeline(bench_name, args.device)
    build_s = time.perf_counter() - t0
    variant = VARIANTS[name]
    dit_config = FULL_VARIANTS[bench_name][1]
    req = GenerationRequest(
        variant=name,
        prompt=args.prompt,
        width=768,
        height=512,
        num_frames=args.frames_full,
        steps=args.steps_full,
        seed=0,
        acceleration=args.acceleration,
    )
    resolved = resolve(req)
    errors: dict = {}
    stock = None
    if not args.skip_stock:
        with _as_documented(pipe.transformer, nabla=variant.attention == "nabla"):
            stock = _attempt(errors, "stock_error", args.device, time_stock, pipe, resolved, args, args.device, None)
    extra = {"build_s": round(build_s, 1)}
    # The engine configures the stock run's modules when it loads them (warm-up): attention
    # backend, compile, placement, as it would a checkpoint from disk. No weights folder is read.
    source = InMemoryPipelines({name: pipe})
    with tempfile.TemporaryDirectory() as empty:
        compile = False if args.no_compile else None
        mode = _memory_mode(args)
        engine = Engine(Path(empty), args.device, [name], compile=compile, source=source, memory_mode=mode)
    del source  # the engine holds it; `del pipe, engine` below frees the modules

    def k5serve_path(engine):  # an argument, not closed over: it is deleted below
        t1 = time.perf_counter()
        engine.warmup()  # loads (configures) the pipeline and, with compile on, builds the compiled blocks
        extra["compile_warmup_s"] = round(time.perf_counter() - t1, 1)
        return time_engine(engine, engine.prepare(req), args)

    k5 = _attempt(errors, "k5serve_error", args.device, k5serve_path, engine)
    out = {**combine(resolved, stock, k5, args.runs, errors), **extra}
    if k5 is not None:
        if args.ablate:
            out["ablations"] = time_ablations(engine, resolved, args, k5)
        out["attention_backend"] = _backend_of(pipe.transformer)
        out["transformer_forward"] = time_transformer_forward(pipe, dit_config, args.device, args.frames_full)
    del pipe, engine
    _free(args.device)
    return out


@contextlib.contextmanager
def _as_documented(transformer, nabla: bool):
    """Stock diffusers as its docs use it, for this run only: `set_attention_backend("flex")` for a
    nabla config (which diffusers also makes the process default: put back after) and torch's own
    flex_attention, not the fused one an earlier variant's k5serve set-up may have installed."""
    from diffusers.models import attention_dispatch

    from pipelines.loader import stock_flex_attention

    default = attention_dispatch._AttentionBackendRegistry.get_active_backend()[0]
    with stock_flex_attention():
        if nabla:
            transformer.set_attention_backend("flex")  # stock needs it for nabla (diffusers docs)
        try:
            yield
        finally:
            attention_dispatch._AttentionBackendRegistry.set_active_backend(default)


def _backend_of(transformer) -> str:
    for block in transformer.visual_transformer_blocks[:1]:
        backend = block.self_attention.processor._attention_backend
        return str(getattr(backend, "value", backend) or "native")
    return "native"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON results file")
    parser.add_argument("--full", action="store_true", help="full-size random-weight models (CUDA only)")
    parser.add_argument("--variants", default=None, help="tiny: variant names; --full: " + ",".join(FULL_VARIANTS))
    parser.add_argument("--weights-dir", type=Path, default=None, help="tiny: default a temp dir with tiny builds")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--runs", type=int, default=None, help="counted runs after one warm-up (tiny 3, --full 1)")
    parser.add_argument("--width", type=int, default=128, help="tiny only (--full is 768x512)")
    parser.add_argument("--height", type=int, default=128, help="tiny only")
    parser.add_argument("--frames", type=int, default=17, help="tiny only (--full is 121)")
    parser.add_argument("--steps", type=int, default=8, help="tiny only")
    parser.add_argument("--steps-full", type=int, default=None, help="--full: default each variant's own")
    parser.add_argument("--frames-full", type=int, default=121, help="--full: frames at 768x512 (4k+1)")
    parser.add_argument("--guidance", type=float, default=5.0, help="tiny only (--full: the variant's own)")
    parser.add_argument("--acceleration", default="none", choices=["none", "regular"])
    parser.add_argument("--no-compile", action="store_true", help="k5serve without torch.compile")
    parser.add_argument(
        "--memory-mode",
        default="auto",
        choices=["auto", "gpu", "offload_text", "stream_text", "offload_model", "stream"],
        help="k5serve's memory mode (docs/memory.md)",
    )
    parser.add_argument("--skip-stock", action="store_true", help="time only k5serve")
    parser.add_argument("--ablate", action="store_true", help="also time k5serve with each exact speed-up off")
    parser.add_argument("--prompt", default="a red fox running through snow")
    args = parser.parse_args(argv)

    import torch

    if args.runs is None:
        args.runs = 1 if args.full else 3
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.full and not (args.device.startswith("cuda") and torch.cuda.is_available()):
        print("bench/generate.py: --full needs a CUDA GPU (none here); run without --full for the tiny CPU variants")
        return 2

    import diffusers
    import transformers

    results: list[dict] = []
    report = {
        "benchmark": "generate",
        "mode": "full" if args.full else "tiny",
        "command": " ".join(["python", "bench/generate.py", *(argv if argv is not None else sys.argv[1:])]),
        "device": args.device,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "cpu": platform.processor() or platform.machine(),
        "versions": {
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "results": results,
    }

    def record(result: dict) -> None:
        """Rewrite the whole report after every variant: a run killed part-way keeps what finished."""
        results.append(result)
        print(json.dumps(result), file=sys.stderr)
        partial = args.out.with_name(args.out.name + ".partial")
        partial.write_text(json.dumps(report, indent=2) + "\n")
        partial.replace(args.out)  # never a half-written file, even if killed while writing

    if args.full:
        names = _names(args.variants, ",".join(FULL_VARIANTS))
        unknown = [n for n in names if n not in FULL_VARIANTS]
        if unknown:  # before anything is built, not after the first variant's minutes
            parser.error(f"unknown --full variant {unknown[0]!r}; known: {', '.join(FULL_VARIANTS)}")
        for name in names:
            record(bench_full(name, args))
    else:
        import numpy as np
        from PIL import Image

        from pipelines.tiny import ensure_tiny

        with tempfile.TemporaryDirectory() as tmp:
            weights = args.weights_dir or Path(tmp) / "weights"
            image = Path(tmp) / "image.png"
            pixels = np.random.default_rng(0).integers(0, 256, (args.height, args.width, 3), np.uint8)
            Image.fromarray(pixels).save(image)
            for name in _names(args.variants, "kandinsky5-tiny-t2v,kandinsky5-tiny-i2v"):
                if name.startswith("kandinsky5-tiny-"):
                    ensure_tiny(weights, name)
                record(bench_tiny(name, weights, args, image if "i2v" in name else None))
    print(args.out)
    return 0


def _memory_mode(args: argparse.Namespace) -> str:
    return getattr(args, "memory_mode", "auto")  # callers that build their own Namespace predate it


def _names(given: str | None, default: str) -> list[str]:
    return [v.strip() for v in (given or default).split(",") if v.strip()]


if __name__ == "__main__":
    sys.exit(main())
