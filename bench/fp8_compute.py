"""fp8 compute (pipelines/fp8_compute.py) against bf16, one layer at a time, at Lite's and Pro's sizes.

    python bench/fp8_compute.py --out fp8.json            # CUDA: Lite and Pro layers, 768x512x61 tokens
    python bench/fp8_compute.py --out fp8.json --cpu      # the same script on small sizes (proves it runs)

For each converted kind of layer (an attention projection, model_dim -> model_dim; the FFN input,
model_dim -> ff_dim) it times the bf16 Linear and Fp8Linear (activation quantization included) on
the same input, median of --runs after a warm-up, synchronised, and reports the relative L2 error of
the fp8 output against the bf16 one. Layer figures, not a step: a step also runs attention, norms,
modulations and the FFN output in bf16 (tests/gpu/test_fp8_compute_gpu.py times whole steps).
Emits JSON; the CPU's times mean nothing (its matmuls are not fp8 hardware).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from pipelines.device import fp8_unsupported as unsupported
from pipelines.fp8_compute import Fp8Linear
from pipelines.memory import DITS

TOKENS_768x512x61 = 16 * 32 * 48  # latent frames x (512/16) x (768/16): the patched sequence


def _time(fn, x, runs: int, cuda: bool) -> float:
    fn(x)  # warm-up (kernel selection)
    seconds = []
    for _ in range(runs):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(x)
        if cuda:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t0)
    return statistics.median(seconds)


def measure(device: str, dtype: torch.dtype, tokens: int, sizes: dict[str, tuple[int, int]], runs: int) -> list:
    cuda = device.startswith("cuda")
    torch.manual_seed(0)
    rows = []
    for name, (fan_in, fan_out) in sizes.items():
        layer = torch.nn.Linear(fan_in, fan_out, device=device, dtype=dtype)
        fp8 = Fp8Linear(layer)
        x = torch.randn(tokens, fan_in, device=device, dtype=dtype)
        with torch.no_grad():
            exact, got = layer(x).float(), fp8(x).float()
            base_s, fp8_s = _time(layer, x, runs, cuda), _time(fp8, x, runs, cuda)
        rows.append(
            {
                "layer": name,
                "in": fan_in,
                "out": fan_out,
                "tokens": tokens,
                "base_dtype": str(dtype).replace("torch.", ""),
                "base_ms": round(base_s * 1e3, 3),
                "fp8_ms": round(fp8_s * 1e3, 3),
                "speedup": round(base_s / fp8_s, 3),
                "rel_err": round(float((got - exact).norm() / exact.norm()), 5),
            }
        )
        del layer, fp8, x, exact, got
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cpu", action="store_true", help="small sizes on the CPU (times mean nothing)")
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    device = "cpu" if args.cpu or not torch.cuda.is_available() else "cuda"
    report: dict = {
        "device": device,
        "versions": {"torch": torch.__version__},
        "cpu": platform.processor() or platform.machine(),
    }
    if device == "cuda":
        report["gpu"] = torch.cuda.get_device_name()
        reason = unsupported(device)
        if reason:  # an older card: say so, measure nothing
            report["skipped"] = reason
            args.out.write_text(json.dumps(report, indent=2) + "\n")
            print(reason)
            return 0
        dtype, tokens = torch.bfloat16, TOKENS_768x512x61
        families = {f: (DITS[f].model_dim, DITS[f].ff_dim) for f in ("lite", "pro")}
    else:
        dtype, tokens, args.runs = torch.float32, 256, min(args.runs, 2)
        families = {"small": (128, 256)}
    report["layers"] = []
    for family, (model_dim, ff_dim) in families.items():
        sizes = {f"{family} attention projection": (model_dim, model_dim), f"{family} FFN in": (model_dim, ff_dim)}
        report["layers"] += measure(device, dtype, tokens, sizes, args.runs)
        args.out.write_text(json.dumps(report, indent=2) + "\n")  # what ended survives a timeout
    print(json.dumps(report["layers"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
