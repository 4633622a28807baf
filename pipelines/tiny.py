"""Tiny random-weight Kandinsky 5 checkpoints in the real diffusers folder layout.

They back demo mode and the tests: built on demand, deterministically (byte-identical on
every build), in about a second, and loaded through the same loader as real weights.
Pitfalls handled here (see ../shared/reference/tiny_pipeline.md):
- the Qwen tokenizer is a plain `Qwen2Tokenizer` (Qwen2VLProcessor needs torchvision);
- its BPE merges are cut so the system-prompt prefix is exactly 128 tokens, the slice the
  pipeline drops (`prompt_template_encode_start_idx`);
- our own BPE trainer, because `tokenizers`' trainer is not deterministic;
- the zero-initialised AdaLN modulation is re-initialised so prompts and guidance matter.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

from .layout import is_complete
from .variants import TINY_I2V, TINY_T2V, VARIANTS

TEMPLATE_PREFIX_TOKENS = 128
QWEN_SPECIAL = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
# Extra text the tokenizers learn merges from (beyond the pipeline's own template).
_CORPUS = [
    "a red fox running through snow",
    "a cat playing with a ball of yarn on a wooden floor, cinematic lighting",
    "Static, 2D cartoon, cartoon, 2d animation, paintings, images, worst quality, low quality, ugly, "
    "deformed, walking backwards",
    "the camera slowly pans over a mountain lake at sunset",
]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode map (what ByteLevel pre-tokenization emits)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def _apply_merge(word: list[str], pair: tuple[str, str]) -> list[str]:
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == pair[0] and word[i + 1] == pair[1]:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def _pair_counts(words: list[list[str]]) -> Counter:
    counts: Counter = Counter()
    for w in words:
        for a, b in itertools.pairwise(w):
            counts[(a, b)] += 1
    return counts


def _train_bpe(words: list[list[str]], num_merges: int) -> list[tuple[str, str]]:
    """Plain BPE: most frequent pair first, ties broken lexicographically (deterministic)."""
    merges = []
    for _ in range(num_merges):
        counts = _pair_counts(words)
        if not counts:
            break
        pair = min(counts, key=lambda p: (-counts[p], p))
        merges.append(pair)
        words = [_apply_merge(w, pair) for w in words]
    return merges


def _pipeline_template() -> str:
    """The pipeline's own Qwen prompt template (built in its __init__; no components needed)."""
    from diffusers import Kandinsky5T2VPipeline

    bare = Kandinsky5T2VPipeline(
        transformer=None,
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        scheduler=None,
    )
    if bare.prompt_template_encode_start_idx != TEMPLATE_PREFIX_TOKENS:
        raise RuntimeError(f"diffusers now slices {bare.prompt_template_encode_start_idx} template tokens")
    return bare.prompt_template


