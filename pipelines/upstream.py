"""The diffusers code that pipelines/denoise.py copies, subclasses or leans on, pinned by source hash.

denoise.py re-implements `Kandinsky5Transformer3DModel.forward` and the cross-attention branch of
`Kandinsky5AttnProcessor`, wraps two small layers per sample, and stands in for the transformer
inside the stock pipelines' denoising loop; decode.py runs the VAE's temporal windows one call at
a time. A diffusers upgrade can change any of these without an
error; then the fork would silently compute something other than stock diffusers. So each object
in WATCHED has a hash of its normalised source (or, for `part="signature"`, of its parameter list)
in PINS, read from the diffusers version in PINNED_DIFFUSERS. tests/pipelines/test_fork_pin.py fails when one
of them changes, naming the object and what in k5serve mirrors it.

After an upgrade: read the upstream diff of each object the test names, bring the k5serve code its
message names in line (tests/pipelines/test_fork_pin.py and tests/pipelines/test_pipelines.py
compare the fork with plain diffusers by value, tests/pipelines/test_cfg_batch.py batched with
sequential), then re-pin and widen the diffusers bound in pyproject.toml (docs/performance.md, "The denoising fork"):

    python -m pipelines.upstream            # what changed since the pin (exit status 1 if anything)
    python -m pipelines.upstream --update   # rewrite the PINS block below from the installed diffusers
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import re
import sys
import textwrap
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

_TK = "diffusers.models.transformers.transformer_kandinsky"
_K5 = "diffusers.pipelines.kandinsky5"
_VAE = "diffusers.models.autoencoders.autoencoder_kl_hunyuan_video"
_DECODE = "pipelines/decode.py"
_LOOP = (
    "StepRunner.__call__ and ._same_step (they expect, per step, a conditional call and then one with the "
    "negative embeddings on the same latents and timestep, by keyword)"
)
_STAGES = (
    "; pipelines/generation.py copies its '# 3. Encode input prompt' (encode_prompt) and '# 11. Decode' "
    "(decode_latents) blocks"
)
_SAMPLE = "batched CFG assumes it computes each sample alone"
_TOKEN = "batched CFG's exactness (module docstring) assumes it is per token"


@dataclass(frozen=True)
class Watched:
    """One upstream object and the k5serve code to re-check when it changes."""

    module: str
    qualname: str
    mirror: str  # what in k5serve copies or relies on it
    part: str = "source"  # "source": any change counts; "signature": only its parameters do
    file: str = "pipelines/denoise.py"  # where `mirror` lives

    @property
    def name(self) -> str:
        return f"{self.module}.{self.qualname}"


WATCHED: tuple[Watched, ...] = (
    # Copied.
    Watched(
        _TK,
        "Kandinsky5Transformer3DModel.forward",
        "transformer_forward (a copy, op for op) and StepRunner.__call__ (installed as this forward: same signature)",
    ),
    Watched(
        _TK,
        "Kandinsky5AttnProcessor",
        "MaskedAttnProcessor (a subclass; its __call__ copies the cross-attention branch and adds the key mask); "
        "pipelines/ulysses.py UlyssesAttnProcessor (a subclass; its __call__ copies the self-attention branch "
        "and puts the all-to-all between the RoPE and the nabla mask)",
    ),
    # Wrapped per sample: each must stay a map of every row on its own.
    Watched(_TK, "Kandinsky5Modulation.forward", "_per_sample_class (PerSampleKandinsky5Modulation)"),
    Watched(_TK, "Kandinsky5TimeEmbeddings.forward", "_per_sample_class (PerSampleKandinsky5TimeEmbeddings)"),
    # Called by transformer_forward as the stock forward calls them.
    Watched(
        _TK, "Kandinsky5TextEmbeddings.forward", f"transformer_forward (text per prompt, pooled per sample); {_TOKEN}"
    ),
    Watched(_TK, "Kandinsky5RoPE1D.forward", "transformer_forward (slices text_rope_pos per prompt: 0..n-1)"),
    Watched(_TK, "Kandinsky5RoPE3D.forward", f"transformer_forward; {_SAMPLE}"),
    Watched(_TK, "Kandinsky5VisualEmbeddings.forward", f"transformer_forward; {_SAMPLE}"),
    Watched(_TK, "Kandinsky5OutLayer.forward", f"transformer_forward; {_SAMPLE}"),
    Watched(_TK, "Kandinsky5TransformerEncoderBlock.forward", f"transformer_forward (per prompt); {_TOKEN}"),
    Watched(
        _TK,
        "Kandinsky5TransformerDecoderBlock.forward",
        "transformer_forward (visual loop, MagCache residual); MaskedAttnProcessor (cross_attention is the only "
        "attention given the text); pipelines/ulysses.py (its hooks take the block's positional arguments "
        "(visual, text, time, rope, sparse) and assume every op but the self-attention is per token)",
    ),
    Watched(
        _TK,
        "nablaT_v2",
        "UlyssesAttnProcessor calls it after the all-to-all: exact while the mask is computed per head",
        file="pipelines/ulysses.py",
    ),
    Watched(_TK, "Kandinsky5Attention.forward", "MaskedAttnProcessor.__call__ (called by it: same parameters)"),
    Watched(
        _TK,
        "fractal_flatten",
        "transformer_forward (the MagCache residual is kept in this layout); pipelines/ulysses.py splits the "
        "tokens in this layout (dim 1 of the visual tokens and of the RoPE)",
    ),
    Watched(_TK, "fractal_unflatten", "transformer_forward"),
    Watched("diffusers.models.modeling_outputs", "Transformer2DModelOutput", "StepRunner.__call__ (returns it)"),
    Watched(
        "diffusers.models.attention_dispatch",
        "dispatch_attention_fn",
        "MaskedAttnProcessor.__call__ (calls it with backend=, parallel_config=)",
        part="signature",
    ),
    Watched(
        "diffusers.models.attention",
        "AttentionModuleMixin.set_processor",
        "install_masked_text_attention",
        part="signature",
    ),
    # The denoising loops StepRunner stands inside.
    Watched(f"{_K5}.pipeline_kandinsky", "Kandinsky5T2VPipeline.__call__", _LOOP + _STAGES),
    Watched(f"{_K5}.pipeline_kandinsky_i2v", "Kandinsky5I2VPipeline.__call__", _LOOP + _STAGES),
    # Called by the engine's stages (pipelines/generation.py, negatives.py) with these parameters.
    Watched(
        f"{_K5}.pipeline_kandinsky",
        "Kandinsky5T2VPipeline.encode_prompt",
        "generation.encode_prompt (calls it by keyword)",
        part="signature",
    ),
    Watched(
        f"{_K5}.pipeline_kandinsky_i2v",
        "Kandinsky5I2VPipeline.encode_prompt",
        "generation.encode_prompt (calls it by keyword)",
        part="signature",
    ),
    # Stage 4 decodes the windows diffusers' VAE would decode, one call each (pipelines/decode.py).
    Watched(
        _VAE,
        "AutoencoderKLHunyuanVideo._temporal_tiled_decode",
        "_windowed (its two loops: the same windows, one vae.decode call each, and the same blend) and windows()",
        file=_DECODE,
    ),
    Watched(
        _VAE,
        "AutoencoderKLHunyuanVideo._decode",
        "_windowed (with use_framewise_decoding off, a window takes the branch _temporal_tiled_decode takes)",
        file=_DECODE,
    ),
    Watched(_VAE, "AutoencoderKLHunyuanVideo.decode", "_windowed (one call per window)", file=_DECODE),
    Watched(_VAE, "AutoencoderKLHunyuanVideo.blend_t", "_windowed (blends in place, in order)", file=_DECODE),
)

# BEGIN PINS: written by `python -m pipelines.upstream --update`; edit WATCHED, not this block.
PINNED_DIFFUSERS = "0.42.1"
PINS = {
    "Kandinsky5Transformer3DModel.forward": "ef6b08a7cbd8ebde",
    "Kandinsky5AttnProcessor": "e1a364f09a9ae8b7",
    "Kandinsky5Modulation.forward": "5af74757d18c5bf6",
    "Kandinsky5TimeEmbeddings.forward": "f64d66614d2f8d58",
    "Kandinsky5TextEmbeddings.forward": "5827ee127342b916",
    "Kandinsky5RoPE1D.forward": "c527e9c03b49690f",
    "Kandinsky5RoPE3D.forward": "55303696217000f0",
    "Kandinsky5VisualEmbeddings.forward": "9fc1ed96dd40fe60",
    "Kandinsky5OutLayer.forward": "1bc0caed70087855",
    "Kandinsky5TransformerEncoderBlock.forward": "09a6681327e6a544",
    "Kandinsky5TransformerDecoderBlock.forward": "fb0ddcd56aa385cc",
    "nablaT_v2": "da1e1261b579cf2a",
    "Kandinsky5Attention.forward": "0a64922e1f471ff4",
    "fractal_flatten": "82309ed7d9b5b72b",
    "fractal_unflatten": "29dc6bc6d52f26d2",
    "Transformer2DModelOutput": "84e896a5958f7eb6",
    "dispatch_attention_fn": "0063b1d9951278ce",
    "AttentionModuleMixin.set_processor": "46dd92c6ba76d0a2",
    "Kandinsky5T2VPipeline.__call__": "ccfb5a66cf574c62",
    "Kandinsky5I2VPipeline.__call__": "6454324b95606bff",
    "Kandinsky5T2VPipeline.encode_prompt": "3e1d9ddabbae6fe8",
    "Kandinsky5I2VPipeline.encode_prompt": "3e1d9ddabbae6fe8",
    "AutoencoderKLHunyuanVideo._temporal_tiled_decode": "1fd91766120661f4",
    "AutoencoderKLHunyuanVideo._decode": "f69de76fd2cfb021",
    "AutoencoderKLHunyuanVideo.decode": "823475bd92d55660",
    "AutoencoderKLHunyuanVideo.blend_t": "6e575e0299b36ad2",
}
# END PINS


def normalise(source: str) -> str:
    """Source text as hashed: dedented, trailing whitespace and surrounding blank lines dropped."""
    return "\n".join(line.rstrip() for line in textwrap.dedent(source).strip("\n").splitlines())


def fingerprint(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def installed_text(w: Watched) -> str | None:
    """The installed diffusers' text for `w` (normalised source or parameter list); None if it is gone."""
    try:
        obj = importlib.import_module(w.module)
        for attr in w.qualname.split("."):
            obj = getattr(obj, attr)
    except (ImportError, AttributeError):
        return None
    if w.part == "signature":
        params = inspect.signature(obj).parameters.values()
        return "\n".join(f"{p.name} {p.kind.name} {p.default!r}" for p in params)
    return normalise(inspect.getsource(obj))


