"""Prompt expansion: the official Kandinsky 5 pipelines' rewrite of a prompt by Qwen2.5-VL.

The official pipelines (github.com/kandinskylab/kandinsky-5, commit 6e2a805, 2025-11-28) default to
`expand_prompts=True`: before encoding, the prompt is rewritten by the same Qwen2.5-VL that encodes
it, with `model.generate(**inputs, max_new_tokens=256)` after `transformers.set_seed(seed)`, and the
rewrite replaces the prompt for both text encoders (the negative prompt is never rewritten):
- text-to-video: `Kandinsky5T2VPipeline.expand_prompt` (kandinsky/t2v_pipeline.py lines 75-116),
  called at lines 156-161; one user message holding the instruction below;
- image-to-video: `Qwen2_5_VLTextEmbedder.expand_text_prompt` (kandinsky/models/text_embedders.py
  lines 159-198, its instruction `INSTRUCTION_I2V_EXPAND` at lines 37-44), called from
  kandinsky/i2v_pipeline.py lines 140-145; the user message holds the input image, then the text.
Generation settings are the checkpoint's own (its generation_config.json), as there.

diffusers has no such step, so k5serve runs it only when asked (ResolvedRequest.expand_prompt; the
server's default is off: K5SERVE_EXPAND_PROMPTS). It uses the text encoder already loaded, in the
engine's stage 2 (generation.py), and is deterministic for a given seed.

The tiny demo checkpoints (tiny.py) can run it too: their Qwen is a `Qwen2_5_VLForConditionalGeneration`
(language-model head included) and generates; their tokenizer is a plain `Qwen2Tokenizer`, with no
chat template and no image processor, so the Qwen2-VL chat template below renders the message and
their image-to-video expansion sees the instruction without the image.
"""

from __future__ import annotations

from typing import Any

from .request import ResolvedRequest

MAX_NEW_TOKENS = 256  # official: generate(**inputs, max_new_tokens=256)

# The official instructions, verbatim (typos and indentation included: the model was used with
# exactly these). tests/pipelines/test_expand.py pins their SHA-256.
T2V_INSTRUCTION = (
    "You are a prompt beautifier that transforms short user video descriptions into rich, detailed "
    "English prompts specifically optimized for video generation models.\n"
    "        Here are some example descriptions from the dataset that the model was trained:\n"
    '        1. "In a dimly lit room with a cluttered background, papers are pinned to the wall and '
    "various objects rest on a desk. Three men stand present: one wearing a red sweater, another in a "
    "black sweater, and the third in a gray shirt. The man in the gray shirt speaks and makes hand "
    "gestures, while the other two men look forward. The camera remains stationary, focusing on the "
    "three men throughout the sequence. A gritty and realistic visual style prevails, marked by a "
    "greenish tint that contributes to a moody atmosphere. Low lighting casts shadows, enhancing the "
    'tense mood of the scene."\n'
    '        2. "In an office setting, a man sits at a desk wearing a gray sweater and seated in a black '
    "office chair. A wooden cabinet with framed pictures stands beside him, alongside a small plant and "
    "a lit desk lamp. Engaged in a conversation, he makes various hand gestures to emphasize his points. "
    "His hands move in different positions, indicating different ideas or points. The camera remains "
    "stationary, focusing on the man throughout. Warm lighting creates a cozy atmosphere. The man "
    "appears to be explaining something. The overall visual style is professional and polished, suitable "
    'for a business or educational context."\n'
    '        3. "A person works on a wooden object resembling a sunburst pattern, holding it in their '
    "left hand while using their right hand to insert a thin wire into the gaps between the wooden "
    "pieces. The background features a natural outdoor setting with greenery and a tree trunk visible. "
    "The camera stays focused on the hands and the wooden object throughout, capturing the detailed "
    "process of assembling the wooden structure. The person carefully threads the wire through the gaps, "
    "ensuring the wooden pieces are securely fastened together. The scene unfolds with a naturalistic "
    "and instructional style, emphasizing the craftsmanship and the methodical steps taken to complete "
    'the task."\n'
    "        IImportantly! These are just examples from a large training dataset of 200 million videos.\n"
    '        Rewrite Prompt: "{prompt}" to get high-quality video generation. Answer only with expanded '
    "prompt."
)

