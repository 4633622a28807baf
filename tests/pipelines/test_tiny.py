"""The tiny checkpoints themselves: layout, determinism, tokenizer template length."""

from __future__ import annotations

import json

from pipelines.layout import missing_parts
from pipelines.tiny import TEMPLATE_PREFIX_TOKENS, _pipeline_template, build_qwen_tokenizer, build_tiny


def test_builds_are_byte_identical_and_complete(tmp_path):
    a = build_tiny(tmp_path / "a", "t2v")
    b = build_tiny(tmp_path / "b", "t2v")
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    assert missing_parts(a) == []
    size = sum((a / rel).stat().st_size for rel in files_a)
    assert size < 5_000_000


def test_layout_is_the_diffusers_one_with_a_plain_qwen_tokenizer(tiny_weights_dir):
    index = json.loads((tiny_weights_dir / "kandinsky5-tiny-i2v" / "model_index.json").read_text())
    assert index["_class_name"] == "Kandinsky5I2VPipeline"
    assert index["tokenizer"] == ["transformers", "Qwen2Tokenizer"]  # not Qwen2VLProcessor (needs torchvision)
    config = json.loads((tiny_weights_dir / "kandinsky5-tiny-t2v" / "transformer" / "config.json").read_text())
    assert config["visual_cond"] is True and config["attention_type"] == "regular"


def test_template_prefix_is_exactly_the_slice_the_pipeline_drops():
    tok = build_qwen_tokenizer()
    template = _pipeline_template()
    ids = tok(template.format("a red fox"))["input_ids"]
    prefix = tok(template.split("{}")[0])["input_ids"]
    assert len(prefix) == TEMPLATE_PREFIX_TOKENS == 128
    # The prompt's first token sits right after the slice, so nothing of the prompt is dropped.
    assert tok.decode(ids[TEMPLATE_PREFIX_TOKENS:]).startswith("a red fox")


def test_missing_parts_names_what_is_absent(tmp_path):
    assert missing_parts(tmp_path / "nope") == [f"the folder {tmp_path / 'nope'}"]
    (tmp_path / "x").mkdir()
    assert missing_parts(tmp_path / "x") == ["model_index.json"]
