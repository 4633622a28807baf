"""bench/generate.py: the full-size builds (on the meta device) and a tiny run's JSON."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from pipelines import memory

_spec = importlib.util.spec_from_file_location("bench_generate", Path(__file__).parents[1] / "bench" / "generate.py")
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