def build_qwen_tokenizer():
    """A byte-level BPE Qwen2Tokenizer whose template prefix is exactly 128 tokens."""
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    byte_map = _bytes_to_unicode()
    base_vocab = {ch: i for i, ch in enumerate(sorted(byte_map.values()))}
    probe = Qwen2Tokenizer(vocab=dict(base_vocab), merges=[])
    pre: pre_tokenizers.PreTokenizer = probe.backend_tokenizer.pre_tokenizer

    template = _pipeline_template()
    prefix = template.split("{}")[0]

    def words_of(text: str) -> list[list[str]]:
        out = []
        for chunk in _split_special(text):
            if chunk in QWEN_SPECIAL:
                continue
            out.extend(list(w) for w, _ in pre.pre_tokenize_str(chunk))
        return out

    def count(words: list[list[str]]) -> int:
        return sum(len(w) for w in words) + sum(_split_special(prefix).count(s) for s in QWEN_SPECIAL)

    prefix_words = words_of(prefix)
    corpus_words = [w for text in _CORPUS for w in words_of(template.format(text))]
    merges: list[tuple[str, str]] = []
    # Learn merges from the prefix until it is exactly TEMPLATE_PREFIX_TOKENS long; never overshoot.
    while count(prefix_words) > TEMPLATE_PREFIX_TOKENS:
        excess = count(prefix_words) - TEMPLATE_PREFIX_TOKENS
        counts = _pair_counts(prefix_words)
        for pair in sorted(counts, key=lambda p: (-counts[p], p)):
            merged = [_apply_merge(w, pair) for w in prefix_words]
            if count(prefix_words) - count(merged) <= excess:
                merges.append(pair)
                prefix_words = merged
                corpus_words = [_apply_merge(w, pair) for w in corpus_words]
                break
    # A few more merges from the corpus that cannot touch the prefix keep prompts short.
    prefix_pairs = {p for w in prefix_words for p in itertools.pairwise(w)}
    for pair in _train_bpe([w for w in corpus_words], 200):
        if pair not in prefix_pairs and all(pair not in itertools.pairwise(w) for w in prefix_words):
            merges.append(pair)

    vocab = dict(base_vocab)
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    for token in QWEN_SPECIAL:
        vocab.setdefault(token, len(vocab))
    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=list(merges),
        unk_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=QWEN_SPECIAL[1:],
    )
    tok.model_max_length = 32768
    ids = tok(prefix)["input_ids"]
    if len(ids) != TEMPLATE_PREFIX_TOKENS:
        raise RuntimeError(f"tiny Qwen tokenizer: template prefix is {len(ids)} tokens, need {TEMPLATE_PREFIX_TOKENS}")
    return tok


def _split_special(text: str) -> list[str]:
    import re

    pattern = "(" + "|".join(re.escape(s) for s in QWEN_SPECIAL) + ")"
    return [c for c in re.split(pattern, text) if c]


