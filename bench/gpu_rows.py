"""bench/RESULTS.md rows from a bench/gpu_check.sh output folder (its bench/generate.py JSON files).

    python bench/gpu_rows.py DIR   # prints markdown; gpu_check.sh writes it to DIR/RESULTS_rows.md

Only measured figures: every cell comes from a JSON file in DIR; a part that failed or ran out of
its time budget is a row saying so (from DIR/gpu_check.json), never an estimate. The memory plan's
estimate is printed next to the measured peak and labelled as the estimate it is.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _gib(mb: float | None) -> str:
    return f"{mb / 1024:.1f}" if mb is not None else "-"


def _s(x) -> str:
    return f"{x:.2f}" if isinstance(x, int | float) else "-"


def generation_rows(report: dict, part: str) -> list[str]:
    machine = report.get("gpu") or report.get("cpu") or "?"
    versions = report.get("versions", {})
    ver = f"torch {versions.get('torch')}, diffusers {versions.get('diffusers')}"
    out = []
    for r in report.get("results", []):
        req = r["request"]
        what = f"{req['width']}x{req['height']}x{req['frames']}, {req['steps']} steps, guidance {req['guidance']}"
        stages = r.get("stages", {})
        stock, k5 = stages.get("stock", {}), stages.get("k5serve", {})
        mem = r.get("memory_estimate_vs_measured", {})
        errors = "; ".join(f"{k}: {v}" for k, v in r.items() if k.endswith("_error"))
        out.append(
            f"| {part} | {r['variant']} | {what} | {_s(r.get('stock_s'))} | {_s(r.get('k5serve_s'))} | "
            f"{_s(stock.get('per_step'))} | {_s(k5.get('per_step'))} | {mem.get('mode', '-')} | "
            f"{mem.get('estimated_peak_gib', '-')} (estimate) | {mem.get('measured_peak_gib') or '-'} | "
            f"{machine}; {ver} | {errors or 'ok'} |"
        )
        for name, a in sorted(r.get("ablations", {}).items()):
            figure = a.get("slowdown", a.get("skipped", a.get("error", "-")))
            out.append(
                f"| {part} ablation | {r['variant']} | {name} off | | {_s(a.get('k5serve_s'))} | | "
                f"{_s(a.get('per_step'))} | | | | {machine} | slowdown {figure} |"
            )
    return out


def fp8_rows(report: dict) -> list[str]:
    """bench/fp8_compute.py's layers: fp8 compute against the base dtype, one layer at a time."""
    machine = report.get("gpu") or report.get("cpu") or "?"
    if "skipped" in report:
        return [f"| fp8_compute | | | | | | {machine} | skipped: {report['skipped']} |"]
    return [
        f"| fp8_compute | {r['layer']} | {r['tokens']} x {r['in']} -> {r['out']} | {r['base_dtype']} | "
        f"{r['base_ms']} | {r['fp8_ms']} | {machine}; torch {report.get('versions', {}).get('torch')} | "
        f"x{r['speedup']}, rel. error {r['rel_err']} |"
        for r in report.get("layers", [])
    ]


FP8_HEADER = (
    "| part | layer | tokens x in -> out | base dtype | base ms | fp8 ms | machine | status |\n" + "|---" * 8 + "|"
)

HEADER = (
    "| part | variant | request | stock s | k5serve s | stock s/step | k5serve s/step | memory mode | "
    "peak GiB, plan | peak GiB, measured (reserved) | machine | status |\n" + "|---" * 12 + "|"
)


def rows(folder: Path) -> str:
    lines = [HEADER]
    summary = json.loads((folder / "gpu_check.json").read_text()) if (folder / "gpu_check.json").exists() else {}
    for part in summary.get("parts", []):
        path = folder / f"{part['name']}.json"
        if part["name"] == "fp8_compute":  # its own table, below
            continue
        if path.exists():
            lines += generation_rows(json.loads(path.read_text()), part["name"])
        elif part["name"] != "pytest":
            lines.append(f"| {part['name']} | | | | | | | | | | | rc {part['rc']} after {part['seconds']} s, no JSON |")
    for part in summary.get("parts", []):
        if part["name"] == "pytest":
            lines.append(
                f"| pytest -m gpu | | | | | | | | | | | rc {part['rc']} in {part['seconds']} s: "
                f"{part.get('tail', '').strip()} |"
            )
    for part in summary.get("parts", []):
        if part["name"] == "fp8_compute":
            path = folder / "fp8_compute.json"
            found = fp8_rows(json.loads(path.read_text())) if path.exists() else []
            status = f"| fp8_compute | | | | | | | rc {part['rc']} after {part['seconds']} s, no JSON |"
            lines += ["", FP8_HEADER, *(found or [status])]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(rows(Path(sys.argv[1])), end="")
