"""Shared components and residency with a device budget (pipelines/residency.py, content.py), on the CPU.

Three real (non-demo) Lite variant folders hold the tiny checkpoint: their text encoders, tokenizers
and VAE are hardlinks of one set of files, and each has its own transformer (the tiny one, shifted
by a per-variant constant), as Lite sft, nocfg and distilled share Qwen, CLIP and the VAE. The
device budget is set through Engine(device_memory=...), what `--device-memory` sets.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines import memory
from pipelines.content import content_ids
from pipelines.engine import Engine
from pipelines.request import GenerationRequest
from pipelines.tiny import ensure_tiny_family
from pipelines.variants import TINY_I2V, TINY_T2V

LITES = ["kandinsky5-lite-t2v-sft-5s", "kandinsky5-lite-t2v-nocfg-5s", "kandinsky5-lite-t2v-distilled-5s"]
WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"
OPTS = dict(device="cpu", compile=False, cfg_batch=False, memory_mode="gpu")  # equal plans for the three


@pytest.fixture(scope="module")
def lite_weights(tiny_weights_dir, tmp_path_factory) -> Path:
    weights = tmp_path_factory.mktemp("lites")
    ensure_tiny_family(weights, LITES, tiny_weights_dir / TINY_T2V)
    return weights


def lite(name: str, **kw) -> GenerationRequest:
    return GenerationRequest(variant=name, prompt="a fox", width=512, height=512, num_frames=1, steps=1, seed=3, **kw)


# ---- content ids ------------------------------------------------------------------------------


def test_content_ids_follow_the_bytes_not_the_name(lite_weights, tmp_path):
    ids = [content_ids(lite_weights / name) for name in LITES]
    for component in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae"):
        assert ids[0][component] == ids[1][component] == ids[2][component]
    assert len({i["transformer"] for i in ids}) == 3
    assert (lite_weights / LITES[0] / ".k5serve" / "content-ids.json").is_file()  # kept beside the weights

    # a copy under another name has the same ids; a changed file changes its component's id (cache or not)
    copy = tmp_path / "renamed"
    shutil.copytree(lite_weights / LITES[0], copy)
    assert content_ids(copy) == ids[0]
    config = copy / "vae" / "config.json"
    config.write_text(config.read_text().replace("0.476986", "0.5"))
    changed = content_ids(copy)
    assert changed["vae"] != ids[0]["vae"] and changed["text_encoder"] == ids[0]["text_encoder"]


# ---- shared components -------------------------------------------------------------------------


def test_shared_components_are_loaded_once_and_give_identical_frames(tiny_weights_dir):
    """The tiny t2v and i2v checkpoints have byte-identical text encoders, tokenizers and VAE."""
    req = GenerationRequest(variant=TINY_T2V, prompt="a fox", width=64, height=64, num_frames=5, steps=2, seed=7)
    frames = {}
    for share in (True, False):
        engine = Engine(tiny_weights_dir, device="cpu", compile=False, share_components=share)
        i2v = engine.pipeline(TINY_I2V)
        frames[share] = engine.generate_frames(req).frames
        t2v = engine.pipeline(TINY_T2V)
        for component in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae"):
            assert (getattr(t2v, component) is getattr(i2v, component)) is share, component
        assert t2v.transformer is not i2v.transformer and t2v.scheduler is not i2v.scheduler
        held = engine.describe()
        assert held["counters"]["loads"] == (5 if share else 8)  # 4 models, then only the other transformer
        assert held["counters"]["evictions"] == 0  # no budget on the CPU: nothing leaves
        encoders = [e for e in held["resident"] if e["component"] == "text_encoder"]
        if share:
            assert len(encoders) == 1 and encoders[0]["variants"] == [TINY_I2V, TINY_T2V]
            assert encoders[0]["id"].startswith("sha256:") and encoders[0]["bytes"] > 0
        else:
            assert [e["variants"] for e in encoders] == [[TINY_I2V], [TINY_T2V]]
    assert np.array_equal(frames[True], frames[False])


# ---- residency with a budget -------------------------------------------------------------------


def budget_for(weights: Path) -> tuple[int, int]:
    """(device_memory, peak): room for one variant's plan and half a tiny transformer more, so a
    second transformer cannot stay beside it."""
    from safetensors.torch import load_file

    probe = Engine(weights, **OPTS)
    peaks = {probe.memory_plan(probe.prepare(lite(n))).peak for n in LITES}
    assert len(peaks) == 1
    transformer = sum(t.numel() * t.element_size() for t in load_file(weights / LITES[0] / WEIGHTS).values())
    return memory.CONTEXT_RESERVE + peaks.pop() + transformer // 2, transformer


def test_jobs_over_several_variants_stay_under_budget_and_swap_back_from_host(lite_weights):
    capacity, transformer_bytes = budget_for(lite_weights)
    engine = Engine(lite_weights, device_memory=capacity, **OPTS)
    resolved = {n: engine.prepare(lite(n)) for n in LITES}  # each fits on its own: none is refused
    seen = []

    def at_each_load(event: str, name: str) -> None:
        # what stays beside the running variant leaves room for its whole plan
        stays = engine.residency.device_bytes(engine._pipes.ids(name).items())
        assert stays + engine.memory_plan(resolved[name]).peak <= memory.usable(capacity)
        assert engine.memory_plan(resolved[name]) is not None
        transformers = [e for e in engine.describe()["resident"] if e["component"] == "transformer"]
        assert [t["variants"] for t in transformers] == [[name]]
        seen.append((event, name))

    engine.residency.listeners.append(at_each_load)
    first = engine.generate_frames(resolved[LITES[0]], decode=False).frames
    transformer = engine.pipeline(LITES[0]).transformer
    for name in LITES[1:]:
        engine.generate_frames(resolved[name], decode=False)
    assert engine.residency.where(LITES[0], "transformer") == "host"
    assert sorted(e["variants"] for e in engine.describe()["host"]) == sorted([[LITES[0]], [LITES[1]]])
    loads = engine.describe()["counters"]["loads"]
    assert loads == 4 + 2  # the shared text encoders and VAE once, then a transformer per variant

    again = engine.generate_frames(resolved[LITES[0]], decode=False).frames  # LRU: LITES[1] leaves now
    counters = engine.describe()["counters"]
    assert counters["loads"] == loads  # nothing read from disk again
    assert counters["swaps"] == 1 and counters["evictions"] == 3 and counters["drops"] == 0
    assert engine.pipeline(LITES[0]).transformer is transformer  # the kept copy came back
    assert engine.residency.where(LITES[1], "transformer") == "host"
    assert torch.equal(again, first)  # and computes what it did before it left
    assert seen == [("load", LITES[0]), ("load", LITES[1]), ("load", LITES[2]), ("swap", LITES[0])]
    shared = [e for e in engine.describe()["resident"] if e["component"] != "transformer"]
    assert {e["component"] for e in shared} == {"text_encoder", "text_encoder_2", "vae"}
    assert all(e["variants"] == sorted(LITES) for e in shared)  # shared, never evicted: all use them
    assert engine.describe()["resident"][0]["bytes"] >= transformer_bytes  # its parameters, and buffers


def test_without_host_room_an_evicted_transformer_is_dropped_and_read_again(lite_weights):
    capacity, _ = budget_for(lite_weights)
    engine = Engine(lite_weights, device_memory=capacity, host_cache=0, **OPTS)
    first = engine.pipeline(LITES[0], engine.prepare(lite(LITES[0])))
    engine.pipeline(LITES[1], engine.prepare(lite(LITES[1])))
    assert engine.loaded() == [LITES[1]] and engine.describe()["host"] == []
    counters = engine.describe()["counters"]
    assert (counters["evictions"], counters["drops"], counters["loads"]) == (1, 1, 5)
    back = engine.pipeline(LITES[0], engine.prepare(lite(LITES[0])))
    assert back is not first and engine.describe()["counters"]["loads"] == 6  # from disk again
    assert engine.loaded() == [LITES[0]] and back.text_encoder is first.text_encoder  # shared ones stayed


def test_verify_records_the_content_ids_beside_the_weights(lite_weights, capsys):
    from pipelines.variants import VARIANTS
    from pipelines.weights import report_verify

    folder = lite_weights / LITES[1]
    (folder / ".k5serve" / "content-ids.json").unlink(missing_ok=True)
    assert report_verify(VARIANTS[LITES[1]], folder) == 0
    out = capsys.readouterr().out
    ids = content_ids(folder)
    assert f"id       text_encoder: {ids['text_encoder']}" in out
    assert (folder / ".k5serve" / "content-ids.json").is_file()


# ---- the eviction order, on bare modules ---------------------------------------------------------


def bare_pipe(**modules):
    from types import SimpleNamespace

    return SimpleNamespace(**modules)


def test_eviction_takes_lru_transformers_first_then_unused_models_and_drops_what_host_ram_cannot_keep():
    from pipelines.residency import Residency

    lin = torch.nn.Linear  # 4x4 + 4 fp32 = 80 bytes
    res = Residency("cpu", host_memory=80)  # room for one model in host RAM
    te, vae = lin(4, 4), lin(4, 4)
    a = bare_pipe(transformer=lin(4, 4), text_encoder=te, vae=vae)
    b = bare_pipe(transformer=lin(4, 4), text_encoder=te, vae=vae)
    c = bare_pipe(transformer=lin(4, 4), text_encoder=lin(4, 4), vae=vae)
    ids = {
        "a": {"transformer": "ta", "text_encoder": "te", "vae": "v"},
        "b": {"transformer": "tb", "text_encoder": "te", "vae": "v"},
        "c": {"transformer": "tc", "text_encoder": "te2", "vae": "v"},
    }
    expected_shared = {"a": set(), "b": {"text_encoder", "vae"}, "c": {"vae"}}
    for name, pipe in (("a", a), ("b", b), ("c", c)):
        assert set(res.shared_for(name, ids[name], "gpu")) == expected_shared[name]
        res.register(name, pipe, ids[name], "gpu")
    assert res.counters["loads"] == 3 + 1 + 2  # te and v once; c's te2 is other bytes: its own
    res.use("a")  # b is now the least recently used transformer
    keep = set(ids["c"].items())
    assert res.evict_one(keep) == [] and res.where("b", "transformer") == "host"  # LRU, to host RAM
    assert res.evict_one(keep) == ["a"] and res.counters["drops"] == 1  # host RAM full: dropped
    # then models c does not use: te (b's, waiting on the host); dropping it forgets b and its transformer
    assert res.evict_one(keep) == ["b"] and res.host_bytes() == 0
    assert res.evict_one(keep) is None  # only c's own models are left
    assert {(e["component"], e["id"]) for e in res.resident()} == {
        ("transformer", "tc"),
        ("text_encoder", "te2"),
        ("vae", "v"),
    }
    assert (res.counters["evictions"], res.counters["drops"]) == (3, 2)