def build_clip_tokenizer():
    """A small deterministic CLIP BPE tokenizer (bytes, bytes+</w>, 300 merges)."""
    from transformers import CLIPTokenizer

    symbols = sorted(_bytes_to_unicode().values())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for s in symbols:
        vocab[s] = len(vocab)
    for s in symbols:
        vocab[s + "</w>"] = len(vocab)
    probe = CLIPTokenizer(vocab=dict(vocab), merges=[])
    backend = probe.backend_tokenizer
    words = []
    for text in [*_CORPUS, _pipeline_template()]:
        normalized = backend.normalizer.normalize_str(text)
        for w, _ in backend.pre_tokenizer.pre_tokenize_str(normalized):
            chars = list(w)
            chars[-1] += "</w>"
            words.append(chars)
    merges = _train_bpe(words, 300)
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = CLIPTokenizer(
        vocab=vocab,
        merges=list(merges),
        unk_token="<|endoftext|>",
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    tok.model_max_length = 77
    return tok


def build_pipeline(task: str):
    """Build a tiny Kandinsky 5 pipeline (fp32, CPU) from a fixed seed."""
    import torch
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        Kandinsky5I2VPipeline,
        Kandinsky5T2VPipeline,
        Kandinsky5Transformer3DModel,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
    )

    qwen_tok = build_qwen_tokenizer()
    clip_tok = build_clip_tokenizer()
    qwen_ids = {t: qwen_tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL}

    torch.manual_seed(0)
    qwen_cfg = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(qwen_tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            rope_parameters={"rope_type": "default", "mrope_section": [2, 2, 4], "rope_theta": 1e6},
            bos_token_id=qwen_ids["<|endoftext|>"],
            eos_token_id=qwen_ids["<|im_end|>"],
            pad_token_id=qwen_ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32, fullatt_block_indexes=[0]
        ),
        image_token_id=qwen_ids["<|image_pad|>"],
        video_token_id=qwen_ids["<|video_pad|>"],
        vision_start_token_id=qwen_ids["<|vision_start|>"],
        vision_end_token_id=qwen_ids["<|vision_end|>"],
    )
    text_encoder = Qwen2_5_VLForConditionalGeneration(qwen_cfg).eval()

    torch.manual_seed(0)
    clip_cfg = CLIPTextConfig(
        vocab_size=len(clip_tok),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=32,
        hidden_act="quick_gelu",
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    text_encoder_2 = CLIPTextModel(clip_cfg).eval()

    torch.manual_seed(0)
    vae = AutoencoderKLHunyuanVideo(
        in_channels=3,
        out_channels=3,
        latent_channels=16,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        norm_num_groups=4,
        scaling_factor=0.476986,
        spatial_compression_ratio=8,
        temporal_compression_ratio=4,
        mid_block_add_attention=True,
    ).eval()

    torch.manual_seed(0)
    transformer = Kandinsky5Transformer3DModel(
        in_visual_dim=16,
        out_visual_dim=16,
        in_text_dim=32,
        in_text_dim2=32,
        time_dim=32,
        patch_size=(1, 2, 2),
        model_dim=48,
        ff_dim=96,
        num_text_blocks=1,
        num_visual_blocks=2,
        axes_dims=(8, 8, 8),
        visual_cond=True,  # as in every real Kandinsky 5 video config (33 input channels)
        attention_type="regular",
    ).eval()
    # adaLN-zero: a random transformer with zero modulation ignores the text entirely.
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _name, module in transformer.named_modules():
            if type(module).__name__ == "Kandinsky5Modulation":
                module.out_layer.weight.normal_(0.0, 0.2, generator=gen)
                module.out_layer.bias.normal_(0.0, 0.2, generator=gen)

    scheduler = FlowMatchEulerDiscreteScheduler(shift=5.0)
    cls = Kandinsky5I2VPipeline if task == "i2v" else Kandinsky5T2VPipeline
    return cls(
        transformer=transformer,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=qwen_tok,
        text_encoder_2=text_encoder_2,
        tokenizer_2=clip_tok,
        scheduler=scheduler,
    )


def build_tiny(dest: Path, task: str) -> Path:
    """Build and save a tiny checkpoint at `dest` (atomically: temp folder + rename)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        build_pipeline(task).save_pretrained(tmp, safe_serialization=True)
        _write_readme(tmp, task)
        try:
            os.rename(tmp, dest)
        except OSError:
            if not is_complete(dest):  # someone else won the race with a complete build: keep theirs
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _write_readme(folder: Path, task: str) -> None:
    (folder / "README.md").write_text(
        f"Tiny random-weight Kandinsky 5 {task.upper()} checkpoint built by k5serve for demo mode and tests.\n"
        "Output is noise. Rebuilt on demand; safe to delete.\n"
    )
    # Record which k5serve-built variant this is (weights list shows it).
    (folder / "k5serve_tiny.json").write_text(json.dumps({"task": task, "tiny": True}) + "\n")


def ensure_tiny(weights_dir: Path, name: str) -> Path:
    """The folder of tiny variant `name` under weights_dir, building it if absent or incomplete."""
    variant = VARIANTS[name]
    if name not in (TINY_T2V, TINY_I2V):
        raise ValueError(f"{name} is not a tiny variant")
    dest = Path(weights_dir) / name
    if is_complete(dest):
        return dest
    if dest.exists():
        shutil.rmtree(dest)
    return build_tiny(dest, variant.task)


def ensure_tiny_family(weights_dir: Path, names: list[str], source: Path) -> list[Path]:
    """Folders for real variant `names` holding the tiny checkpoint at `source`: text encoders,
    tokenizers and VAE hardlinked (copied across filesystems) from one set of files, as the Lite
    and Pro variants share Qwen, CLIP and the VAE, and a transformer of each variant's own (the tiny
    one shifted by 0.01 x its position in `names`). For tests and bench/residency.py."""
    from safetensors.torch import load_file, save_file

    weights = "transformer/diffusion_pytorch_model.safetensors"
    folders = []
    for k, name in enumerate(names):
        dest = Path(weights_dir) / name
        folders.append(dest)
        if is_complete(dest):
            continue
        for path in sorted(Path(source).rglob("*")):
            rel = path.relative_to(source)
            if not path.is_file() or any(part.startswith(".") for part in rel.parts):
                continue
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            if rel.as_posix() == weights:
                state = {key: t + 0.01 * (k + 1) for key, t in load_file(path).items()}
                save_file(state, dest / rel, metadata={"format": "pt"})
            else:
                try:
                    os.link(path, dest / rel)
                except OSError:
                    shutil.copy2(path, dest / rel)
    return folders