I2V_INSTRUCTION = (
    "You are a prompt beautifier that transforms short user video descriptions into rich, detailed "
    "English prompts specifically optimized for video generation models.\n"
    "    Here are some example descriptions from the dataset that the model was trained:\n"
    '    1. "Create a video showing a nighttime urban driving scene from inside a car. The driver is '
    "focused on the road ahead, with the city lights visible through the windshield. The GPS device on "
    "the dashboard continues to display navigation information. The camera remains steady, capturing the "
    "interior of the car and the changing street view outside as the vehicle moves forward. The "
    "background shifts slightly to show different parts of the cityscape, including illuminated "
    'buildings and street signs."\n'
    '    2. "Create a video where the character, dressed in historical attire, is seen holding an '
    "umbrella with a logo. The character should move closer to the camera while maintaining a steady "
    "pace, keeping the umbrella raised. The background remains consistent with a foggy, outdoor setting, "
    "but the focus shifts more towards the character as they approach. The lighting should emphasize the "
    'details of the costume and the umbrella, enhancing the dramatic effect."\n'
    '    3. "Darken the scene while keeping the characters and setting unchanged, emphasizing a serious '
    'atmosphere."\n'
    "    IImportantly! These are just examples from a large training dataset of 20 mln videos.\n"
    '    Rewrite Prompt: "{prompt}" to get high-quality image to video generation from this image. Pay '
    "main attention to information about changes of objects.\n"
    "    Make prompt dynamic. Answer only with expanded prompt."
)


# Qwen2-VL's chat template (Qwen2.5-VL-7B-Instruct ships the same one), for a tokenizer that has
# none: the tiny checkpoints' plain Qwen2Tokenizer. A real checkpoint's processor brings its own.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def expand(pipe, r: ResolvedRequest) -> str:
    """Stage 2's rewrite of `r.prompt` (generation.py): for image-to-video with the input image as
    given (the official pipeline passes the original PIL image, not the resized first frame)."""
    image = None
    if r.variant.task == "i2v" and r.image and can_see_images(pipe):
        from PIL import Image

        with Image.open(r.image) as img:
            image = img.convert("RGB")
    return expand_prompt(pipe, r.prompt, task=r.variant.task, seed=r.seed, image=image)


def can_see_images(pipe) -> bool:
    """Whether the pipeline's Qwen tokenizer is a processor with an image processor (a real
    checkpoint's Qwen2VLProcessor; not the tiny checkpoints' plain tokenizer)."""
    return getattr(pipe.tokenizer, "image_processor", None) is not None


def instruction(task: str, prompt: str) -> str:
    """The official user message text for `task` ("t2v" or "i2v") around `prompt`."""
    template = I2V_INSTRUCTION if task == "i2v" else T2V_INSTRUCTION
    return template.format(prompt=prompt)


def expand_prompt(pipe, prompt: str, *, task: str, seed: int, image: Any = None) -> str:
    """`prompt` rewritten by `pipe.text_encoder` (Qwen2.5-VL) as the official pipelines do.

    `image` (a PIL image, image-to-video) goes into the message when the pipeline's tokenizer is a
    processor that can read images. Deterministic for a given `seed`: the model samples with the
    torch generator seeded as the official `transformers.set_seed(seed)` seeds it, inside a forked RNG
    so nothing else in the process sees the reseed. An empty rewrite (a model that ends at once)
    keeps `prompt`.
    """
    import torch

    tokenizer, model = pipe.tokenizer, pipe.text_encoder
    sees_image = image is not None and can_see_images(pipe)
    content: list[dict] = [{"type": "image", "image": image}] if sees_image else []
    content.append({"type": "text", "text": instruction(task, prompt)})
    messages = [{"role": "user", "content": content}]
    template = getattr(tokenizer, "chat_template", None) or QWEN2_VL_CHAT_TEMPLATE
    text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)
    if sees_image:
        inputs = tokenizer(text=[text], images=[image], videos=None, padding=True, return_tensors="pt")
    else:
        inputs = tokenizer([text], padding=True, return_tensors="pt")
    device = pipe._execution_device
    inputs = inputs.to(device)
    devices = [device] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)  # what transformers.set_seed does for torch (all CUDA devices included)
        generated = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS)
    new_tokens = generated[:, inputs["input_ids"].shape[1] :]
    decode = tokenizer.batch_decode
    rewritten = decode(new_tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)[0]
    return rewritten if rewritten.strip() else prompt
