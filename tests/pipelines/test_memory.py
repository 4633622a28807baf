"""Memory-fit estimates (pipelines/memory.py) and the Engine refusing at prepare() what cannot fit.

The device memory is injected (Engine(device_memory=...)); the estimate itself is the real code.
"""

from __future__ import annotations

import re

import pytest

from pipelines import memory
from pipelines.engine import Engine
from pipelines.errors import InvalidRequest
from pipelines.request import GenerationRequest
from pipelines.tiny import ensure_tiny
from pipelines.variants import VARIANTS

GiB = memory.GiB
LITE = VARIANTS["kandinsky5-lite-t2v-sft-5s"]
LITE10 = VARIANTS["kandinsky5-lite-t2v-sft-10s"]
PRO = VARIANTS["kandinsky5-pro-t2v-sft-5s"]


def test_weights_follow_parameter_counts_in_bf16():
    w = memory.weight_bytes(PRO)
    # 19.31 B params in bf16 plus the 2.38 B diffusers keeps in fp32: the published 43.39 GB
    assert w["transformer"] == 2 * 19_311_325_248 + 2 * 2_381_539_328
    assert round(w["transformer"] / 1e9, 2) == 43.39
    assert round(memory.weight_bytes(LITE)["transformer"] / 1e9, 2) == 4.57
    assert round(w["text"] / 1e9, 1) == 16.8  # Qwen2.5-VL-7B + CLIP ViT-L


def test_tokens_of_a_5s_sd_clip():
    assert memory.tokens(768, 512, 121) == 47_616  # kandinsky_model.md §6


def test_peak_grows_with_frames_size_and_cfg_batch():
    a = memory.estimate(LITE, 768, 512, 61, "gpu", cfg_batch=False, vae_tiling=False)
    b = memory.estimate(LITE, 768, 512, 121, "gpu", cfg_batch=False, vae_tiling=False)
    c = memory.estimate(LITE, 768, 512, 121, "gpu", cfg_batch=True, vae_tiling=False)
    assert a.denoise < b.denoise < c.denoise
    assert c.denoise - b.denoise == pytest.approx(
        b.denoise - b.weights["transformer"] - b.weights["text"] - b.weights["vae"]
    )
    tiled = memory.estimate(LITE, 768, 512, 121, "gpu", cfg_batch=False, vae_tiling=True)
    assert tiled.decode < b.decode


def test_offload_modes_lower_the_peak():
    frugal = ("gpu", "offload_text", "offload_model", "stream")  # stream_text: only the text phase is lower
    peaks = [memory.estimate(PRO, 768, 512, 121, m, False, True).peak for m in frugal]
    assert peaks == sorted(peaks, reverse=True)
    text = [memory.estimate(LITE, 768, 512, 121, m, False, True).text for m in ("offload_text", "stream_text")]
    assert text[1] < text[0]


@pytest.mark.parametrize(
    ("variant", "capacity_gib", "mode"),
    [
        (LITE, 80, "gpu"),
        (LITE, 24, "gpu"),  # with VAE tiling and sequential CFG: the published "Lite on 24 GB"
        (PRO, 80, "gpu"),
        (PRO, 48, "stream_text"),  # the text encoder streamed, the DiT resident (issue 14)
        (PRO, 24, "stream"),  # the visual blocks streamed too (issue 14)
        (LITE, 12, "stream_text"),  # official: Lite on 12 GB (with NF4 Qwen; here exact)
    ],
)
def test_plan_picks_the_fastest_mode_that_fits(variant, capacity_gib, mode):
    fp = memory.plan(variant, 768, 512, 121, capacity_gib * GiB)
    assert fp is not None and fp.mode == mode
    assert fp.peak <= capacity_gib * GiB - memory.CONTEXT_RESERVE


def test_plan_prefers_cfg_batch_and_no_tiling_when_there_is_room():
    roomy = memory.plan(LITE, 768, 512, 121, 80 * GiB)
    tight = memory.plan(LITE, 768, 512, 121, 24 * GiB)
    assert roomy.cfg_batch and not roomy.vae_tiling
    assert not tight.cfg_batch and tight.vae_tiling


