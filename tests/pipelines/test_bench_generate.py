"""bench/generate.py: the full-size builds (on the meta device) and a tiny run's JSON."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from pipelines import memory

_spec = importlib.util.spec_from_file_location("bench_generate", Path(__file__).parents[2] / "bench" / "generate.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_full_size_models_build_on_meta_with_the_published_parameter_counts():
    counts = bench.meta_parameter_counts()
    # kandinsky_model.md §3: Lite 2.008 B, Pro 19.311 B, Qwen2.5-VL-7B 8.29 B (0.68 B vision),
    # CLIP ViT-L text 123 M, HunyuanVideo VAE 246.5 M.
    assert round(counts["lite_transformer"] / 1e9, 3) == 2.008
    assert round(counts["pro_transformer"] / 1e9, 3) == 19.311
    assert round(counts["text_encoder"] / 1e9, 2) == 8.29
    assert round(counts["text_encoder_2"] / 1e6) == 123
    assert round(counts["vae"] / 1e6, 1) == 246.5
    # the memory estimate uses exactly these numbers
    assert counts["lite_transformer"] == memory.DITS["lite"].params
    assert counts["pro_transformer"] == memory.DITS["pro"].params
    assert counts["text_encoder"] == memory.QWEN_PARAMS
    assert counts["text_encoder_2"] == memory.CLIP_PARAMS
    assert counts["vae"] == memory.VAE_PARAMS


def test_meta_build_allocates_nothing_and_fp32_share_matches_the_estimate():
    with torch.device("meta"):
        pro = bench.build_component("transformer", bench.PRO_DIT)
        qwen = bench.build_component("text_encoder")
    assert all(p.device.type == "meta" for p in [*pro.parameters(), *qwen.parameters()])
    keep = pro._keep_in_fp32_modules
    fp32 = sum(p.numel() for n, p in pro.named_parameters() if any(k in n.split(".") for k in keep))
    assert fp32 == memory.DITS["pro"].fp32_params
    assert pro.config.model_dim == memory.DITS["pro"].model_dim and pro.config.ff_dim == memory.DITS["pro"].ff_dim
    assert sum(p.numel() for n, p in qwen.named_parameters() if ".visual." in f".{n}") == 676_550_144


def test_forward_flops_match_the_reference_figures():
    tokens = 31 * 32 * 48  # 5 s, 768x512
    assert bench.forward_tflops(bench.LITE_DIT, tokens, 256) == pytest.approx(660.0, rel=1e-3)
    assert bench.forward_tflops(bench.PRO_DIT, tokens, 256) == pytest.approx(3584.4, rel=1e-3)


def test_full_refuses_cleanly_without_cuda(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "full.json"
    assert bench.main(["--full", "--out", str(out)]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().out
    assert not out.exists()


def test_tiny_run_writes_the_documented_json(tmp_path):
    out = tmp_path / "bench.json"
    args = ["--out", str(out), "--runs", "1", "--steps", "2", "--width", "64", "--height", "64", "--frames", "17"]
    assert bench.main([*args, "--weights-dir", str(tmp_path / "w"), "--device", "cpu"]) == 0
    report = json.loads(out.read_text())
    assert report["mode"] == "tiny" and report["device"] == "cpu"
    assert {"torch", "diffusers", "transformers"} <= set(report["versions"])
    names = [r["variant"] for r in report["results"]]
    assert names == ["kandinsky5-tiny-t2v", "kandinsky5-tiny-i2v"]
    for r in report["results"]:
        assert r["stock_s"] > 0 and r["k5serve_s"] > 0
        assert r["speedup"] == pytest.approx(r["stock_s"] / r["k5serve_s"], rel=1e-2)
        for path in ("stock", "k5serve"):
            stages = r["stages"][path]
            assert {"encode_prompt", "denoise", "per_step", "decode", "write", "total"} <= set(stages)
            assert len(stages["step_times"]) == 2 and all(t > 0 for t in stages["step_times"])
            assert r["memory"][path]["peak_rss_mb"] > 0
        assert r["memory_plan"]["cfg_batch"] is True  # CPU: no limit, the fastest plan
        assert r["request"] == {
            "width": 64,
            "height": 64,
            "frames": 17,
            "steps": 2,
            "guidance": 5.0,
            "acceleration": "none",
        }


def test_full_path_runs_end_to_end_on_cpu_at_toy_width(monkeypatch):
    """The --full code path (build on the device with random init, stock run, k5serve adopting the
    same modules, the bare forward timing) runs here with every model narrowed to toy widths and 5
    frames: the GPU-only part is the device, not untested code. The real widths are checked by the
    meta-device test above."""
    import argparse

    toy_dit = dict(
        bench.LITE_DIT, in_text_dim=32, in_text_dim2=32, time_dim=32, model_dim=48, ff_dim=96,
        num_text_blocks=1, num_visual_blocks=2, axes_dims=(8, 8, 8),
    )  # fmt: skip
    monkeypatch.setitem(bench.FULL_VARIANTS, "lite-sft", ("kandinsky5-lite-t2v-sft-5s", toy_dit))
    monkeypatch.setattr(
        bench, "QWEN_TEXT", dict(bench.QWEN_TEXT, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=2,
                                 rope_parameters=dict(bench.QWEN_TEXT["rope_parameters"], mrope_section=[2, 2, 4])),
    )  # fmt: skip
    monkeypatch.setattr(
        bench, "QWEN_VISION", dict(bench.QWEN_VISION, depth=1, hidden_size=16, intermediate_size=32, num_heads=2,
                                   out_hidden_size=32, fullatt_block_indexes=[0]),
    )  # fmt: skip
    monkeypatch.setattr(
        bench, "CLIP_TEXT", dict(bench.CLIP_TEXT, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                 num_attention_heads=4, projection_dim=32),
    )  # fmt: skip
    monkeypatch.setattr(bench, "HUNYUAN_VAE", dict(bench.HUNYUAN_VAE, block_out_channels=(8, 8, 8, 8),
                                                   layers_per_block=1, norm_num_groups=4))  # fmt: skip
    args = argparse.Namespace(
        device="cpu", prompt="a fox", steps_full=2, frames_full=5, runs=1, acceleration="none",
        no_compile=True, skip_stock=False, ablate=True,
    )  # fmt: skip
    out = bench.bench_full("lite-sft", args)

    assert out["variant"] == "kandinsky5-lite-t2v-sft-5s"
    assert out["stock_s"] > 0 and out["k5serve_s"] > 0 and out["speedup"] > 0
    for path in ("stock", "k5serve"):
        assert len(out["stages"][path]["step_times"]) == 2
    forward = out["transformer_forward"]
    assert forward["seconds"] > 0 and set(forward) >= {"tflop", "tflops", "fraction_of_h100_bf16_dense_peak"}
    assert out["attention_backend"] == "native"
    ablations = out["ablations"]  # on the shared modules, after k5serve and before the bare forward
    for row in ("cfg_batch", "negative_cache"):
        assert ablations[row]["k5serve_s"] > 0 and ablations[row]["slowdown"] > 0
    assert ablations["compile"] == {"skipped": "compile is off on cpu"}


def test_negative_cache_off_encodes_the_negative_prompt_every_time_with_the_same_frames(tiny_weights_dir):
    """Engine(negative_cache=False) is what --ablate's negative_cache row times: the default negative
    prompt encoded on every generation instead of once, and the frames exactly the same."""
    import numpy as np

    from pipelines.engine import Engine
    from pipelines.request import GenerationRequest
    from pipelines.variants import DEFAULT_NEGATIVE_PROMPT

    req = GenerationRequest(
        variant="kandinsky5-tiny-t2v", prompt="a fox", width=64, height=64, num_frames=5, steps=2, guidance=5.0, seed=1
    )
    frames, encodes = {}, {}
    for cache in (False, True):
        engine = Engine(tiny_weights_dir, device="cpu", negative_cache=cache)
        pipe = engine.pipeline(req.variant)
        encode, negatives = pipe.encode_prompt, []

        def counting(*args, encode=encode, negatives=negatives, **kwargs):
            if kwargs.get("prompt", args[0] if args else None) == [DEFAULT_NEGATIVE_PROMPT]:
                negatives.append(1)
            return encode(*args, **kwargs)

        pipe.encode_prompt = counting
        frames[cache] = [engine.generate_frames(req).frames for _ in range(2)]
        encodes[cache] = len(negatives)
    assert encodes == {False: 2, True: 1}
    first = frames[False][0]
    assert all(np.array_equal(first, f) for f in [*frames[False], *frames[True]])


def _tiny_args(tmp_path, weights, *extra) -> list[str]:
    sizes = ["--runs", "1", "--steps", "2", "--width", "64", "--height", "64", "--frames", "17"]
    return ["--out", str(tmp_path / "bench.json"), *sizes, "--weights-dir", str(weights), "--device", "cpu", *extra]


def test_ablate_times_each_exact_speed_up_switched_off_on_its_own(tmp_path, tiny_weights_dir):
    args = _tiny_args(tmp_path, tiny_weights_dir, "--ablate", "--variants", "kandinsky5-tiny-t2v")
    assert bench.main(args) == 0
    (result,) = json.loads((tmp_path / "bench.json").read_text())["results"]
    ablations = result["ablations"]
    assert list(ablations) == ["cfg_batch", "negative_cache", "compile", "attention_backend"]
    for row in ("cfg_batch", "negative_cache"):
        assert set(ablations[row]) == {"k5serve_s", "per_step", "encode_prompt", "slowdown"}
        assert ablations[row]["k5serve_s"] > 0 and ablations[row]["per_step"] > 0
        assert ablations[row]["encode_prompt"] > 0
        assert ablations[row]["slowdown"] == pytest.approx(ablations[row]["k5serve_s"] / result["k5serve_s"], rel=1e-2)
    assert ablations["compile"] == {"skipped": "compile is off on cpu"}
    assert ablations["attention_backend"] == {"skipped": "the auto pick is already native"}


def test_a_failing_path_is_reported_and_the_report_is_rewritten_after_every_variant(
    tmp_path, tiny_weights_dir, monkeypatch
):
    """Stock out of memory on the first variant (as stock Pro's eager FlexAttention is at full size),
    k5serve failing on the second: both are recorded, the other path still timed, exit 0, and the
    report on disk already held the first variant when the second one ran."""
    time_stock, time_engine, on_disk = bench.time_stock, bench.time_engine, []

    def stock_oom(stock, resolved, *args):
        if resolved.variant.name == "kandinsky5-tiny-t2v":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 290.00 GiB\nmore detail")
        return time_stock(stock, resolved, *args)

    def k5serve_fails(engine, resolved, args):
        if resolved.variant.name == "kandinsky5-tiny-i2v":
            on_disk.append(json.loads(args.out.read_text()))
            raise RuntimeError("boom")
        return time_engine(engine, resolved, args)

    monkeypatch.setattr(bench, "time_stock", stock_oom)
    monkeypatch.setattr(bench, "time_engine", k5serve_fails)
    assert bench.main(_tiny_args(tmp_path, tiny_weights_dir)) == 0
    t2v, i2v = json.loads((tmp_path / "bench.json").read_text())["results"]

    assert t2v["stock_error"] == "OutOfMemoryError: CUDA out of memory. Tried to allocate 290.00 GiB"
    assert "stock_s" not in t2v and "speedup" not in t2v and "stock" not in t2v["stages"]
    assert t2v["k5serve_s"] > 0 and len(t2v["stages"]["k5serve"]["step_times"]) == 2
    assert i2v["k5serve_error"] == "RuntimeError: boom"
    assert "k5serve_s" not in i2v and "speedup" not in i2v and "memory_plan" not in i2v
    assert i2v["stock_s"] > 0
    (snapshot,) = on_disk
    assert snapshot["results"] == [t2v]


def test_eager_runs_compiled_blocks_eagerly_and_compiled_again_after():
    """--ablate's compile row on the shared modules (CUDA only, so checked here without compiling:
    torch.compile is lazy until the first call)."""
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    model[0].compile()
    impl = model[0]._compiled_call_impl
    assert impl is not None
    with bench._eager(model):
        assert model[0]._compiled_call_impl is None
        assert torch.equal(model(torch.ones(1, 2)), model[1](model[0].forward(torch.ones(1, 2))))
    assert model[0]._compiled_call_impl is impl and model[1]._compiled_call_impl is None


def test_ablate_attention_row_times_torch_sdpa_and_puts_the_auto_pick_back(tmp_path, tiny_weights_dir, monkeypatch):
    """On CUDA the auto pick is FlashAttention; here a stand-in pick (SDPA's math kernel) makes the
    attention_backend row run: "native" for that row only, the pick before and after it."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    import pipelines.loader

    monkeypatch.setattr(pipelines.loader, "attention_backend", lambda device, nabla: "_native_math")
    default = _AttentionBackendRegistry.get_active_backend()[0]
    # should the bench leak diffusers' process-wide default, later tests still get it back
    monkeypatch.setattr(_AttentionBackendRegistry, "_active_backend", default)
    time_engine, seen = bench.time_engine, []

    def recording(engine, resolved, args):
        pipe = engine.pipeline(resolved.variant.name)
        seen.append((pipe, bench._backend_of(pipe.transformer)))
        return time_engine(engine, resolved, args)

    monkeypatch.setattr(bench, "time_engine", recording)
    args = _tiny_args(tmp_path, tiny_weights_dir, "--ablate", "--variants", "kandinsky5-tiny-t2v")
    assert bench.main(args) == 0
    (result,) = json.loads((tmp_path / "bench.json").read_text())["results"]
    assert result["ablations"]["attention_backend"]["k5serve_s"] > 0
    assert [backend for _, backend in seen] == ["_native_math", "_native_math", "_native_math", "native"]
    assert bench._backend_of(seen[-1][0].transformer) == "_native_math"
    assert _AttentionBackendRegistry.get_active_backend()[0] == default  # set per processor only


def test_stock_nabla_runs_as_documented_and_leaves_the_process_as_it_was(tiny_nabla_dir, monkeypatch):
    """--full times stock Pro with diffusers' own (eager) flex_attention and its process-wide flex
    default, even after k5serve installed the fused one; both are put back after the stock run."""
    from diffusers import Kandinsky5Transformer3DModel
    from diffusers.models import attention_dispatch

    from pipelines.loader import use_fused_flex_attention

    registry = attention_dispatch._AttentionBackendRegistry
    monkeypatch.setattr(attention_dispatch, "flex_attention", attention_dispatch.flex_attention)  # restored after
    torch_flex = attention_dispatch.flex_attention
    use_fused_flex_attention()
    fused = attention_dispatch.flex_attention
    assert fused is not torch_flex and fused._k5_original is torch_flex
    default = registry.get_active_backend()[0]
    transformer = Kandinsky5Transformer3DModel.from_pretrained(tiny_nabla_dir, subfolder="transformer")
    with bench._as_documented(transformer, nabla=True):
        assert attention_dispatch.flex_attention is torch_flex
        assert registry.get_active_backend()[0].value == "flex"
    assert attention_dispatch.flex_attention is fused
    assert registry.get_active_backend()[0] == default
