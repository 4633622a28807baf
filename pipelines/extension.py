"""Clips made in passes: extensions, and clips longer than the variant makes at once.

One job, one mp4, several pipeline runs. The first part is the extension's source video (read at
24 fps, fitted to the size, clips.read_frames) or a normal first pass (the variant's longest clip).
Each further pass is the image-to-video model (variants.continuation_variant) conditioned on the
last frame so far: it makes `added + 1` frames whose first one is its conditioning frame again, so
that frame is dropped and the clip grows by exactly `added` frames; no frame appears twice at a
seam. Pass k is seeded with seed + k (the same noise every pass would repeat its texture), and runs
the prompt the first pass encoded (an expanded prompt is expanded once).

Progress counts the steps of every pass on one scale (on_step(i, total steps)); only the last
pass's decode is reported as the decoding phase, so Job.percent never goes back. Frames are
streamed into the mp4 pass by pass (video.Mp4Writer): a 120 s clip is never whole in memory.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np

from .cancel import Cancellation
from .clips import read_frames
from .clock import StageClock
from .generation import DECODING, ENCODING, LOADING, WRITING, PhaseCallback, StepCallback
from .request import GenerationResult, ResolvedRequest
from .variants import VARIANTS
from .video import Mp4Writer, to_uint8


class Sink(Protocol):
    def send(self, frames: np.ndarray) -> None: ...


@dataclasses.dataclass
class PassesDone:
    """What the passes made, besides the frames they sent."""

    frames: int = 0
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    step_times: list[float] = dataclasses.field(default_factory=list)
    acceleration: str = "none"
    cached_steps: int = 0
    memory_plan: dict = dataclasses.field(default_factory=dict)
    revised_prompt: str | None = None
    approximations: list[str] = dataclasses.field(default_factory=list)  # any pass's (quant.py labels)


def total_steps(r: ResolvedRequest) -> int:
    """Denoising steps of all passes: the progress scale of a clip made in passes."""
    first = 0 if r.extend else r.steps
    return first + (r.continuation_steps or 0) * (len(r.passes) - 1)


def continuation_pass(r: ResolvedRequest, k: int, added: int, prompt: str) -> ResolvedRequest:
    """The request of continuation pass `k` (1, 2, ...): `added + 1` frames of the I2V variant."""
    return dataclasses.replace(
        r,
        variant=VARIANTS[r.continuation],
        prompt=prompt,
        image=None,
        video=None,
        extend=None,
        num_frames=added + 1,
        steps=r.continuation_steps,
        guidance=r.continuation_guidance,
        seed=(r.seed + k) % 2**63,
        expand_prompt=False if k > 1 or not r.extend else r.expand_prompt,
        strength=1.0,
        source_frames=0,
        continuation=None,
        continuation_steps=None,
        continuation_guidance=None,
    )


def run_passes(
    engine,
    r: ResolvedRequest,
    sink: Sink,
    *,
    on_step: StepCallback | None,
    on_phase: PhaseCallback | None,
    cancel: Cancellation,
) -> PassesDone:
    """Make `r`'s passes with `engine` (Engine.generate_frames), sending the frames to `sink` in order."""
    passes, total = r.passes, total_steps(r)
    done = PassesDone()
    offset = 0

    def stepper(start: int) -> Callable[[int, int], None] | None:
        return None if on_step is None else (lambda i, _n: on_step(start + i, total))

    def phases(first: bool, final: bool) -> PhaseCallback | None:
        """The first pass's load and encode, the final pass's decode: one run's phases in order
        (the other passes' stay inside the steps' band)."""
        if on_phase is None:
            return None
        shown = ({LOADING, ENCODING} if first else set()) | ({DECODING} if final else set())

        def relay(phase: str, i: int, n: int) -> None:
            if phase in shown:
                on_phase(phase, i, n)

        return relay

    def add(part, frames: np.ndarray) -> None:
        for name, seconds in part.timings.items():
            done.timings[name] = done.timings.get(name, 0.0) + seconds
        done.step_times += part.step_times
        done.cached_steps += part.cached_steps
        done.acceleration = part.acceleration if part.acceleration != "none" else done.acceleration
        done.memory_plan = done.memory_plan or part.memory_plan
        done.approximations += [a for a in part.approximations if a not in done.approximations]
        with StageClock(engine.device, done.timings).stage("write"):
            sink.send(frames)
        done.frames += len(frames)

    prompt = r.prompt
    if r.extend:  # the source, fitted, is the first part
        with StageClock(engine.device, done.timings).stage("read_source"):
            for frame in read_frames(r.extend, r.width, r.height):
                if done.frames % 240 == 0:  # a long source takes a while to re-encode
                    cancel.raise_if_cancelled()
                sink.send(frame[None])
                done.frames, last = done.frames + 1, frame
        if done.frames != r.source_frames:
            raise ValueError(f"the source video has {done.frames} frames, {r.source_frames} were planned")
    else:
        first = dataclasses.replace(r, num_frames=passes[0], continuation=None)
        part = engine.generate_frames(first, on_step=stepper(0), on_phase=phases(True, False), cancel=cancel)
        frames = to_uint8(np.asarray(part.frames))
        add(part, frames)
        last, offset = frames[-1], first.steps
        prompt = part.revised_prompt or r.prompt
        done.revised_prompt = part.revised_prompt

    from PIL import Image

    for k, added in enumerate(passes[1:], start=1):
        cancel.raise_if_cancelled()
        final = k == len(passes) - 1
        step = continuation_pass(r, k, added, prompt)
        part = engine.generate_frames(
            step,
            image=Image.fromarray(last),
            on_step=stepper(offset),
            on_phase=phases(k == 1 and bool(r.extend), final),
            cancel=cancel,
        )
        frames = to_uint8(np.asarray(part.frames))[1:]  # its first frame is the conditioning frame
        add(part, frames)
        last, offset = frames[-1], offset + step.steps
        if part.revised_prompt is not None:  # an extension expands its prompt in its first pass
            prompt = done.revised_prompt = part.revised_prompt
    return done


def generate(
    engine,
    r: ResolvedRequest,
    output: Path,
    *,
    on_step: StepCallback | None = None,
    on_phase: PhaseCallback | None = None,
    cancel: Cancellation,
) -> GenerationResult:
    """Engine.generate for a request of more than one pass: the stitched mp4 at `output`."""
    fps = r.variant.fps
    with Mp4Writer(output, r.width, r.height, fps=fps) as writer:
        done = run_passes(engine, r, writer, on_step=on_step, on_phase=on_phase, cancel=cancel)
        cancel.raise_if_cancelled()
        if on_phase is not None:
            on_phase(WRITING, 0, 1)
            cancel.raise_if_cancelled()
        with StageClock(engine.device, done.timings).stage("write"):
            size = writer.commit()
    if done.frames != r.num_frames:  # the plan and the passes disagree: a bug, never a short clip
        Path(output).unlink(missing_ok=True)
        raise RuntimeError(f"made {done.frames} frames, {r.num_frames} were planned")
    return GenerationResult(
        path=Path(output),
        variant=r.variant.name if not r.extend else r.continuation,
        width=r.width,
        height=r.height,
        num_frames=done.frames,
        fps=fps,
        steps=r.steps,
        seed=r.seed,
        file_size=size,
        demo=r.demo or r.variant.demo,
        timings=done.timings,
        step_times=done.step_times,
        acceleration=done.acceleration,
        cached_steps=done.cached_steps,
        memory_plan=done.memory_plan,
        revised_prompt=done.revised_prompt,
        approximations=done.approximations,
    )
