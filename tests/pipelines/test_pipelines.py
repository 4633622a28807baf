"""The engine on real (tiny, random-weight) Kandinsky 5 pipelines loaded from disk, on CPU."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch

from pipelines.engine import Engine
from pipelines.errors import Cancelled, InvalidRequest
from pipelines.request import CancelToken, GenerationRequest
from pipelines.video import read_mp4
from pipelines.warmup import warm_compiled

T2V = "kandinsky5-tiny-t2v"
I2V = "kandinsky5-tiny-i2v"
SMALL = dict(width=64, height=64, num_frames=9, steps=3, seed=7)


def t2v(**kw) -> GenerationRequest:
    return GenerationRequest(**{"variant": T2V, "prompt": "a red fox running through snow", **SMALL, **kw})


def i2v(image, **kw) -> GenerationRequest:
    args = {"variant": I2V, "prompt": "a red fox", "image": str(image), **SMALL, "num_frames": 17, **kw}
    return GenerationRequest(**args)


# ---- output files ------------------------------------------------------------------------


def test_t2v_mp4_has_requested_frames_size_and_fps(engine, tmp_path):
    out = tmp_path / "t2v.mp4"
    result = engine.generate(t2v(width=96, height=64, num_frames=13), out)
    frames, meta = read_mp4(out)
    assert frames.shape == (13, 64, 96, 3)
    assert meta["fps"] == 24
    assert (result.width, result.height, result.num_frames, result.fps) == (96, 64, 13, 24)
    assert result.file_size == out.stat().st_size > 0
    assert not list(tmp_path.glob("*.part"))  # the temp file was renamed, not left behind


def test_i2v_mp4_has_requested_frames_size_and_fps(engine, tmp_path, test_image):
    out = tmp_path / "i2v.mp4"
    engine.generate(i2v(test_image, width=64, height=96), out)
    frames, meta = read_mp4(out)
    assert frames.shape == (17, 96, 64, 3)
    assert meta["fps"] == 24


def test_mp4_is_h264_yuv420p_faststart(engine, tmp_path):
    import subprocess

    import imageio_ffmpeg

    out = tmp_path / "v.mp4"
    engine.generate(t2v(), out)
    probe = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-i", str(out)], capture_output=True, text=True)
    assert "h264" in probe.stderr and "yuv420p" in probe.stderr
    data = out.read_bytes()
    assert data.index(b"moov") < data.index(b"mdat")  # faststart: the index precedes the media


# ---- determinism and sensitivity ------------------------------------------------------------


def frames(engine, req):
    return engine.generate_frames(req).frames


def test_same_seed_same_frames(engine):
    assert np.array_equal(frames(engine, t2v()), frames(engine, t2v()))


@pytest.mark.parametrize(
    "change",
    [
        {"prompt": "a blue whale in the deep ocean"},
        {"negative_prompt": "bright colours, sunshine"},
        {"guidance": 1.0},
        {"seed": 8},
    ],
    ids=["prompt", "negative_prompt", "guidance", "seed"],
)
def test_inputs_change_the_frames(engine, change):
    base, other = frames(engine, t2v()), frames(engine, t2v(**change))
    assert np.abs(base - other).max() > 1e-3


def test_i2v_image_changes_the_frames(engine, tmp_path, test_image):
    from PIL import Image

    other = tmp_path / "other.png"
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(other)
    a, b = frames(engine, i2v(test_image)), frames(engine, i2v(other))
    assert np.isfinite(a).all()
    assert np.abs(a - b).max() > 1e-3


# ---- no drift against plain diffusers -------------------------------------------------------
# k5serve evaluates cond and uncond in one batched transformer call (pipelines/denoise.py). With
# prompts of different token counts the shorter text is zero-padded and masked in the
# cross-attention; the masked softmax sums over more (zero) terms, so the last bits of fp32 differ
# (measured ~2e-5 on frames in [0, 1]; bf16 noise is ~3e-2). The sequential path (cfg_batch=False)
# is bit-identical to plain diffusers; tests/pipelines/test_cfg_batch.py covers both in detail.
BATCHED_ATOL = 1e-4


@pytest.fixture(scope="module")
def sequential_engine(tiny_weights_dir):
    return Engine(tiny_weights_dir, device="cpu", cfg_batch=False)


def test_t2v_equals_plain_diffusers(engine, sequential_engine, tiny_weights_dir):
    from diffusers import Kandinsky5T2VPipeline

    pipe = Kandinsky5T2VPipeline.from_pretrained(tiny_weights_dir / T2V, dtype=torch.float32)
    req = t2v(negative_prompt="blurry")
    expected = pipe(
        prompt=req.prompt,
        negative_prompt="blurry",
        height=64,
        width=64,
        num_frames=9,
        num_inference_steps=3,
        guidance_scale=5.0,
        generator=torch.Generator("cpu").manual_seed(7),
        output_type="np",
        max_sequence_length=256,
    ).frames[0]
    assert np.array_equal(frames(sequential_engine, req), expected)
    np.testing.assert_allclose(frames(engine, req), expected, rtol=0, atol=BATCHED_ATOL)


def test_i2v_equals_plain_diffusers(engine, sequential_engine, tiny_weights_dir, test_image):
    from diffusers import Kandinsky5I2VPipeline
    from PIL import Image

    pipe = Kandinsky5I2VPipeline.from_pretrained(tiny_weights_dir / I2V, dtype=torch.float32)
    expected = pipe(
        image=Image.open(test_image).convert("RGB"),
        prompt="a red fox",
        height=64,
        width=64,
        num_frames=17,
        num_inference_steps=3,
        guidance_scale=5.0,
        generator=torch.Generator("cpu").manual_seed(7),
        output_type="np",
        max_sequence_length=256,
    ).frames[0]
    assert np.array_equal(frames(sequential_engine, i2v(test_image)), expected)
    np.testing.assert_allclose(frames(engine, i2v(test_image)), expected, rtol=0, atol=BATCHED_ATOL)


# ---- progress and cancellation --------------------------------------------------------------


def test_progress_reports_every_step(engine, tmp_path):
    seen = []
    engine.generate(t2v(steps=4), tmp_path / "p.mp4", on_step=lambda i, n: seen.append((i, n)))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]


@pytest.mark.parametrize("k", [1, 3])
def test_cancel_after_step_k_stops_at_once_without_decode_or_file(engine, tmp_path, k):
    pipe = engine.pipeline(T2V)
    calls = {"transformer": 0, "decode": 0}
    hook = pipe.transformer.register_forward_hook(lambda *_: calls.__setitem__("transformer", calls["transformer"] + 1))
    decode = pipe.vae.decode

    def counting_decode(*a, **kw):
        calls["decode"] += 1
        return decode(*a, **kw)

    pipe.vae.decode = counting_decode
    token, seen = CancelToken(), []

    def on_step(i, n):
        seen.append(i)
        if i == k:
            token.cancel()

    out = tmp_path / "cancelled.mp4"
    try:
        with pytest.raises(Cancelled):
            engine.generate(t2v(steps=6), out, on_step=on_step, cancel=token)
    finally:
        hook.remove()
        del pipe.vae.decode
    assert seen == list(range(1, k + 1))
    assert calls == {"transformer": 2 * k, "decode": 0}  # cond + uncond per step, nothing after
    assert not out.exists() and not list(tmp_path.iterdir())


def test_cancel_before_start_does_nothing(engine, tmp_path):
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        engine.generate(t2v(), tmp_path / "x.mp4", cancel=token)
    assert not list(tmp_path.iterdir())


# ---- validation, before any model work ------------------------------------------------------

BAD = [
    (dict(width=72), "width", "72"),
    (dict(height=100), "height", "100"),
    (dict(num_frames=10), "num_frames", "10"),
    (dict(num_frames=0), "num_frames", "0"),
    (dict(steps=0), "steps", "0"),
    (dict(steps=101), "steps", "101"),
    (dict(prompt=""), "prompt", "non-empty"),
    (dict(prompt="   "), "prompt", "non-empty"),
    (dict(variant="kandinsky5-huge"), "model", "kandinsky5-huge"),
    (dict(width=512, height=512), "resolution", "512x512"),
    (dict(num_frames=2885), "num_frames", "2885"),  # 120 s at most (longer than one pass: chained)
    (dict(guidance=0.5), "guidance", "0.5"),
    (dict(seed=-1), "seed", "-1"),
    (dict(variant=I2V), "image", "needs an image"),
    (dict(variant=I2V, image="x.png", num_frames=13), "num_frames", "13"),
    (dict(variant="kandinsky5-lite-t2v-sft-5s", width=768, height=768), "resolution", "768x768"),
    (dict(variant="kandinsky5-lite-t2v-sft-5s", width=None, height=None, num_frames=243), "num_frames", "243"),
    (
        dict(variant="kandinsky5-lite-t2v-sft-5s", width=None, height=None, num_frames=None, seconds=10),
        "duration",
        "10",
    ),
]


@pytest.mark.parametrize(("change", "field", "named"), BAD, ids=[f"{b[1]}-{i}" for i, b in enumerate(BAD)])
def test_validation_names_the_bad_value_before_model_work(tiny_weights_dir, tmp_path, change, field, named):
    fresh = Engine(tiny_weights_dir, device="cpu")
    with pytest.raises(InvalidRequest) as info:
        fresh.generate(t2v(**change), tmp_path / "never.mp4")
    assert info.value.field == field
    assert named in str(info.value)
    assert fresh.loaded() == []  # nothing was loaded
    assert not list(tmp_path.iterdir())


def test_i2v_with_unreadable_image_is_rejected(engine, tmp_path):
    bad = tmp_path / "not-an-image.png"
    bad.write_bytes(b"hello")
    with pytest.raises(InvalidRequest, match="not-an-image"):
        engine.prepare(i2v(bad, width=None, height=None))


# ---- demo mode and loading ----------------------------------------------------------------


def test_demo_mode_routes_real_variants_to_tiny_at_demo_size(engine, tmp_path):
    assert engine.demo
    resolved = engine.prepare(GenerationRequest(variant="kandinsky5-lite-t2v-sft-5s", prompt="x", steps=2))
    assert resolved.demo and resolved.variant.name == T2V
    assert (resolved.width, resolved.height, resolved.num_frames, resolved.steps) == (256, 160, 25, 2)
    resolved = engine.prepare(GenerationRequest(variant="kandinsky5-lite-t2v-sft-10s", prompt="x", seconds=10))
    assert (resolved.num_frames, resolved.steps) == (25, 50)  # requested steps are honoured


def test_loading_and_generating_make_no_network_attempt(tiny_weights_dir, tmp_path, monkeypatch):
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network blocked by test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    fresh = Engine(tiny_weights_dir, device="cpu")
    fresh.warmup()  # loads both tiny pipelines from disk
    fresh.generate(t2v(steps=1), tmp_path / "offline.mp4")
    assert attempts == []
    assert (tmp_path / "offline.mp4").exists()


def test_missing_weights_name_the_part_and_the_download_command(tmp_path):
    from pipelines.errors import WeightsMissing
    from pipelines.tiny import ensure_tiny

    weights = tmp_path / "w"
    ensure_tiny(weights, T2V)
    # A real variant present but incomplete: not demo mode for it, and a precise error.
    real = weights / "kandinsky5-lite-t2v-distilled-5s"
    real.mkdir()
    for sub in ("transformer", "vae", "tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "scheduler"):
        (real / sub).symlink_to(weights / T2V / sub)
    (real / "model_index.json").write_text((weights / T2V / "model_index.json").read_text())
    other = weights / "kandinsky5-lite-t2v-sft-5s"
    other.mkdir()
    fresh = Engine(weights, device="cpu")
    assert not fresh.demo and fresh.present == ["kandinsky5-lite-t2v-distilled-5s"]
    with pytest.raises(WeightsMissing) as info:
        fresh.prepare(GenerationRequest(variant="kandinsky5-lite-t2v-sft-5s", prompt="x"))
    assert "model_index.json" in str(info.value)
    assert "k5serve weights download kandinsky5-lite-t2v-sft-5s" in str(info.value)
    # The complete one loads through the same loader as the tiny models.
    resolved = fresh.prepare(
        GenerationRequest(variant="kandinsky5-lite-t2v-distilled-5s", prompt="x", num_frames=5, steps=1)
    )
    assert not resolved.demo and (resolved.width, resolved.height) == (768, 512)


def test_require_weights_refuses_demo_mode(tiny_weights_dir):
    from pipelines.errors import WeightsMissing

    with pytest.raises(WeightsMissing, match="k5serve weights download"):
        Engine(tiny_weights_dir, device="cpu", require_weights=True)


# ---- exact speed-ups and attention ----------------------------------------------------------


def test_default_negative_prompt_is_encoded_once_per_variant(tiny_weights_dir):
    fresh = Engine(tiny_weights_dir, device="cpu")
    pipe = fresh.pipeline(T2V)
    calls = []
    encode = pipe.encode_prompt
    pipe.encode_prompt = lambda *a, **kw: calls.append(kw.get("prompt")) or encode(*a, **kw)
    try:
        first = fresh.generate_frames(t2v(negative_prompt=None)).frames
        second = fresh.generate_frames(t2v(negative_prompt=None)).frames
    finally:
        del pipe.encode_prompt
    # 1st job: the negative prompt (cached) and the prompt; 2nd job: only the prompt.
    assert len(calls) == 3
    assert np.array_equal(first, second)


def test_attention_backend_choice():
    from pipelines.loader import attention_backend

    assert attention_backend("cpu", nabla=False) == "native"
    assert attention_backend("cpu", nabla=True) == "flex"
    assert attention_backend("cuda", nabla=True) == "flex"


def test_nabla_variant_loads_on_flex_and_matches_full_attention(tiny_weights_dir, tiny_nabla_dir):
    """A nabla config goes through the flex backend (SDPA cannot take its BlockMask). At tiny sizes
    the nabla/STA mask is dense and eager flex ignores block sparsity, so it equals full attention."""
    from pipelines.loader import LoadOptions, load_pipeline
    from pipelines.variants import VARIANTS

    args = dict(prompt="a fox", height=128, width=128, num_frames=9, num_inference_steps=2, output_type="np")
    nabla = load_pipeline(VARIANTS[T2V], tiny_nabla_dir, LoadOptions())
    regular = load_pipeline(VARIANTS[T2V], tiny_weights_dir / T2V, LoadOptions())
    out_nabla = nabla(**args, generator=torch.Generator().manual_seed(0)).frames[0]
    out_regular = regular(**args, generator=torch.Generator().manual_seed(0)).frames[0]
    assert np.abs(out_nabla - out_regular).max() < 1e-3


def test_a_nabla_variant_leaves_the_other_pipelines_attention_alone(tiny_weights_dir, tiny_nabla_dir):
    """diffusers' set_attention_backend also sets a process-wide default that processors without a
    backend follow; loading a nabla (flex) variant must not switch other pipelines to flex."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    from pipelines.loader import LoadOptions, load_pipeline
    from pipelines.variants import VARIANTS

    default = _AttentionBackendRegistry.get_active_backend()[0]
    args = dict(prompt="a fox", height=128, width=128, num_frames=9, num_inference_steps=2, output_type="np")
    regular = load_pipeline(VARIANTS[T2V], tiny_weights_dir / T2V, LoadOptions())
    before = regular(**args, generator=torch.Generator().manual_seed(0)).frames[0]
    nabla = load_pipeline(VARIANTS[T2V], tiny_nabla_dir, LoadOptions())
    assert _AttentionBackendRegistry.get_active_backend()[0] == default
    after = regular(**args, generator=torch.Generator().manual_seed(0)).frames[0]
    assert np.array_equal(before, after)
    backends = {p._attention_backend for p in nabla.transformer.attn_processors.values()}
    assert {str(getattr(b, "value", b)) for b in backends} == {"flex"}


def test_warm_up_falls_back_to_eager_when_compilation_fails(tiny_weights_dir):
    """warm_compiled runs the variant once; a compiler failure there (simulated: a compiled
    block that raises, as torch.compile's wrapper would) leaves the block eager, not broken."""
    fresh = Engine(tiny_weights_dir, device="cpu")
    block = fresh.pipeline(T2V).transformer.visual_transformer_blocks[0]

    def broken(*_a, **_kw):
        raise RuntimeError("simulated inductor failure")

    block._compiled_call_impl = broken
    warm_compiled(fresh, T2V)
    assert block._compiled_call_impl is None
    assert np.isfinite(fresh.generate_frames(t2v(steps=1)).frames).all()
