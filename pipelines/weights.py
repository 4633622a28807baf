"""`k5serve weights list|download|verify`: get Kandinsky 5 checkpoints and check them.

Torch-free (the CLI stays fast and the checks run anywhere). Checkpoints live in
`<weights-dir>/<variant-name>/` in the diffusers folder layout (see layout.py).

- download: `huggingface_hub.snapshot_download` into that folder, only the files the pipeline
  loads (each component of layout.COMPONENTS + model_index.json); resumable, honours HF_TOKEN
  and HF_ENDPOINT. `--from DIR` imports a folder copied by hand instead (air-gapped sites).
- verify: every component present, every json parses, every safetensors header is readable and
  agrees with the file size, sharded index files point at shards that hold their tensors.

Files are left exactly as downloaded: the real repos declare the tokenizer as
`["transformers", "Qwen2VLProcessor"]`, which cannot load without torchvision, and the loader
(loader.py) deals with that by loading the components one by one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import sys
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

from .layout import COMPONENTS, missing_parts, variant_dir
from .variants import PUBLIC_MODELS, VARIANTS, Variant

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
DEFAULT_ENDPOINT = "https://huggingface.co"

# Approximate download size per family, GB. Derived from the parameter counts in
# kandinsky_model.md §3 (bf16): DiT Lite 2.0 B -> 4.0, Pro 19.3 B -> 38.6; Qwen2.5-VL-7B 8.3 B
# -> 16.6; CLIP text 123 M -> 0.25; HunyuanVideo VAE 246 M -> 0.5.
APPROX_GB = {"lite": 4.0 + 16.6 + 0.25 + 0.5, "pro": 38.6 + 16.6 + 0.25 + 0.5}

# What a component folder may hold that the pipeline reads, besides the weight patterns of
# layout.COMPONENTS: configs, index files, generation/tokenizer/processor configs, BPE files,
# chat templates. Everything else (READMEs, images, .gitattributes, original-format or
# PyTorch-pickle checkpoints at the repo root or as *.bin) is not fetched.
_AUX_PATTERNS = ("*.json", "*.txt", "*.jinja", "*.model")
# Hidden files and folders (e.g. a stray transformer/.ipynb_checkpoints/) are never fetched.
IGNORE_PATTERNS = [".*", "*/.*"]
# hf_hub keeps its resume metadata in <local_dir>/.cache/huggingface: never ours to check or copy;
# .k5serve holds the content ids k5serve records (content.py).
_SKIP_DIRS = {".cache", ".git", ".k5serve"}

# safetensors dtype -> bytes per element (F4/F6 etc. are packed: skipped in the size check).
_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8, "C64": 8,
}  # fmt: skip
_MAX_HEADER = 100_000_000  # the safetensors format's own limit


def allow_patterns() -> list[str]:
    """Repo paths `download` fetches: model_index.json and each component's files."""
    patterns = ["model_index.json"]
    for component, files in COMPONENTS.items():
        patterns += [f"{component}/{p}" for p in files]
        patterns += [f"{component}/{p}" for p in _AUX_PATTERNS if f"{component}/{p}" not in patterns]
    return patterns


def wanted(path: str) -> bool:
    """Whether a repo-relative POSIX path is one the pipeline needs (same rule as the hub's filter)."""
    return any(fnmatchcase(path, p) for p in allow_patterns()) and not any(
        fnmatchcase(path, p) for p in IGNORE_PATTERNS
    )


# ---------------------------------------------------------------------------------------------
# list


@dataclass(frozen=True)
class Row:
    name: str
    status: str
    size: str
    repo: str
    serves: list[str]


def served_ids(variant: Variant) -> list[str]:
    if variant.demo:
        return ["all ids, in demo mode"]
    return [m.id for m in PUBLIC_MODELS.values() if variant.name in m.by_seconds.values()]


def folder_size(folder: Path) -> int:
    """Bytes of the regular files under folder (the hub's resume metadata included)."""
    total = 0
    for root, _dirs, files in os.walk(folder):
        for f in files:
            p = Path(root) / f
            if p.is_file() and not p.is_symlink():
                total += p.stat().st_size
    return total


def human_size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def variant_rows(weights_dir: Path) -> list[Row]:
    rows = []
    for v in VARIANTS.values():
        folder = variant_dir(weights_dir, v.name)
        missing = missing_parts(folder)
        if not folder.is_dir():
            status = "not built (demo)" if v.demo else "absent"
        elif not missing:
            status = "built (demo)" if v.demo else "present"
        else:
            status = f"incomplete ({len(missing)} missing)"
        size = human_size(folder_size(folder)) if folder.is_dir() else "-"
        repo = v.repo_id or "(built locally)"
        rows.append(Row(v.name, status, size, repo, served_ids(v) or ["(its local name only)"]))
    return rows


