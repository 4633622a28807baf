"""Per-step time of one video on 1 device vs a sequence-parallel group (pipelines/group.py).

    .venv/bin/python bench/sp.py --out sp.json --devices cuda:0,cuda:1 \\
        [--variant kandinsky5-lite-t2v-sft-5s] [--weights-dir weights] [--degrees 1,2] [--steps 8] [--runs 2]
        [--guidance G] [--no-cfg-parallel]

For each degree d the first d devices form one engine (`build_engine`: the plain Engine for d=1, a
GroupEngine otherwise); after one uncounted warm-up run it times `--runs` runs of the variant's own
request at `--steps` steps (latents decoded by rank 0 as in service) and records each denoising
step's wall time on rank 0, which waits for the whole group every step. JSON: per degree the median
step, the whole run, and the speed-up of the median step over degree 1. With no checkpoint under
--weights-dir the engine is in demo mode (the tiny model at demo size): that checks the code path on
a CPU (`--devices cpu,cpu`), it says nothing about GPU speed. Compilation is off for every degree
(groups run eagerly for now), so the comparison is like for like.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def measure(devices: list[str], args) -> dict:
    from pipelines.group import build_engine
    from pipelines.request import GenerationRequest

    options = {"cfg_parallel": False} if args.no_cfg_parallel and len(devices) > 1 else {}
    engine = build_engine(devices, weights_dir=args.weights_dir, compile=False, **options)
    try:
        req = GenerationRequest(variant=args.variant, prompt=args.prompt, steps=args.steps, seed=0)
        r = engine.prepare(req if args.guidance is None else replace(req, guidance=args.guidance))
        engine.generate_frames(r)  # warm-up: ranks started, weights loaded, kernels picked
        steps, totals = [], []
        for _ in range(args.runs):
            started = time.perf_counter()
            done = engine.generate_frames(r)
            totals.append(time.perf_counter() - started)
            steps += done.step_times
        return {
            "devices": devices,
            "demo": r.demo,
            "request": {"variant": r.variant.name, "width": r.width, "height": r.height, "frames": r.num_frames},
            "guidance": r.guidance,
            "median_step_s": statistics.median(steps),
            "step_s": steps,
            "median_run_s": statistics.median(totals),
        }
    finally:
        if hasattr(engine, "stop"):
            engine.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--devices", default="cuda:0,cuda:1")
    p.add_argument("--degrees", default="1,2")
    p.add_argument("--variant", default="kandinsky5-lite-t2v-sft-5s")
    p.add_argument("--weights-dir", default="weights", type=Path)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--no-cfg-parallel", action="store_true")
    p.add_argument("--prompt", default="a red fox running through snow, cinematic")
    args = p.parse_args(argv)
    devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    degrees = [int(d) for d in args.degrees.split(",")]
    if max(degrees) > len(devices):
        print(f"--degrees {args.degrees} needs {max(degrees)} devices, --devices lists {len(devices)}", file=sys.stderr)
        return 2
    import torch

    results = {d: measure(devices[:d], args) for d in degrees}
    base = results.get(1, {}).get("median_step_s")
    for row in results.values():
        row["step_speedup_vs_1"] = base / row["median_step_s"] if base else None
    out = {
        "command": " ".join(sys.argv),
        "host": platform.node(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cfg_parallel": not args.no_cfg_parallel,
        "degrees": {str(d): row for d, row in results.items()},
    }
    args.out.write_text(json.dumps(out, indent=2))
    for d, row in results.items():
        print(f"sp {d}: median step {row['median_step_s']:.3f} s, x{row['step_speedup_vs_1'] or 0:.2f} vs 1")
    return 0


if __name__ == "__main__":
    sys.exit(main())
