"""bench/gpu_check.sh --cpu: the prepared GPU check, end to end on the tiny models (issue 14), so a
broken script is found here and not in the few minutes someone is lent a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PARTS = ["pytest", "lite_distilled", "lite_sft", "pro_gpu", "pro_stream", "fp8_compute"]


@pytest.mark.slow
def test_gpu_check_runs_end_to_end_on_the_cpu(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=str(ROOT))
    out = tmp_path / "out"
    done = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh"), "--cpu", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    parts = json.loads((out / "gpu_check.json").read_text())["parts"]
    assert [p["name"] for p in parts] == PARTS and all(p["rc"] == 0 for p in parts)
    stream = json.loads((out / "pro_stream.json").read_text())["results"][0]
    assert stream["memory_estimate_vs_measured"]["mode"] == "stream"
    assert stream["memory_plan"]["ffn_chunks"] == 4
    sft = json.loads((out / "lite_sft.json").read_text())["results"][0]
    assert {"cfg_batch", "compile"} <= set(sft["ablations"])
    assert "stock_s" in sft and "k5serve_s" in sft
    rows = (out / "RESULTS_rows.md").read_text()
    assert rows.count("| kandinsky5-tiny-t2v |") >= 4 and "(estimate)" in rows and "pytest -m gpu" in rows
    assert rows.count("| fp8_compute | small ") == 2  # bench/fp8_compute.py's layers, their own table


def test_gpu_check_refuses_unknown_arguments():
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--bogus"], capture_output=True, text=True)
    assert done.returncode == 2 and "unknown argument --bogus" in done.stderr
