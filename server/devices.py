"""`--devices` / `--sp-degree`: which workers the server runs, torch-free.

    auto            every visible CUDA GPU, one worker each; no GPU: one CPU worker (the default)
    all             every visible CUDA GPU (refused where there is none)
    cuda:0,cuda:2   these devices, one worker each ("cuda" alone is the current CUDA device)
    cpu,cpu         two CPU workers (how the tests and demos run several workers without a GPU)

`--sp-degree N` groups consecutive single devices in runs of N: one worker per group runs one
video with sequence parallelism (pipelines/group.py). A group can also be written out with `+`,
which is how a mixed layout is spelled: `cuda:0,cuda:1,cuda:2,cuda:3,cuda:4+cuda:5+cuda:6+cuda:7`
is four single-GPU workers and one group of four.

The front end never imports torch, so what it needs to know of the GPUs (how many are visible,
the memory of each: admission's fit check) comes from `probe()`, a short subprocess.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class WorkerSpec:
    """One worker: its id (w0, w1, … in --devices order) and the devices it runs on (several: one
    sequence-parallel group)."""

    id: str
    devices: tuple[str, ...]

    @property
    def label(self) -> str:
        return "+".join(self.devices)


@dataclass(frozen=True)
class Gpus:
    """What the probe found: the total memory of each visible CUDA device, by index."""

    memory: tuple[int, ...] = ()

    @property
    def count(self) -> int:
        return len(self.memory)


class DeviceError(ValueError):
    """A --devices / --sp-degree value that cannot be served; the message names it."""


_PROBE = (
    "import json, torch\n"
    "n = torch.cuda.device_count() if torch.cuda.is_available() else 0\n"
    "print(json.dumps([torch.cuda.get_device_properties(i).total_memory for i in range(n)]))\n"
)


def probe(timeout: float = 120.0) -> Gpus:
    """The visible CUDA GPUs, asked of torch in a child process (this one never imports it).
    Skipped (no GPU) where CUDA_VISIBLE_DEVICES hides every device or no NVIDIA driver is present."""
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES", None)
    if hidden is not None and hidden.strip() in ("", "-1"):
        return Gpus()
    if not Path("/dev/nvidiactl").exists() and shutil.which("nvidia-smi") is None:
        return Gpus()
    try:
        out = subprocess.run(
            [sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=timeout, check=True
        ).stdout
        return Gpus(tuple(int(m) for m in json.loads(out.strip().splitlines()[-1])))
    except (subprocess.SubprocessError, OSError, ValueError, IndexError):
        return Gpus()


def parse_devices(text: str | None, sp_degree: int = 1, gpus: Gpus | None = None) -> list[WorkerSpec]:
    """The workers for a --devices value; `gpus` is the probe's answer (asked only for auto/all
    and to check cuda:N indices). Raises DeviceError naming the bad value."""
    if sp_degree < 1:
        raise DeviceError(f"--sp-degree must be 1 or more, got {sp_degree}")
    text = (text or "auto").strip().lower()
    entries = [e.strip() for e in text.split(",")]
    if not text or any(not e for e in entries):
        raise DeviceError(f"--devices {text!r}: an empty entry")
    if entries in (["auto"], ["all"]):
        found = gpus if gpus is not None else probe()
        if found.count == 0 and entries == ["all"]:
            raise DeviceError("--devices all: no CUDA GPU is visible (use auto, cpu or a list)")
        entries = [f"cuda:{i}" for i in range(found.count)] or ["cpu"]
    groups = [tuple(_device(d, text) for d in e.split("+")) for e in entries]
    _check_indices(groups, text, gpus)
    used = [d for g in groups for d in g if d != "cpu"]
    twice = sorted({d for d in used if used.count(d) > 1})
    if twice:
        raise DeviceError(f"--devices {text!r}: {', '.join(twice)} listed more than once")
    return [WorkerSpec(f"w{i}", g) for i, g in enumerate(_grouped(groups, sp_degree, text))]


def _device(name: str, text: str) -> str:
    name = name.strip()
    if name == "cpu" or name == "cuda":
        return name
    if name.startswith("cuda:") and name[5:].isdigit():
        return f"cuda:{int(name[5:])}"
    raise DeviceError(f"--devices {text!r}: {name!r} is not cpu, cuda or cuda:N")


def _check_indices(groups: list[tuple[str, ...]], text: str, gpus: Gpus | None) -> None:
    if gpus is None:
        return  # not probed: the worker that opens the device reports a bad index
    for d in (d for g in groups for d in g):
        if d.startswith("cuda:") and int(d[5:]) >= gpus.count:
            raise DeviceError(f"--devices {text!r}: {d} does not exist ({gpus.count} CUDA GPUs visible)")


def _grouped(groups: list[tuple[str, ...]], degree: int, text: str) -> list[tuple[str, ...]]:
    """Single devices in runs of `degree`; groups written with `+` stay as written."""
    if degree == 1:
        return groups
    out: list[tuple[str, ...]] = []
    run: list[str] = []
    for g in groups:
        if len(g) > 1:
            out.append(g)
            continue
        run.append(g[0])
        if len(run) == degree:
            out.append(tuple(run))
            run = []
    if run:
        singles = sum(1 for g in groups if len(g) == 1)
        raise DeviceError(f"--devices {text!r}: {singles} single devices do not split into groups of {degree}")
    return out


def capacity(specs: list[WorkerSpec], gpus: Gpus) -> int | None:
    """Bytes of memory admission may plan a job for: the smallest device any worker uses (a job may
    run on any worker). None: a CPU worker is among them, or the GPUs are unknown (no limit).
    TODO(lead, issue 13 item 3): a sequence-parallel group holds the activations of 1/N of the
    tokens per device; a group's capacity should come from pipelines/group.py once it says."""
    sizes: list[int] = []
    for d in (d for s in specs for d in s.devices):
        if d == "cpu":
            return None
        index = int(d[5:]) if d.startswith("cuda:") else 0
        if index >= gpus.count:
            return None
        sizes.append(gpus.memory[index])
    return min(sizes) if sizes else None
