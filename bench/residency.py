"""Residency benchmark: what a variant costs to load from disk, with and without shared components,
and what bringing an evicted transformer back costs, on the tiny models (CPU) or a real device.

    .venv/bin/python bench/residency.py [--device cpu] [--runs 3] [--weights-dir DIR] [--out residency.json]

Builds three real-named Lite variant folders around the tiny checkpoint (pipelines/tiny.py
`ensure_tiny_family`: one set of text encoders, tokenizers and VAE hardlinked into each, a
transformer of their own) and, per run, with fresh engines, times (median of --runs):
  first_load_s        the first variant: every model read from disk
  second_shared_s     a second variant with sharing: only its transformer is read
  second_separate_s   the same with `share_components=False`: every model read again
  swap_back_s         the first variant again after a small --device-memory budget evicted its
                      transformer to host RAM (on the CPU host RAM is the device: accounting only)
  reload_dropped_s    the same with no host RAM allowed (`host_cache=0`): the transformer is
                      read from disk again
Counters (loads, evictions, swaps, drops) come from `Engine.describe()`. Emits one JSON object
(stdout, and --out). Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LITES = ["kandinsky5-lite-t2v-sft-5s", "kandinsky5-lite-t2v-nocfg-5s", "kandinsky5-lite-t2v-distilled-5s"]


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def one_run(weights: Path, device: str) -> dict:
    from pipelines import memory
    from pipelines.engine import Engine
    from pipelines.request import GenerationRequest

    opts = dict(device=device, compile=False, cfg_batch=False, memory_mode="gpu")
    req = {n: GenerationRequest(variant=n, prompt="a fox", width=512, height=512, num_frames=1, steps=1) for n in LITES}
    out = {}

    shared = Engine(weights, **opts)
    out["first_load_s"] = timed(lambda: shared.pipeline(LITES[0]))
    out["second_shared_s"] = timed(lambda: shared.pipeline(LITES[1]))
    separate = Engine(weights, share_components=False, **opts)
    separate.pipeline(LITES[0])
    out["second_separate_s"] = timed(lambda: separate.pipeline(LITES[1]))
    out["shared_loads"] = shared.describe()["counters"]["loads"]
    out["separate_loads"] = separate.describe()["counters"]["loads"]

    # a budget with room for one variant's plan and half a transformer: the other's must leave
    probe = Engine(weights, **opts)
    r = {n: probe.prepare(req[n]) for n in LITES[:2]}
    probe.pipeline(LITES[0])
    transformer = probe.describe()["resident"][0]["bytes"]
    capacity = memory.CONTEXT_RESERVE + max(probe.memory_plan(x).peak for x in r.values()) + transformer // 2
    for key, host_cache in (("swap_back_s", None), ("reload_dropped_s", 0)):
        engine = Engine(weights, device_memory=capacity, host_cache=host_cache, **opts)
        engine.pipeline(LITES[0], r[LITES[0]])
        engine.pipeline(LITES[1], r[LITES[1]])  # evicts LITES[0]'s transformer
        out[key] = timed(lambda e=engine: e.pipeline(LITES[0], r[LITES[0]]))
        out[key.removesuffix("_s") + "_counters"] = engine.describe()["counters"]
    out["transformer_bytes"] = transformer
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--weights-dir", type=Path, default=None, help="default: a temporary folder")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    import torch

    from pipelines.tiny import TINY_T2V, ensure_tiny, ensure_tiny_family

    with tempfile.TemporaryDirectory(prefix="k5res") as tmp:
        weights = args.weights_dir or Path(tmp)
        tiny = ensure_tiny(weights / "_tiny", TINY_T2V)
        ensure_tiny_family(weights, LITES, tiny)
        one_run(weights, args.device)  # warm: imports, first-call overheads, content ids hashed
        runs = [one_run(weights, args.device) for _ in range(args.runs)]
    keys = ("first_load_s", "second_shared_s", "second_separate_s", "swap_back_s", "reload_dropped_s")
    result = {
        "device": args.device,
        "runs": args.runs,
        "median": {k: round(statistics.median(run[k] for run in runs), 6) for k in keys},
        "last_run": runs[-1],
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