def test_pro_fits_24_gib_only_streaming_and_cpu_has_no_limit():
    assert memory.plan(PRO, 768, 512, 121, 24 * GiB).mode == "stream"
    for mode in ("gpu", "offload_text", "stream_text", "offload_model"):
        assert memory.plan(PRO, 768, 512, 121, 24 * GiB, mode) is None
    assert memory.plan(PRO, 1280, 768, 121, None).mode == "gpu"


# ---- Engine.prepare refuses at submit -----------------------------------------------------------


@pytest.fixture(scope="module")
def real_layout(tmp_path_factory):
    """Complete-looking folders for real variants (tiny files): prepare() only checks the layout."""
    weights = tmp_path_factory.mktemp("w")
    tiny = ensure_tiny(weights, "kandinsky5-tiny-t2v")
    for name in (LITE.name, LITE10.name, PRO.name):
        folder = weights / name
        folder.mkdir()
        for sub in ("transformer", "vae", "tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "scheduler"):
            (folder / sub).symlink_to(tiny / sub)
        (folder / "model_index.json").write_text((tiny / "model_index.json").read_text())
    return weights


def req(variant, **kw) -> GenerationRequest:
    return GenerationRequest(variant=variant.name, prompt="a fox", **kw)


def test_pro_on_a_6_gib_gpu_is_refused_naming_size_frames_and_memory(real_layout):
    engine = Engine(real_layout, device="cpu", device_memory=6 * GiB)
    with pytest.raises(InvalidRequest) as info:
        engine.prepare(req(PRO))
    message = str(info.value)
    assert info.value.field == "width"  # not even one frame fits: the size/model is the problem
    assert re.search(r"768x512, 121 frames needs about \d+ GiB on this 6 GiB GPU even streaming", message)
    assert "smaller" in message
    assert engine.loaded() == []  # refused before any model work


def test_too_many_frames_is_refused_with_the_largest_count_that_fits(real_layout):
    engine = Engine(real_layout, device="cpu", device_memory=12 * GiB)
    hd = dict(width=1280, height=768)
    with pytest.raises(InvalidRequest) as info:
        engine.prepare(req(PRO, **hd))  # 121 frames of HD: the activations do not fit, even streaming
    assert info.value.field == "num_frames"
    assert "1280x768, 121 frames needs about" in str(info.value)
    best = int(re.search(r"use at most (\d+) frames", str(info.value)).group(1))
    assert 1 <= best < 121 and (best - 1) % 4 == 0
    engine.prepare(req(PRO, num_frames=best, **hd))  # the advice is right: this fits
    with pytest.raises(InvalidRequest):
        engine.prepare(req(PRO, num_frames=best + 4, **hd))


def test_the_same_requests_fit_a_bigger_gpu_and_cpu(real_layout):
    for capacity in (80 * GiB, None):
        engine = Engine(real_layout, device="cpu", device_memory=capacity)
        assert engine.prepare(req(PRO)).num_frames == 121
        assert engine.prepare(req(LITE10)).num_frames == 241


def test_placement_is_decided_from_device_memory(real_layout):
    assert Engine(real_layout, device="cpu", device_memory=80 * GiB).placement(PRO.name) == "gpu"
    # 48 GiB: HD (Pro's largest size) fits only streaming the blocks, so that is Pro's mode
    assert Engine(real_layout, device="cpu", device_memory=48 * GiB).placement(PRO.name) == "stream"
    fixed = Engine(real_layout, device="cpu", device_memory=80 * GiB, memory_mode="offload_text")
    assert fixed.placement(PRO.name) == "offload_text"
    assert Engine(real_layout, device="cpu").placement(PRO.name) == "gpu"  # CPU: no limit


def test_a_fixed_mode_that_cannot_fit_names_it(real_layout):
    engine = Engine(real_layout, device="cpu", device_memory=48 * GiB, memory_mode="gpu")
    with pytest.raises(InvalidRequest, match="with every model on the GPU"):
        engine.prepare(req(PRO))


def test_unknown_memory_mode_is_refused(real_layout):
    with pytest.raises(ValueError, match="memory mode"):
        Engine(real_layout, device="cpu", memory_mode="everything")