def drift(texts: dict[str, str | None], pins: dict[str, str] = PINS, installed_version: str | None = None) -> list[str]:
    """One message per watched object whose text (keyed by qualname) no longer matches its pin."""
    installed_version = installed_version or version("diffusers")
    problems = []
    for w in WATCHED:
        text = texts.get(w.qualname)
        pinned = pins.get(w.qualname)
        if pinned is None:
            change = "has no pin"
        elif text is None:
            change = "is gone"
        elif fingerprint(text) != pinned:
            change = "changed" if w.part == "source" else "changed its parameters"
        else:
            continue
        problems.append(
            f"{w.name} {change} (pinned from diffusers {PINNED_DIFFUSERS}, installed {installed_version}): "
            f"re-check in {w.file}: {w.mirror}; then re-pin with `python -m pipelines.upstream --update`"
        )
    return problems


def installed_drift() -> list[str]:
    """drift() against the installed diffusers."""
    return drift({w.qualname: installed_text(w) for w in WATCHED})


def bound_problem(requirement: str, installed_version: str) -> str | None:
    """Why `requirement` (pyproject's diffusers line) does not cover the tested version, or None."""
    from packaging.requirements import Requirement

    spec = Requirement(requirement).specifier
    if not any(s.operator in ("<", "<=", "==", "~=", "===") for s in spec):
        return f"pyproject.toml's {requirement!r} has no upper bound: add the tested one (see pipelines/upstream.py)"
    if not spec.contains(installed_version, prereleases=True):
        return (
            f"installed diffusers {installed_version} is outside pyproject.toml's {requirement!r}: the denoising "
            f"fork (pipelines/denoise.py) was checked against {PINNED_DIFFUSERS}; install a version in the "
            "bound, or review the upgrade (python -m pipelines.upstream) and widen the bound"
        )
    return None


def _pins_block() -> str:
    lines = [f'PINNED_DIFFUSERS = "{version("diffusers")}"', "PINS = {"]
    for w in WATCHED:
        text = installed_text(w)
        if text is None:
            raise SystemExit(f"{w.name} is not in the installed diffusers: update WATCHED first")
        lines.append(f'    "{w.qualname}": "{fingerprint(text)}",')
    return "\n".join([*lines, "}"])


def main(argv: list[str]) -> int:
    if argv == ["--update"]:
        path = Path(__file__)
        block = re.compile(r"^(# BEGIN PINS[^\n]*\n).*?(\n# END PINS)$", re.S | re.M)
        path.write_text(block.sub(lambda m: m.group(1) + _pins_block() + m.group(2), path.read_text(), count=1))
        print(f"re-pinned {len(WATCHED)} objects from diffusers {version('diffusers')} in {path}")
        return 0
    if argv:
        print(__doc__)
        return 2
    problems = installed_drift()
    print("\n".join(problems) or f"all {len(WATCHED)} pinned objects match diffusers {version('diffusers')}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
