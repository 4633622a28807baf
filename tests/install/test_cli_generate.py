"""`k5serve generate` as a user runs it: the console script in a subprocess, demo mode."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import shutil
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from pipelines.video import read_mp4

K5SERVE = str(Path(sys.executable).with_name("k5serve"))
ROOT = Path(__file__).resolve().parents[2]
# The console script imports this checkout's code (not another tree the venv was installed from).
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
TOTAL = re.compile(r", ([0-9.]+) s\)$")


def run(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run([K5SERVE, *args], capture_output=True, text=True, timeout=300, env=ENV, **kw)


def run_on_terminal(args: list[str], columns: int, rows: int) -> tuple[int, str, str]:
    """`k5serve ARGS` with stderr on a pseudo-terminal of the given size: (rc, stdout, terminal bytes)."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    proc = subprocess.Popen([K5SERVE, *args], stdin=follower, stdout=subprocess.PIPE, stderr=follower, env=ENV)
    os.close(follower)
    seen, deadline = b"", time.monotonic() + 300
    while time.monotonic() < deadline:
        if select.select([leader], [], [], 1)[0]:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # EIO: every writer has closed the terminal
                break
            if not chunk:
                break
            seen += chunk
    os.close(leader)
    stdout = proc.communicate(timeout=60)[0].decode()
    return proc.returncode, stdout, seen.decode(errors="replace")


def screen(raw: str) -> list[str]:
    """The lines a terminal shows for `raw`: a carriage return writes over the line from its start."""
    lines = []
    for line in raw.replace("\r\n", "\n").split("\n"):
        shown = ""
        for part in line.split("\r"):
            shown = part + shown[len(part) :]
        lines.append(shown.rstrip())
    return [line for line in lines if line]


@pytest.fixture
def weights(tiny_weights_dir, tmp_path) -> Path:
    """A private copy of the tiny weights (demo mode) so tests cannot disturb each other."""
    dest = tmp_path / "weights"
    shutil.copytree(tiny_weights_dir, dest)
    return dest


def test_generate_demo_t2v_prints_the_path_and_warns(weights, tmp_path):
    out = tmp_path / "fox.mp4"
    started = time.monotonic()
    proc = run(["generate", "a red fox", "-o", str(out), "--weights-dir", str(weights), "--steps", "2", "--seed", "3"])
    wall = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr
    assert str(out) in proc.stdout.splitlines()[-1]
    assert "DEMO MODE" in proc.stderr and "k5serve weights download" in proc.stderr
    # The printed total is the generation's own time: never more than the whole process took.
    total = float(TOTAL.search(proc.stdout.splitlines()[-1]).group(1))
    assert 0 < total <= wall
    # Off a terminal progress is plain lines (a log stays readable), never a carriage-return bar.
    assert "denoising 1/2 steps" in proc.stderr and "denoising 2/2 steps" in proc.stderr
    assert "\r" not in proc.stderr
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


def test_generate_on_a_group_of_two_cpu_devices_writes_a_video(weights, tmp_path):
    """One sequence-parallel group (rank 0 in the command's process, rank 1 spawned, gloo)."""
    out = tmp_path / "sp.mp4"
    args = ["generate", "a fox", "-o", str(out), "--weights-dir", str(weights), "--steps", "2", "--frames", "9"]
    proc = run(
        [*args, "--model", "kandinsky5-tiny-t2v", "--resolution", "64x64", "--devices", "cpu,cpu", "--sp-degree", "2"]
    )
    assert proc.returncode == 0, proc.stderr
    assert "denoising 2/2 steps" in proc.stderr
    assert read_mp4(out)[0].shape == (9, 64, 64, 3)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--devices", "cpu,cpu,cpu", "--sp-degree", "3"], "valid degrees: 2"),  # the tiny model has 2 heads
        (["--devices", "cpu", "--sp-degree", "2"], "needs 2 devices"),
        (["--sp-degree", "2"], "needs --devices"),
        (["--devices", "cpu,cuda:0", "--sp-degree", "2"], "all be CUDA or all CPU"),
    ],
)
def test_generate_refuses_a_group_it_cannot_make(weights, tmp_path, capsys, extra, message):
    from server.cli import main

    out = tmp_path / "bad.mp4"
    assert main(["generate", "a fox", "-o", str(out), "--weights-dir", str(weights), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(("columns", "rows"), [(80, 24), (0, 0)], ids=["80x24", "no-size"])
def test_generate_progress_bar_on_a_terminal_keeps_log_lines_off_it(weights, tmp_path, columns, rows):
    # (0, 0) is a bare pty that reports no size: tqdm alone drew nothing there (a blank line).
    out = tmp_path / "bar.mp4"
    args = ["generate", "a fox", "-o", str(out), "--weights-dir", str(weights), "--steps", "2", "--frames", "5"]
    rc, stdout, raw = run_on_terminal(args, columns, rows)
    assert rc == 0, raw
    assert str(out) in stdout
    shown = screen(raw)
    assert any(line.startswith("denoising: 100%") and "2/2" in line for line in shown), shown
    # Log records written while the bar is up land on their own lines, not glued onto the bar.
    assert any(line.startswith("loaded kandinsky5-tiny-t2v") for line in shown), shown
    assert not [line for line in shown if "denoising" in line and not line.startswith("denoising")], shown
    assert not [line for line in shown if line.startswith("denoising") and "]" in line[:-1]], shown
