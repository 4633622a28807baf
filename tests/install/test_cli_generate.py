"""`k5serve generate` as a user runs it: the console script in a subprocess, demo mode."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.video import read_mp4

K5SERVE = str(Path(sys.executable).with_name("k5serve"))


def run(args: list[str], **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([K5SERVE, *args], capture_output=True, text=True, timeout=300, env=env, **kw)


@pytest.fixture
def weights(tiny_weights_dir, tmp_path) -> Path:
    """A private copy of the tiny weights (demo mode) so tests cannot disturb each other."""
    dest = tmp_path / "weights"
    shutil.copytree(tiny_weights_dir, dest)
    return dest


def test_generate_demo_t2v_prints_the_path_and_warns(weights, tmp_path):
    out = tmp_path / "fox.mp4"
    proc = run(["generate", "a red fox", "-o", str(out), "--weights-dir", str(weights), "--steps", "2", "--seed", "3"])
    assert proc.returncode == 0, proc.stderr
    assert str(out) in proc.stdout.splitlines()[-1]
    assert "DEMO MODE" in proc.stderr and "k5serve weights download" in proc.stderr
    frames, meta = read_mp4(out)
    assert frames.shape == (25, 160, 256, 3) and meta["fps"] == 24  # 768x512, 5 s scaled to the demo cap


def test_generate_demo_i2v_with_aspect_and_image(weights, tmp_path, test_image):
    out = tmp_path / "i2v.mp4"
    args = ["generate", "a fox", "-o", str(out), "--weights-dir", str(weights), "--steps", "1"]
    args += ["--model", "kandinsky5-lite-i2v-5s", "--image", str(test_image), "--aspect-ratio", "1:1"]
    proc = run(args)
    assert proc.returncode == 0, proc.stderr
    frames, _ = read_mp4(out)
    assert frames.shape == (25, 256, 256, 3)


def test_generate_builds_tiny_weights_on_demand_in_an_empty_folder(tmp_path):
    empty = tmp_path / "w"
    out = tmp_path / "o.mp4"
    proc = run(["generate", "x", "-o", str(out), "--weights-dir", str(empty), "--steps", "1", "--frames", "5"])
    assert proc.returncode == 0, proc.stderr
    assert (empty / "kandinsky5-tiny-t2v" / "model_index.json").is_file()
    assert read_mp4(out)[0].shape[0] == 5


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--resolution", "700x512"], "700"),
        (["--resolution", "768x768"], "768x768"),
        (["--resolution", "big"], "'big'"),
        (["--frames", "10"], "10"),
        (["--model", "nope"], "'nope'"),
        (["--steps", "500"], "500"),
    ],
)
def test_generate_rejects_bad_input_with_exit_2(weights, tmp_path, capsys, extra, message):
    from server.cli import main

    out = tmp_path / "bad.mp4"
    assert main(["generate", "a fox", "-o", str(out), "--weights-dir", str(weights), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
