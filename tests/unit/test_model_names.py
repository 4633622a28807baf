"""Model aliases, families and size fitting (pipelines/variants.py, request_for_model): torch-free."""

from __future__ import annotations

import pytest

from pipelines.request import request_for_model
from pipelines.variants import DEFAULT_ALIASES, VARIANTS, family, fit_size, for_frames, parse_aliases, resolve_model


def names(variants):
    return [v.name for v in variants]


def test_parse_aliases_checks_every_entry():
    assert parse_aliases(" a=kandinsky5-tiny-t2v , b = kandinsky5-lite-i2v-5s,") == {
        "a": "kandinsky5-tiny-t2v",
        "b": "kandinsky5-lite-i2v-5s",
    }
    assert parse_aliases(None) == parse_aliases("") == {}
    for bad, words in (("a", "not name=variant"), ("=x", "not name=variant"), ("a=kandinsky9", "no variant")):
        with pytest.raises(ValueError, match=words):
            parse_aliases(bad)
    assert all(target in VARIANTS for target in DEFAULT_ALIASES.values())


def test_families_by_task_and_length():
    lite_sft = VARIANTS["kandinsky5-lite-t2v-sft-5s"]
    assert names(family(lite_sft, "t2v")) == ["kandinsky5-lite-t2v-sft-5s", "kandinsky5-lite-t2v-sft-10s"]
    assert names(family(VARIANTS["kandinsky5-lite-t2v-distilled-10s"], "i2v")) == ["kandinsky5-lite-i2v-5s"]
    assert names(family(VARIANTS["kandinsky5-pro-t2v-distilled-5s"], "i2v")) == ["kandinsky5-pro-i2v-distilled-5s"]
    assert names(family(VARIANTS["kandinsky5-tiny-t2v"], "i2v")) == ["kandinsky5-tiny-i2v"]
    members = family(lite_sft, "t2v")
    assert [for_frames(members, n).seconds for n in (97, 121, 122, 241, 481)] == [5, 5, 10, 10, 10]


@pytest.mark.parametrize(
    ("variant", "asked", "made"),
    [
        ("kandinsky5-lite-t2v-sft-5s", (512, 768), (512, 768)),  # a size it makes: exact
        ("kandinsky5-lite-t2v-sft-5s", (1280, 720), (768, 512)),
        ("kandinsky5-lite-t2v-sft-5s", (720, 1280), (512, 768)),
        ("kandinsky5-lite-t2v-sft-5s", (1024, 1024), (512, 512)),
        ("kandinsky5-pro-t2v-sft-5s", (1920, 1080), (1280, 768)),
        ("kandinsky5-pro-t2v-sft-5s", (1080, 1920), (768, 1280)),
        ("kandinsky5-pro-t2v-sft-5s", (800, 800), (1024, 1024)),  # closest area among the squares
        ("kandinsky5-pro-t2v-sft-5s", (600, 600), (512, 512)),
        ("kandinsky5-tiny-t2v", (128, 96), (128, 96)),
        ("kandinsky5-tiny-t2v", (1280, 720), (256, 144)),
    ],
)
def test_fit_size_keeps_the_orientation(variant, asked, made):
    assert fit_size(VARIANTS[variant], *asked) == made


def test_aliases_resolve_to_their_variant_and_its_siblings():
    aliases = {**DEFAULT_ALIASES, "mine": "kandinsky5-lite-t2v-nocfg-5s"}
    assert resolve_model("sora-2", None, aliases)[0].name == "kandinsky5-lite-t2v-sft-5s"
    assert resolve_model("mine", 10, aliases)[0].name == "kandinsky5-lite-t2v-nocfg-10s"
    with pytest.raises(ValueError, match="not available for sora-2-pro"):
        resolve_model("sora-2-pro", 10, aliases)
    with pytest.raises(KeyError):
        resolve_model("sora-2")  # no aliases given: not a model
    # request_for_model moves a family name by task and frames; a variant's own name stays as named
    assert request_for_model("sora-2", "x", aliases=aliases, num_frames=193).variant == "kandinsky5-lite-t2v-sft-10s"
    assert request_for_model("sora-2-pro", "x", aliases=aliases, task="i2v").variant == "kandinsky5-pro-i2v-sft-5s"
    assert request_for_model("kandinsky5-lite-t2v-sft-5s", "x", aliases=aliases, num_frames=193).variant == (
        "kandinsky5-lite-t2v-sft-5s"
    )
