"""Content ids of a checkpoint's components: which text encoders, tokenizers and VAEs are the same
bytes in several variant folders, so the engine loads them once per device (residency.py).

Torch-free. A component's id is a SHA-256 over its files (their names inside the component folder,
sizes and contents), never its variant's or repo's name: Lite sft, nocfg, distilled and Pro ship
the same Qwen2.5-VL, CLIP and VAE under different repos. Hashing Qwen's 16 GB takes a while, so
each folder keeps its ids beside the weights (`<variant>/.k5serve/content-ids.json`, with each
file's size and mtime: an id is reused only while they match) and, within a process, files that
are hardlinks of one another (`weights download --from`, or the same file in several folders) are
hashed once. `k5serve weights verify` records them (weights.py), so serving never waits for it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from .layout import COMPONENTS

log = logging.getLogger(__name__)

CACHE = Path(".k5serve") / "content-ids.json"  # inside the variant folder
SHARED = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae")  # shared when identical
_CHUNK = 8 * 2**20

# (st_dev, st_ino, size, mtime_ns) -> sha256 hex of one file: hardlinks are hashed once per process
_file_digests: dict[tuple[int, int, int, int], str] = {}


def component_files(folder: Path) -> list[Path]:
    """The regular files of one component folder, sorted, hidden ones (caches) left out."""
    files = []
    for path in sorted(Path(folder).rglob("*")):
        rel = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") for part in rel.parts):
            files.append(path)
    return files


def _signature(folder: Path, files: list[Path]) -> list[list]:
    out = []
    for path in files:
        st = path.stat()
        out.append([path.relative_to(folder).as_posix(), st.st_size, st.st_mtime_ns])
    return out


def _file_digest(path: Path) -> str:
    st = path.stat()
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    digest = _file_digests.get(key)
    if digest is None:
        h = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        digest = _file_digests[key] = h.hexdigest()
    return digest


def hash_component(folder: Path) -> str:
    """'sha256:<hex>' over the component's files: relative name, size and content of each."""
    h = hashlib.sha256()
    for path in component_files(folder):
        rel = path.relative_to(folder).as_posix()
        h.update(f"{rel}\0{path.stat().st_size}\0{_file_digest(path)}\n".encode())
    return "sha256:" + h.hexdigest()


def content_ids(variant_folder: Path, components: tuple[str, ...] | None = None) -> dict[str, str]:
    """{component: content id} of a checkpoint folder, from its cache where the files are unchanged.

    The cache is rewritten when an id was (re)computed; a read-only folder just is not cached."""
    variant_folder = Path(variant_folder)
    cache_path = variant_folder / CACHE
    try:
        cached = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cached = {}
    ids, changed = {}, False
    for component in components or tuple(COMPONENTS):
        folder = variant_folder / component
        if not folder.is_dir():
            continue
        signature = _signature(folder, component_files(folder))
        entry = cached.get(component)
        if isinstance(entry, dict) and entry.get("files") == signature and entry.get("id"):
            ids[component] = entry["id"]
            continue
        log.info("hashing %s of %s once (its content id, for sharing between variants)", component, variant_folder)
        ids[component] = hash_component(folder)
        cached[component] = {"id": ids[component], "files": signature}
        changed = True
    if changed:
        try:
            cache_path.parent.mkdir(exist_ok=True)
            tmp = cache_path.with_name(cache_path.name + f".{os.getpid()}")
            tmp.write_text(json.dumps(cached, indent=1) + "\n")
            os.replace(tmp, cache_path)
        except OSError:
            pass  # read-only weights: hash again next start
    return ids
