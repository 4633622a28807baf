"""Generation benchmark: k5serve's engine vs stock diffusers, same request, same process.

    python bench/generate.py --out results.json [--variants kandinsky5-tiny-t2v,...] [--runs 3]

Stock = the pipeline used as the diffusers docs show: `from_pretrained(folder)` then
`pipe(prompt=..., ...).frames[0]` and `export_to_video`. k5serve = `Engine.generate` (mp4 included).
Both get the same prompt, size, frames, steps, guidance and seed; the first run of each is a
warm-up and is not counted. JSON per variant: stock_s, k5serve_s, speedup (median end-to-end),
per-stage medians (encode_prompt, denoise, per_step, decode, write), peak memory.

This version runs the tiny demo variants (CPU or GPU). The full-size random-weight build
(Lite 2B / Pro 19B at 768x512, 121 frames) is not implemented yet: see bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _peak_memory(device: str) -> dict:
    import resource

    import torch

    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.startswith("cuda"):
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def bench_variant(name: str, weights: Path, args: argparse.Namespace, image: Path | None) -> dict:
    import torch
    from diffusers import DiffusionPipeline
    from diffusers.utils import export_to_video

    from pipelines.engine import Engine, _stage_timer, load_image
    from pipelines.loader import dtype_for
    from pipelines.request import GenerationRequest

    engine = Engine(weights, device=args.device)
    req = GenerationRequest(
        variant=name,
        prompt=args.prompt,
        image=str(image) if image else None,
        width=args.width,
        height=args.height,
        num_frames=args.frames,
        steps=args.steps,
        guidance=args.guidance,
        seed=0,
    )
    resolved = engine.prepare(req)
    device = engine.device

    stock = DiffusionPipeline.from_pretrained(weights / name, dtype=dtype_for(device)).to(device)
    stock.set_progress_bar_config(disable=True)
    stock_kwargs = dict(
        prompt=args.prompt,
        height=resolved.height,
        width=resolved.width,
        num_frames=resolved.num_frames,
        num_inference_steps=resolved.steps,
        guidance_scale=resolved.guidance,
    )
    if image is not None:
        stock_kwargs["image"] = load_image(str(image), resolved.width, resolved.height)

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)

    runs: dict[str, list[dict]] = {"stock": [], "k5serve": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs + 1):  # run 0 warms up both paths
            timings: dict[str, float] = {}
            sync()
            t0 = time.perf_counter()
            with _stage_timer(stock, timings, device):
                frames = stock(**stock_kwargs, generator=torch.Generator("cpu").manual_seed(0)).frames[0]
            t_write = time.perf_counter()
            export_to_video(list(frames), str(Path(tmp) / "stock.mp4"), fps=24)
            timings["write"] = time.perf_counter() - t_write
            timings["total"] = time.perf_counter() - t0
            if i:
                runs["stock"].append(timings)

            sync()
            t0 = time.perf_counter()
            result = engine.generate(resolved, Path(tmp) / "k5.mp4")
            sync()
            timings = dict(result.timings, total=time.perf_counter() - t0)
            if i:
                runs["k5serve"].append(timings)

    def summary(rows: list[dict]) -> dict:
        keys = sorted({k for row in rows for k in row})
        med = {k: statistics.median(row.get(k, 0.0) for row in rows) for k in keys}
        if "pipeline" in med:
            med["denoise"] = med["pipeline"] - med.get("encode_prompt", 0.0) - med.get("decode", 0.0)
        if "denoise" not in med:
            med["denoise"] = med["total"] - med.get("encode_prompt", 0.0) - med.get("decode", 0.0) - med["write"]
        med["per_step"] = med["denoise"] / resolved.steps
        return {k: round(v, 4) for k, v in med.items()}

    stock_s, k5_s = summary(runs["stock"]), summary(runs["k5serve"])
    return {
        "variant": name,
        "request": {
            "width": resolved.width,
            "height": resolved.height,
            "frames": resolved.num_frames,
            "steps": resolved.steps,
            "guidance": resolved.guidance,
        },
        "stock_s": stock_s["total"],
        "k5serve_s": k5_s["total"],
        "speedup": round(stock_s["total"] / k5_s["total"], 3),
        "stages": {"stock": stock_s, "k5serve": k5_s},
        "memory": _peak_memory(device),
        "runs": args.runs,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON results file")
    parser.add_argument("--variants", default="kandinsky5-tiny-t2v,kandinsky5-tiny-i2v")
    parser.add_argument("--weights-dir", type=Path, default=None, help="default: a temp dir with tiny builds")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--prompt", default="a red fox running through snow")
    args = parser.parse_args(argv)

    import numpy as np
    import torch
    from PIL import Image

    from pipelines.tiny import ensure_tiny

    with tempfile.TemporaryDirectory() as tmp:
        weights = args.weights_dir or Path(tmp) / "weights"
        image = Path(tmp) / "image.png"
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (args.height, args.width, 3), np.uint8)).save(image)
        results = []
        for name in [v.strip() for v in args.variants.split(",") if v.strip()]:
            if name.startswith("kandinsky5-tiny-"):
                ensure_tiny(weights, name)
            results.append(bench_variant(name, weights, args, image if "i2v" in name else None))
            print(json.dumps(results[-1]), file=sys.stderr)
    import diffusers

    report = {
        "benchmark": "generate",
        "device": args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "cpu": platform.processor() or platform.machine(),
        "versions": {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "python": platform.python_version(),
        },
        "results": results,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
