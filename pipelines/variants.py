"""The Kandinsky 5 variant catalogue and the public model ids that route to it.

Data only, no torch: the server imports this to validate requests at the edge.
Facts come from the official configs and the diffusers model cards
(see ../shared/reference/kandinsky_model.md §1.2-1.3).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

FPS = 24

# Official default negative prompt (kandinsky-5 configs, diffusers pipeline default).
DEFAULT_NEGATIVE_PROMPT = (
    "Static, 2D cartoon, cartoon, 2d animation, paintings, images, worst quality, low quality, "
    "ugly, deformed, walking backwards"
)

Size = tuple[int, int]  # (width, height)

SD_SIZES: tuple[Size, ...] = ((768, 512), (512, 512), (512, 768))
HD_SIZES: tuple[Size, ...] = ((1280, 768), (1024, 1024), (768, 1280))
ASPECT_RATIOS: dict[str, int] = {"3:2": 0, "1:1": 1, "2:3": 2}  # index into SD_SIZES / HD_SIZES

# Demo (tiny) variants: anything divisible by 16 up to this, see design.md "Demo mode".
DEMO_MAX_SIDE = 256
DEMO_MAX_FRAMES = 25


def frames_for_seconds(seconds: int) -> int:
    """5 s -> 121 frames, 10 s -> 241 frames (seconds*24//4 latent frames + 1, x4 - 3)."""
    return seconds * FPS + 1


# The nabla fields of the T2V-Pro-sft-5s-Diffusers transformer config (kandinsky_model.md §3): sparse
# attention with threshold P, OR-ed with an STA window of wT x wH x wW blocks.
NABLA_TRANSFORMER_CONFIG = dict(
    attention_type="nabla",
    attention_causal=False,
    attention_local=False,
    attention_glob=False,
    attention_window=3,
    attention_P=0.8,
    attention_wT=11,
    attention_wW=3,
    attention_wH=3,
    attention_add_sta=True,
    attention_method="topcdf",
)


@dataclass(frozen=True)
class Variant:
    name: str
    task: Literal["t2v", "i2v"]
    family: Literal["lite", "pro", "tiny"]
    repo_id: str | None  # Hugging Face repo in diffusers format; None for the demo variants
    steps: int
    guidance: float
    seconds: int  # the clip length the checkpoint was trained for
    sizes: tuple[Size, ...] | None  # allowed (width, height); None = any multiple of 16 up to DEMO_MAX_SIDE
    attention: Literal["regular", "nabla"] = "regular"  # nabla needs the flex backend, sizes % 128
    fps: int = FPS
    notes: str = ""
    aliases: tuple[str, ...] = field(default=())

    @property
    def demo(self) -> bool:
        return self.family == "tiny"

    @property
    def pipeline_class(self) -> str:
        return "Kandinsky5I2VPipeline" if self.task == "i2v" else "Kandinsky5T2VPipeline"

    @property
    def max_frames(self) -> int:
        return DEMO_MAX_FRAMES if self.demo else frames_for_seconds(self.seconds)

    @property
    def default_size(self) -> Size:
        return self.sizes[0] if self.sizes else (DEMO_MAX_SIDE, DEMO_MAX_SIDE * 2 // 3 // 16 * 16)

    @property
    def download_command(self) -> str:
        return f"k5serve weights download {self.name}"


def _lite_t2v(kind: str, seconds: int, steps: int, guidance: float, repo_kind: str) -> Variant:
    return Variant(
        name=f"kandinsky5-lite-t2v-{kind}-{seconds}s",
        task="t2v",
        family="lite",
        repo_id=f"kandinskylab/Kandinsky-5.0-T2V-Lite-{repo_kind}-{seconds}s-Diffusers",
        steps=steps,
        guidance=guidance,
        seconds=seconds,
        sizes=SD_SIZES,
        # 10 s Lite configs use NABLA P=0.9 (official yaml); 5 s use full attention.
        attention="nabla" if seconds == 10 else "regular",
    )


_CATALOGUE: list[Variant] = [
    _lite_t2v("sft", 5, 50, 5.0, "sft"),
    _lite_t2v("sft", 10, 50, 5.0, "sft"),
    _lite_t2v("nocfg", 5, 50, 1.0, "nocfg"),
    _lite_t2v("nocfg", 10, 50, 1.0, "nocfg"),
    _lite_t2v("distilled", 5, 16, 1.0, "distilled16steps"),
    _lite_t2v("distilled", 10, 16, 1.0, "distilled16steps"),
    _lite_t2v("pretrain", 5, 50, 5.0, "pretrain"),
    _lite_t2v("pretrain", 10, 50, 5.0, "pretrain"),
    Variant(
        name="kandinsky5-lite-i2v-5s",
        task="i2v",
        family="lite",
        repo_id="kandinskylab/Kandinsky-5.0-I2V-Lite-5s-Diffusers",
        steps=50,
        guidance=5.0,
        seconds=5,
        sizes=SD_SIZES,
    ),
    # Pro: the diffusers transformer config says attention_type "nabla" (P=0.8) even at 5 s SD
    # (NABLA_TRANSFORMER_CONFIG).
    Variant(
        name="kandinsky5-pro-t2v-sft-5s",
        task="t2v",
        family="pro",
        repo_id="kandinskylab/Kandinsky-5.0-T2V-Pro-sft-5s-Diffusers",
        steps=50,
        guidance=5.0,
        seconds=5,
        sizes=SD_SIZES + HD_SIZES,
        attention="nabla",
    ),
    Variant(
        name="kandinsky5-pro-t2v-distilled-5s",
        task="t2v",
        family="pro",
        repo_id="kandinskylab/Kandinsky-5.0-T2V-Pro-distilled-5s-Diffusers",
        steps=16,
        guidance=1.0,
        seconds=5,
        sizes=SD_SIZES + HD_SIZES,
        attention="nabla",
        notes="16 steps / guidance 1.0 are the third-party defaults (no model card found)",
    ),
    Variant(
        name="kandinsky5-pro-i2v-sft-5s",
        task="i2v",
        family="pro",
        repo_id="kandinskylab/Kandinsky-5.0-I2V-Pro-sft-5s-Diffusers",
        steps=50,
        guidance=5.0,
        seconds=5,
        sizes=SD_SIZES + HD_SIZES,
        attention="nabla",
    ),
    Variant(
        name="kandinsky5-pro-i2v-distilled-5s",
        task="i2v",
        family="pro",
        repo_id="kandinskylab/Kandinsky-5.0-I2V-Pro-distilled-5s-Diffusers",
        steps=16,
        guidance=1.0,
        seconds=5,
        sizes=SD_SIZES + HD_SIZES,
        attention="nabla",
        notes="16 steps / guidance 1.0 are the third-party defaults (no model card found)",
    ),
    Variant(
        name="kandinsky5-tiny-t2v",
        task="t2v",
        family="tiny",
        repo_id=None,
        steps=30,
        guidance=5.0,
        seconds=1,
        sizes=None,
        notes="random weights, built by k5serve for demo mode and tests",
    ),
    Variant(
        name="kandinsky5-tiny-i2v",
        task="i2v",
        family="tiny",
        repo_id=None,
        steps=30,
        guidance=5.0,
        seconds=1,
        sizes=None,
        notes="random weights, built by k5serve for demo mode and tests",
    ),
]

VARIANTS: dict[str, Variant] = {v.name: v for v in _CATALOGUE}
TINY_T2V = "kandinsky5-tiny-t2v"
TINY_I2V = "kandinsky5-tiny-i2v"

# The I2V model that continues a clip (extensions, clips longer than one pass: pipelines/extension.py)
# and the T2V model a video-to-video of an image-to-video clip runs on, per family and kind.
_CONTINUED_BY = {"lite": "kandinsky5-lite-i2v-5s", "tiny": TINY_I2V}
_PRO_I2V = {"distilled": "kandinsky5-pro-i2v-distilled-5s", "sft": "kandinsky5-pro-i2v-sft-5s"}
_T2V_OF = {
    "kandinsky5-lite-i2v-5s": "kandinsky5-lite-t2v-sft-5s",
    "kandinsky5-pro-i2v-sft-5s": "kandinsky5-pro-t2v-sft-5s",
    "kandinsky5-pro-i2v-distilled-5s": "kandinsky5-pro-t2v-distilled-5s",
    TINY_I2V: TINY_T2V,
}


def continuation_variant(variant: Variant) -> Variant:
    """The image-to-video variant that continues `variant`'s clips from their last frame: itself for
    an I2V variant, else its family's (Pro distilled by Pro distilled, other Pro by Pro sft)."""
    if variant.task == "i2v":
        return variant
    if variant.family == "pro":
        return VARIANTS[_PRO_I2V["distilled" if "distilled" in variant.name else "sft"]]
    return VARIANTS[_CONTINUED_BY[variant.family]]


def text_variant(variant: Variant) -> Variant:
    """The text-to-video variant of `variant`'s family: itself for T2V (video-to-video runs on T2V)."""
    return variant if variant.task == "t2v" else VARIANTS[_T2V_OF[variant.name]]


@dataclass(frozen=True)
class PublicModel:
    """A model id some cloud contract uses, and how it picks a variant."""

    id: str
    by_seconds: dict[int, str]  # clip length in seconds -> variant name
    steps: int | None = None  # contract default steps (None: the variant's own)
    guidance: float | None = None  # contract default guidance (None: the variant's own)


_LITE_SFT = {5: "kandinsky5-lite-t2v-sft-5s", 10: "kandinsky5-lite-t2v-sft-10s"}
_LITE_DISTILLED = {5: "kandinsky5-lite-t2v-distilled-5s", 10: "kandinsky5-lite-t2v-distilled-10s"}

_PUBLIC: list[PublicModel] = [
    PublicModel("fal-ai/kandinsky5-pro/text-to-video", {5: "kandinsky5-pro-t2v-sft-5s"}, steps=28),
    PublicModel("fal-ai/kandinsky5-pro/image-to-video", {5: "kandinsky5-pro-i2v-sft-5s"}, steps=28),
    PublicModel("fal-ai/kandinsky5/text-to-video", _LITE_SFT, steps=30),
    PublicModel("fal-ai/kandinsky5/text-to-video/distill", _LITE_DISTILLED, steps=16, guidance=1.0),
    PublicModel("sber-ai/kandinsky5-t2v", _LITE_SFT, steps=30),
    # AI/ML API documents 30 steps for the distilled model too; requested steps are honoured.
    PublicModel("sber-ai/kandinsky5-distill-t2v", _LITE_DISTILLED, steps=30, guidance=1.0),
    PublicModel("kandinsky5-text-to-video", _LITE_SFT, steps=30),
    PublicModel("kandinsky5", _LITE_SFT, steps=30),
    PublicModel("kandinsky-5-text-to-video", _LITE_SFT, steps=30),
    PublicModel("kandinsky5-t2v", _LITE_SFT, steps=30),
]
PUBLIC_MODELS: dict[str, PublicModel] = {m.id: m for m in _PUBLIC}


# Other servers' model names -> the variant each stands for (docs/sora.md). OpenAI's Sora names and
# their dated snapshots: the fast one to Lite, the pro one to Pro; a request's length and image move
# it to a sibling (`family`). K5SERVE_MODEL_ALIASES adds names or overrides these, for every contract.
DEFAULT_ALIASES: dict[str, str] = {
    "sora-2": "kandinsky5-lite-t2v-sft-5s",
    "sora-2-2025-10-06": "kandinsky5-lite-t2v-sft-5s",
    "sora-2-2025-12-08": "kandinsky5-lite-t2v-sft-5s",
    "sora-2-pro": "kandinsky5-pro-t2v-sft-5s",
    "sora-2-pro-2025-10-06": "kandinsky5-pro-t2v-sft-5s",
}


def parse_aliases(text: str | None) -> dict[str, str]:
    """'name=variant,name2=variant2' -> {name: variant}. Raises ValueError naming a bad entry."""
    aliases: dict[str, str] = {}
    for entry in (text or "").split(","):
        if not entry.strip():
            continue
        name, sep, target = (part.strip() for part in entry.partition("="))
        if not sep or not name or not target:
            raise ValueError(f"model alias {entry.strip()!r} is not name=variant")
        if target not in VARIANTS:
            raise ValueError(
                f"model alias {name!r} names {target!r}, which is no variant; known: {', '.join(VARIANTS)}"
            )
        aliases[name] = target
    return aliases


# Attention heads of each family's transformer: model_dim / head_dim, head_dim = sum(axes_dims)
# (kandinsky_model.md §3; pipelines/tiny.py for the demo model). Ulysses sequence parallelism
# (pipelines/ulysses.py) gives each rank heads / degree whole heads.
ATTENTION_HEADS = {
    "lite": 1792 // (16 + 24 + 24),  # 28
    "pro": 4096 // (32 + 48 + 48),  # 32
    "tiny": 48 // (8 + 8 + 8),  # 2
}


MAX_SP_DEGREE = 8  # GPUs in one node (one NVLink island): a group never spans nodes


def valid_sp_degrees(name: str) -> list[int]:
    """Sequence-parallel degrees variant `name` can run with: the divisors of its heads up to
    MAX_SP_DEGREE, 1 excluded (Lite 28 heads -> 2, 4, 7; Pro 32 -> 2, 4, 8; tiny 2 -> 2)."""
    heads = ATTENTION_HEADS[VARIANTS[name].family]
    return [d for d in range(2, min(heads, MAX_SP_DEGREE) + 1) if heads % d == 0]


def sp_degree_problem(names: list[str], degree: int) -> str | None:
    """Why a group of `degree` devices cannot serve the variants `names` (None: it can), naming the
    valid degrees: the start-up refusal and the admission refusal say this."""
    if degree == 1:
        return None
    for name in names:
        valid = valid_sp_degrees(name)
        if degree not in valid:
            heads = ATTENTION_HEADS[VARIANTS[name].family]
            return (
                f"sequence-parallel degree {degree} does not fit {name} ({heads} attention heads, split "
                f"evenly across the devices of a group); valid degrees: {', '.join(map(str, valid))}"
            )
    return None


def known_model_ids() -> list[str]:
    return sorted(PUBLIC_MODELS) + sorted(VARIANTS)


def _kind(v: Variant) -> str:
    """'sft', 'distilled', ... from the name ('' for kandinsky5-lite-i2v-5s, the one Lite I2V)."""
    return v.name.removeprefix(f"kandinsky5-{v.family}-{v.task}").removesuffix(f"-{v.seconds}s").strip("-")


def family(v: Variant, task: str) -> list[Variant]:
    """The variants a request for `v` may move to for `task` and its length, shortest clip first:
    `v`'s family and kind (Lite sft 5 s -> Lite sft 5 s, 10 s), else its family's only kind for that
    task (Lite distilled, with an image -> the Lite I2V)."""
    same = [w for w in VARIANTS.values() if w.family == v.family and w.task == task]
    kin = [w for w in same if _kind(w) == _kind(v)] or same
    return sorted(kin, key=lambda w: w.seconds)


def for_frames(members: list[Variant], frames: int) -> Variant:
    """The shortest of `members` that makes `frames` in one pass, else the longest (whose clips a
    longer request is made of, by chained extension)."""
    return next((w for w in members if w.max_frames >= frames), members[-1])


def fit_size(v: Variant, width: int, height: int) -> Size:
    """(width, height) as `v` makes it: the size itself where `v` allows it, else the allowed size
    nearest in aspect (then area) with the same orientation. Never enlarged past what `v` allows."""
    import math

    if v.sizes is None:  # the tiny demo variants: any multiple of 16 up to DEMO_MAX_SIDE
        if width % 16 == 0 and height % 16 == 0 and max(width, height) <= DEMO_MAX_SIDE:
            return width, height
        return demo_size(width, height)
    if (width, height) in v.sizes:
        return width, height
    orientation = (width > height) - (width < height)
    same = [s for s in v.sizes if (s[0] > s[1]) - (s[0] < s[1]) == orientation] or list(v.sizes)
    aspect, area = math.log(width / height), math.log(width * height)
    return min(same, key=lambda s: (abs(math.log(s[0] / s[1]) - aspect), abs(math.log(s[0] * s[1]) - area)))


def resolve_model(
    model_id: str, seconds: int | None = None, aliases: Mapping[str, str] | None = None
) -> tuple[Variant, PublicModel | None]:
    """Map a public id, a local variant name or an alias (`aliases`: name -> variant) (+ clip length)
    to a variant. An alias with a length its variant does not make picks the sibling that does.

    Raises KeyError for an unknown id and ValueError for a clip length the model cannot do.
    """
    if aliases and model_id in aliases and model_id not in VARIANTS:
        v = VARIANTS[aliases[model_id]]
        if seconds is None or v.demo or seconds == v.seconds:
            return v, None
        sibling = next((w for w in family(v, v.task) if w.seconds == seconds), None)
        if sibling is None:
            raise ValueError(f"duration {seconds}s is not available for {model_id} ({v.name} makes {v.seconds}s clips)")
        return sibling, None
    if model_id in VARIANTS:
        v = VARIANTS[model_id]
        if seconds is not None and not v.demo and seconds != v.seconds:
            raise ValueError(f"duration {seconds}s is not available for {model_id} (it makes {v.seconds}s clips)")
        return v, None
    public = PUBLIC_MODELS.get(model_id)
    if public is None:
        raise KeyError(model_id)
    secs = seconds if seconds is not None else min(public.by_seconds)
    if secs not in public.by_seconds:
        allowed = ", ".join(f"{s}s" for s in sorted(public.by_seconds))
        raise ValueError(f"duration {secs}s is not available for {model_id}; allowed: {allowed}")
    return VARIANTS[public.by_seconds[secs]], public


def size_for_aspect(aspect_ratio: str, hd: bool = False) -> Size:
    """'3:2' -> (768, 512); with hd=True the official HD bucket (1280, 768)."""
    if aspect_ratio not in ASPECT_RATIOS:
        raise ValueError(f"aspect_ratio {aspect_ratio!r} is not one of {', '.join(ASPECT_RATIOS)}")
    return (HD_SIZES if hd else SD_SIZES)[ASPECT_RATIOS[aspect_ratio]]


def nearest_size(sizes: tuple[Size, ...], width: int, height: int) -> Size:
    """The allowed size whose aspect ratio is closest to width/height (I2V sizes follow the image)."""
    import math

    target = math.log(width / height)
    return min(sizes, key=lambda s: (abs(math.log(s[0] / s[1]) - target), -s[0] * s[1]))


def demo_size(width: int, height: int) -> Size:
    """Scale a requested size down to the demo cap, keeping the aspect, multiples of 16."""
    scale = min(1.0, DEMO_MAX_SIDE / max(width, height))
    return max(16, int(width * scale) // 16 * 16), max(16, int(height * scale) // 16 * 16)


def demo_frames(num_frames: int, task: str) -> int:
    frames = min(num_frames, DEMO_MAX_FRAMES)
    if task == "i2v":
        frames = max(frames, 17)  # the I2V pipeline needs >= 17 frames (see request.py)
    return frames
