"""The memory planner on common cards (issue 14): which mode each variant gets, the estimated peak,
the host RAM, the targets, and the refusals. Torch-free arithmetic (pipelines/memory.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines import memory
from pipelines.memory_table import CARDS_GIB, markdown, rows
from pipelines.placement import Placement
from pipelines.variants import HD_SIZES, SD_SIZES, VARIANTS

GiB = memory.GiB
DOCS = Path(__file__).resolve().parents[2] / "docs" / "memory.md"
REAL = [v for v in VARIANTS.values() if not v.demo]
EXACT = set(memory.MODES)  # every planner mode is exact; approximate ones are separate opt-ins


@pytest.fixture(scope="module")
def table():
    return rows()


def test_the_documented_table_is_the_planners(table):
    """docs/memory.md carries the table; regenerate with `python -m pipelines.memory_table`."""
    assert markdown(table) in DOCS.read_text()


def test_table_covers_every_variant_card_and_size(table):
    expected = sum(len(CARDS_GIB) * (2 if HD_SIZES[0] in v.sizes else 1) for v in REAL)
    assert len(table) == expected
    for r in table:
        if r.plan is not None:
            assert r.plan.peak <= r.card_gib * GiB - memory.CONTEXT_RESERVE
            assert r.plan.mode == Placement(r.card_gib * GiB).mode(r.variant)


@pytest.mark.parametrize(
    ("family", "card", "size"),
    [
        ("pro", 24, SD_SIZES[0]),  # every variant, Pro included, at 5 s 768x512 on 24 GB
        ("lite", 24, SD_SIZES[0]),
        ("lite", 12, SD_SIZES[0]),  # Lite on 12 GB
        ("pro", 48, HD_SIZES[0]),  # Pro HD on 48 GB
    ],
)
def test_targets_are_met_with_exact_modes(table, family, card, size):
    hits = [r for r in table if VARIANTS[r.variant].family == family and r.card_gib == card and r.size == size]
    five_s = [r for r in hits if VARIANTS[r.variant].seconds == 5]
    assert five_s and all(r.plan is not None and r.plan.mode in EXACT for r in five_s)


def test_the_chosen_modes_by_card():
    """The heart of the table, spelled out: mode per family and card (auto)."""
    lite, pro = VARIANTS["kandinsky5-lite-t2v-sft-5s"].name, VARIANTS["kandinsky5-pro-t2v-sft-5s"].name
    lite10 = VARIANTS["kandinsky5-lite-t2v-sft-10s"].name
    got = {card: tuple(Placement(card * GiB).mode(n) for n in (lite, lite10, pro)) for card in CARDS_GIB}
    assert got == {
        12: ("stream_text", "stream_text", "stream"),
        16: ("stream_text", "stream_text", "stream"),
        24: ("gpu", "offload_text", "stream"),
        32: ("gpu", "gpu", "stream"),
        48: ("gpu", "gpu", "stream"),
        80: ("gpu", "gpu", "gpu"),
    }


def test_estimates_of_the_streaming_modes():
    pro = VARIANTS["kandinsky5-pro-t2v-sft-5s"]
    fp = memory.plan(pro, 768, 512, 121, 24 * GiB)
    assert (fp.mode, fp.cfg_batch, fp.ffn_chunks) == ("stream", True, 4)
    assert round(fp.peak / GiB, 1) == 10.9
    parts = memory.streamed_parts(pro)
    assert round(parts["transformer_resident"] / 1e9, 1) == 2.1  # of 43.4 GB
    assert round(parts["blocks_host"] / 1e9, 1) == 32.2 and round(parts["modulations_host"] / 1e9, 1) == 9.1
    assert round(fp.host / GiB) == 54  # Qwen + blocks + modulations in host RAM
    lite = memory.plan(VARIANTS["kandinsky5-lite-t2v-sft-5s"], 768, 512, 121, 12 * GiB)
    assert lite.mode == "stream_text" and round(lite.peak / GiB, 1) == 8.7 and round(lite.host / GiB) == 15


def test_ffn_chunking_cuts_the_activations():
    pro = VARIANTS["kandinsky5-pro-t2v-sft-5s"]
    whole = memory.denoise_activations(pro, 768, 512, 121, 1)
    chunked = memory.denoise_activations(pro, 768, 512, 121, 1, memory.FFN_CHUNKS)
    assert chunked / whole == pytest.approx(0.8)  # the fp32 AdaLN temporaries then dominate


def test_host_ram_decides_too():
    pro = VARIANTS["kandinsky5-pro-t2v-sft-5s"]
    assert memory.plan(pro, 768, 512, 121, 24 * GiB, host_capacity=32 * GiB) is None
    assert memory.plan(pro, 768, 512, 121, 24 * GiB, host_capacity=64 * GiB).mode == "stream"
    # a big card with little host RAM stays resident (gpu needs no host copies)
    assert memory.plan(pro, 768, 512, 121, 80 * GiB, host_capacity=16 * GiB).mode == "gpu"
    msg = memory.no_fit_message(pro, 768, 512, 121, 24 * GiB, host_capacity=32 * GiB)
    assert msg == (
        "768x512, 121 frames fits this 24 GiB GPU only in memory mode stream, which keeps about 62 GiB in host "
        "RAM (54 GiB of weights + 8 GiB for the process); this host has 32 GiB (kandinsky5-pro-t2v-sft-5s); "
        "add host RAM or use a smaller model"
    )


def test_device_refusals_name_the_most_frugal_mode_and_the_frames_that_fit():
    pro = VARIANTS["kandinsky5-pro-t2v-sft-5s"]
    assert memory.no_fit_message(pro, 1280, 768, 121, 12 * GiB) == (
        "1280x768, 121 frames needs about 14 GiB on this 12 GiB GPU even streaming the transformer block by "
        "block (kandinsky5-pro-t2v-sft-5s); use at most 93 frames or a smaller size"
    )
    assert memory.plan(pro, 1280, 768, 93, 12 * GiB) is not None
    assert memory.plan(pro, 1280, 768, 97, 12 * GiB) is None
    assert memory.no_fit_message(pro, 768, 512, 121, 6 * GiB).endswith("use a smaller size or a smaller model")