def format_table(rows: list[Row]) -> str:
    """Fixed-width table; a variant serving several public ids takes one line per id."""
    head = Row("VARIANT", "STATUS", "SIZE", "HF REPO", ["SERVES"])
    cols = ("name", "status", "size", "repo")
    widths = {c: max(len(getattr(r, c)) for r in [head, *rows]) for c in cols}

    def line(r: Row, first: bool, serve: str) -> str:
        padded = [(getattr(r, c) if first else "").ljust(widths[c]) for c in cols]
        return "  ".join([*padded, serve]).rstrip()

    out = [line(head, True, "SERVES")]
    for r in rows:
        out += [line(r, i == 0, s) for i, s in enumerate(r.serves)]
    return "\n".join(out)


def cmd_list(weights_dir: Path) -> int:
    print(f"Weights folder: {weights_dir.resolve()}")
    print(format_table(variant_rows(weights_dir)))
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# verify


class CheckpointError(Exception):
    """One problem with one file; the message names the file."""


def read_safetensors_header(path: Path) -> dict:
    """Parse the header of a .safetensors file and check it against the file size, without torch.

    Format: 8-byte little-endian header length N, N bytes of JSON {tensor: {dtype, shape,
    data_offsets: [begin, end]}, "__metadata__": {...}}, then the data; offsets are relative to
    the data start, so the file is exactly 8 + N + (largest end offset) bytes.
    """
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{size} bytes: too short to hold the 8-byte header length")
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER or 8 + n > size:
            raise CheckpointError(f"header length {n} does not fit in a {size}-byte file (truncated?)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, ValueError) as exc:
            raise CheckpointError(f"header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError("header is not a JSON object")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = info["data_offsets"]
            dtype, shape = info["dtype"], info["shape"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"tensor {name!r}: entry lacks dtype/shape/data_offsets") from None
        if not (isinstance(begin, int) and isinstance(stop, int) and 0 <= begin <= stop):
            raise CheckpointError(f"tensor {name!r}: bad data_offsets {info['data_offsets']}")
        if dtype in _DTYPE_BYTES:
            count = 1
            for dim in shape:
                count *= dim
            if stop - begin != count * _DTYPE_BYTES[dtype]:
                raise CheckpointError(
                    f"tensor {name!r}: {dtype}{list(shape)} needs {count * _DTYPE_BYTES[dtype]} bytes, "
                    f"data_offsets give {stop - begin}"
                )
        end = max(end, stop)
    expected = 8 + n + end
    if expected != size:
        what = "truncated" if size < expected else "has trailing bytes"
        raise CheckpointError(f"{what}: the header says {expected} bytes, the file has {size}")
    return header


def _files(folder: Path, suffix: str) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob(f"*{suffix}")
        if p.is_file() and not _SKIP_DIRS.intersection(p.relative_to(folder).parts)
    )


def verify_folder(folder: Path) -> tuple[list[str], list[str]]:
    """Check a checkpoint folder. Returns (what was checked and is fine, problems)."""
    folder = Path(folder)
    if not folder.is_dir():
        return [], [f"{folder}: no such folder"]
    ok: list[tuple[str, str]] = []  # (path, what was checked), sorted by path at the end
    problems = [f"missing: {part}" for part in missing_parts(folder)]

    def rel(p: Path) -> str:
        return p.relative_to(folder).as_posix()

    for path in _files(folder, ".json"):
        try:
            json.loads(path.read_text(encoding="utf-8"))
            ok.append((rel(path), "valid JSON"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            problems.append(f"{rel(path)}: not valid JSON ({exc})")

    headers: dict[Path, dict] = {}
    for path in _files(folder, ".safetensors"):
        try:
            headers[path] = read_safetensors_header(path)
            tensors = sum(1 for k in headers[path] if k != "__metadata__")
            ok.append((rel(path), f"{tensors} tensors, {human_size(path.stat().st_size)}"))
        except (OSError, CheckpointError) as exc:
            problems.append(f"{rel(path)}: {exc}")

    for index in _files(folder, ".safetensors.index.json"):
        problems += _check_index(index, headers, rel)
    return [f"{path}: {what}" for path, what in sorted(ok)], problems


def _check_index(index: Path, headers: dict[Path, dict], rel) -> list[str]:
    """A sharded checkpoint's index: every shard it names exists and holds the tensors it maps."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError):
        return [f"{rel(index)}: no readable weight_map"]
    problems = []
    by_shard: dict[str, list[str]] = {}
    for tensor, shard in weight_map.items():
        by_shard.setdefault(shard, []).append(tensor)
    for shard, tensors in sorted(by_shard.items()):
        path = index.parent / shard
        if not path.is_file():
            problems.append(f"{rel(index)}: shard {shard} is missing")
        elif path in headers:
            absent = [t for t in tensors if t not in headers[path]]
            if absent:
                problems.append(f"{rel(index)}: {shard} lacks {len(absent)} tensors, e.g. {absent[0]!r}")
    return problems


def report_verify(variant: Variant, folder: Path) -> int:
    ok, problems = verify_folder(folder)
    print(f"Verifying {variant.name} in {folder}")
    for line in ok:
        print(f"  ok       {line}")
    if problems:
        for line in problems:
            print(f"  PROBLEM  {line}")
        fix = (
            "delete the folder: demo mode rebuilds it"
            if variant.demo
            else f"`{variant.download_command}` fetches what is missing or damaged"
        )
        print(f"{variant.name}: {len(problems)} problem(s); {fix}")
        return EXIT_FAILURE
    print(f"{variant.name}: complete ({len(ok)} checks passed, {human_size(folder_size(folder))})")
    record_content_ids(folder)
    return EXIT_OK


def record_content_ids(folder: Path) -> None:
    """Hash each component once now (content.py), so a server sharing identical components between
    variants finds the ids beside the weights instead of hashing gigabytes at its first load."""
    from .content import content_ids

    for component, cid in content_ids(folder).items():
        print(f"  id       {component}: {cid}")


# ---------------------------------------------------------------------------------------------
# download / import


def _check_space(dest: Path, variant: Variant) -> None:
    need = APPROX_GB.get(variant.family)
    if need is None:
        return
    probe = dest if dest.exists() else dest.parent
    free = shutil.disk_usage(probe).free / 1e9
    have = folder_size(dest) / 1e9 if dest.exists() else 0.0
    print(f"{variant.name} needs about {need:.0f} GB on disk ({free:.0f} GB free at {probe})")
    if free + have < need:
        print(f"warning: probably not enough disk space for {variant.name}", file=sys.stderr)


def drop_damaged(folder: Path) -> list[str]:
    """Delete files whose content is broken (bad JSON, bad safetensors) so a download re-fetches them.

    huggingface_hub skips a file whose resume metadata says it is complete, without looking at
    it; removing the file and that metadata makes it fetch the file again.
    """
    dropped = []
    for path in _files(folder, ".json") + _files(folder, ".safetensors"):
        try:
            if path.suffix == ".json":
                json.loads(path.read_text(encoding="utf-8"))
            else:
                read_safetensors_header(path)
        except (OSError, UnicodeDecodeError, ValueError, CheckpointError):
            relpath = path.relative_to(folder).as_posix()
            path.unlink()
            (folder / ".cache" / "huggingface" / "download" / f"{relpath}.metadata").unlink(missing_ok=True)
            dropped.append(relpath)
    return dropped


def download(variant: Variant, weights_dir: Path) -> int:
    """Fetch the pipeline's files of variant.repo_id into weights_dir/<name>, then verify them."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if constants.is_offline_mode():
        print(
            "error: HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set, so nothing can be downloaded: "
            "unset it for this command, or copy the folder by hand and use --from DIR",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    dest = variant_dir(weights_dir, variant.name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Read at call time (huggingface_hub reads HF_ENDPOINT once, at import).
    endpoint = os.environ.get("HF_ENDPOINT", "").rstrip("/") or None
    token = os.environ.get("HF_TOKEN") or None  # None: huggingface_hub's own login, if any
    print(f"Downloading {variant.repo_id} from {endpoint or DEFAULT_ENDPOINT} into {dest}")
    _check_space(dest, variant)
    if dest.is_dir() and (dropped := drop_damaged(dest)):
        print(f"re-fetching {len(dropped)} damaged file(s): {', '.join(dropped)}")
    try:
        snapshot_download(
            variant.repo_id,
            local_dir=dest,
            allow_patterns=allow_patterns(),
            ignore_patterns=IGNORE_PATTERNS,
            endpoint=endpoint,
            token=token,
        )
    except KeyboardInterrupt:
        print(f"\ninterrupted: run `{variant.download_command}` again to resume", file=sys.stderr)
        return 130
    except GatedRepoError:
        print(
            f"error: {variant.repo_id} is gated: accept its terms on the hub with your account, "
            "then set HF_TOKEN to a token of that account",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    except RepositoryNotFoundError:
        print(
            f"error: {variant.repo_id} was not found at {endpoint or DEFAULT_ENDPOINT} "
            "(a private repo needs HF_TOKEN; a mirror set by HF_ENDPOINT may not carry it)",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    except Exception as exc:  # network, disk, server errors: one line, no traceback
        print(
            f"error: download of {variant.repo_id} failed: {type(exc).__name__}: {exc}\n"
            f"Files already complete are kept; run `{variant.download_command}` again to resume. "
            "Offline? Copy the folder by hand and use --from DIR.",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    return report_verify(variant, dest)


def import_folder(source: Path, dest: Path) -> tuple[int, int, int]:
    """Hardlink (same filesystem) or copy the needed files of source into dest.

    Returns (linked, copied, unchanged). Files already in dest with the same size and mtime, or
    the same inode, are left alone, so an interrupted import resumes.
    """
    linked = copied = unchanged = 0
    for src in sorted(source.rglob("*")):
        relpath = src.relative_to(source)
        if not src.is_file() or _SKIP_DIRS.intersection(relpath.parts) or not wanted(relpath.as_posix()):
            continue
        target = dest / relpath
        st = src.stat()
        if target.is_file():
            tt = target.stat()
            same_inode = (tt.st_dev, tt.st_ino) == (st.st_dev, st.st_ino)
            if same_inode or (tt.st_size == st.st_size and int(tt.st_mtime) == int(st.st_mtime)):
                unchanged += 1
                continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".importing")
        tmp.unlink(missing_ok=True)
        try:
            os.link(src, tmp)
            linked += 1
        except OSError:  # another filesystem, or links not allowed: copy
            shutil.copy2(src, tmp)
            copied += 1
        os.replace(tmp, target)
    return linked, copied, unchanged


def import_from(variant: Variant, weights_dir: Path, source: Path) -> int:
    if not source.is_dir():
        print(f"error: --from {source}: not a folder", file=sys.stderr)
        return EXIT_USAGE
    dest = variant_dir(weights_dir, variant.name)
    if dest.exists() and dest.resolve() == source.resolve():
        return report_verify(variant, dest)
    if not any(wanted(p.relative_to(source).as_posix()) for p in source.rglob("*") if p.is_file()):
        print(
            f"error: {source} holds none of the checkpoint files (expected model_index.json, "
            f"{', '.join(COMPONENTS)}/ in the diffusers layout of {variant.repo_id})",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    print(f"Importing {source} into {dest}")
    linked, copied, unchanged = import_folder(source, dest)
    print(f"  {linked} hardlinked, {copied} copied, {unchanged} already there")
    return report_verify(variant, dest)


# ---------------------------------------------------------------------------------------------
# entry point


def _lookup(name: str, *, downloadable: bool) -> Variant | None:
    variant = VARIANTS.get(name)
    if variant is None:
        names = [n for n, v in VARIANTS.items() if not (downloadable and v.demo)]
        print(f"error: unknown variant {name!r}; valid names:\n  " + "\n  ".join(names), file=sys.stderr)
        return None
    if downloadable and variant.demo:
        print(
            f"error: {name} is a demo variant with random weights: it is built locally (in seconds) "
            "by `k5serve serve` and `k5serve generate` when no real checkpoint is present; "
            "there is nothing to download",
            file=sys.stderr,
        )
        return None
    return variant


def main(args: argparse.Namespace) -> int:
    """Run `k5serve weights <list|download|verify>`; returns the exit code (0 ok, 1 failure, 2 usage)."""
    weights_dir = Path(args.weights_dir)
    command = args.weights_command
    if command == "list":
        return cmd_list(weights_dir)
    variant = _lookup(args.name, downloadable=command == "download")
    if variant is None:
        return EXIT_USAGE
    if command == "verify":
        folder = variant_dir(weights_dir, variant.name)
        if not folder.is_dir():
            fix = "demo mode builds it on demand" if variant.demo else f"run `{variant.download_command}`"
            print(f"{variant.name}: not present in {weights_dir}; {fix}")
            return EXIT_FAILURE
        return report_verify(variant, folder)
    if command == "download":
        source = getattr(args, "source", None)
        if source is not None:
            return import_from(variant, weights_dir, Path(source))
        return download(variant, weights_dir)
    print(f"error: unknown weights command {command!r}", file=sys.stderr)
    return EXIT_USAGE
