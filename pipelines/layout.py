"""The diffusers folder layout of a Kandinsky 5 checkpoint, and what a complete one contains.

Torch-free: used by the loader, `k5serve weights list|verify` and demo-mode detection.
"""

from __future__ import annotations

import json
from pathlib import Path

# Components the Kandinsky 5 video pipelines need (model_index.json keys), with the files
# each must hold. A weights file may be sharded (`*.safetensors.index.json` + shards).
COMPONENTS: dict[str, tuple[str, ...]] = {
    "transformer": ("config.json", "diffusion_pytorch_model*.safetensors"),
    "vae": ("config.json", "diffusion_pytorch_model*.safetensors"),
    "text_encoder": ("config.json", "model*.safetensors"),
    "text_encoder_2": ("config.json", "model*.safetensors"),
    "tokenizer": ("tokenizer*",),
    "tokenizer_2": ("tokenizer*",),
    "scheduler": ("scheduler_config.json",),
}


def variant_dir(weights_dir: Path, name: str) -> Path:
    return Path(weights_dir) / name


def missing_parts(folder: Path) -> list[str]:
    """Names of what is missing from a checkpoint folder; [] when complete."""
    folder = Path(folder)
    if not folder.is_dir():
        return [f"the folder {folder}"]
    index = folder / "model_index.json"
    if not index.is_file():
        return ["model_index.json"]
    try:
        declared = json.loads(index.read_text())
    except (OSError, ValueError):
        return ["a readable model_index.json"]
    missing = []
    for component, patterns in COMPONENTS.items():
        if component not in declared:
            missing.append(f"model_index.json entry '{component}'")
            continue
        sub = folder / component
        for pattern in patterns:
            if not any(sub.glob(pattern)):
                missing.append(f"{component}/{pattern}")
    return missing


def is_complete(folder: Path) -> bool:
    return not missing_parts(folder)
