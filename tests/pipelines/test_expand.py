"""Prompt expansion (pipelines/expand.py) on the tiny checkpoints: their Qwen2.5-VL generates, the
rewrite is deterministic for a seed, it is what stage 2 encodes, and it is off unless asked for."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from pipelines import expand
from pipelines.request import GenerationRequest

T2V, I2V = "kandinsky5-tiny-t2v", "kandinsky5-tiny-i2v"
PROMPT = "a red fox running through snow"


def t2v(**kw) -> GenerationRequest:
    args = dict(variant=T2V, prompt=PROMPT, width=64, height=64, num_frames=9, steps=2, seed=7)
    return GenerationRequest(**{**args, **kw})


def test_the_instructions_are_the_official_ones_verbatim():
    # SHA-256 of the strings in github.com/kandinskylab/kandinsky-5 @ 6e2a805: the f-string of
    # kandinsky/t2v_pipeline.py `expand_prompt` (with "{prompt}" left in) and INSTRUCTION_I2V_EXPAND.
    assert hashlib.sha256(expand.T2V_INSTRUCTION.encode()).hexdigest() == (
        "649330473e6f09911bfa189523fbf6b300853a74c315f9234db26802a29179bf"
    )
    assert hashlib.sha256(expand.I2V_INSTRUCTION.encode()).hexdigest() == (
        "22a201aa6decaffd4ff2e8bef3ad45f65f13a4c9a473cb1f6908dfe03980854b"
    )
    # a prompt with braces is inserted as it is, not parsed as a format string
    assert 'Rewrite Prompt: "a {weird} prompt" to get' in expand.instruction("t2v", "a {weird} prompt")


def test_the_tiny_qwen_generates_a_rewrite_deterministically(engine):
    pipe = engine.pipeline(T2V)
    first = expand.expand_prompt(pipe, PROMPT, task="t2v", seed=3)
    again = expand.expand_prompt(pipe, PROMPT, task="t2v", seed=3)
    assert first == again and first.strip() and first != PROMPT
    # another prompt, another rewrite: the prompt reaches the model
    assert expand.expand_prompt(pipe, "a blue whale", task="t2v", seed=3) != first


def test_a_sampling_checkpoint_is_deterministic_for_a_seed_and_leaves_the_global_rng_alone(engine, monkeypatch):
    # A real checkpoint's generation_config samples; the tiny one is greedy. Turn sampling on.
    pipe = engine.pipeline(T2V)
    monkeypatch.setattr(pipe.text_encoder.generation_config, "do_sample", True)
    monkeypatch.setattr(pipe.text_encoder.generation_config, "temperature", 5.0)
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    runs = [expand.expand_prompt(pipe, PROMPT, task="t2v", seed=s) for s in (11, 11, 12)]
    assert torch.equal(torch.get_rng_state(), state)  # the reseed stays inside expand_prompt
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]  # the seed matters when the model samples


def test_the_message_is_qwen2_vl_chat_for_the_plain_tiny_tokenizer(engine):
    pipe = engine.pipeline(T2V)
    assert not expand.can_see_images(pipe)  # a plain Qwen2Tokenizer: no image processor
    messages = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    text = pipe.tokenizer.apply_chat_template(
        messages, chat_template=expand.QWEN2_VL_CHAT_TEMPLATE, tokenize=False, add_generation_prompt=True
    )
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_off_by_default_and_then_output_is_unchanged(engine):
    plain = engine.prepare(t2v())
    assert plain.expand_prompt is False
    done = engine.generate_frames(plain)
    assert done.revised_prompt is None
    assert np.array_equal(done.frames, engine.generate_frames(t2v(expand_prompt=False)).frames)


def test_expansion_encodes_the_rewrite_in_place_of_the_prompt(engine):
    expanded = engine.generate_frames(t2v(expand_prompt=True))
    rewrite = expand.expand_prompt(engine.pipeline(T2V), PROMPT, task="t2v", seed=7)
    assert expanded.revised_prompt == rewrite
    # the same video as asking for the rewrite directly; not the video of the original prompt
    direct = engine.generate_frames(t2v(prompt=rewrite))
    assert np.array_equal(expanded.frames, direct.frames)
    assert not np.array_equal(expanded.frames, engine.generate_frames(t2v()).frames)
    assert set(expanded.timings) >= {"load", "encode_prompt", "denoise", "decode"}


def test_the_result_carries_the_rewrite(engine, tmp_path):
    result = engine.generate(t2v(expand_prompt=True), tmp_path / "out.mp4")
    assert result.revised_prompt == expand.expand_prompt(engine.pipeline(T2V), PROMPT, task="t2v", seed=7)
    assert engine.generate(t2v(), tmp_path / "plain.mp4").revised_prompt is None


def test_image_to_video_expands_with_its_own_instruction(engine, test_image):
    request = GenerationRequest(
        variant=I2V, prompt=PROMPT, image=str(test_image), num_frames=17, steps=1, seed=5, expand_prompt=True
    )
    done = engine.generate_frames(request)
    pipe = engine.pipeline(I2V)
    # the tiny tokenizer cannot read images: the i2v instruction alone, not the t2v one
    assert done.revised_prompt == expand.expand_prompt(pipe, PROMPT, task="i2v", seed=5)
    assert done.revised_prompt != expand.expand_prompt(pipe, PROMPT, task="t2v", seed=5)


@pytest.mark.parametrize("value", ["yes", 1, 0.0])
def test_a_switch_that_is_not_a_bool_is_refused(engine, value):
    from pipelines.errors import InvalidRequest

    with pytest.raises(InvalidRequest) as err:
        engine.prepare(t2v(expand_prompt=value))
    assert err.value.field == "expand_prompt"
