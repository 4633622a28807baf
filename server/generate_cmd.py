"""`k5serve generate PROMPT -o OUT.mp4`: one video from the command line, no server."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from pipelines.errors import EngineError, InvalidRequest, WeightsMissing
from pipelines.request import GenerationRequest, request_for_model
from pipelines.variants import VARIANTS, size_for_aspect

from .engine_protocol import WorkerLost

log = logging.getLogger("k5serve.generate")


def build_request(args: argparse.Namespace, image_path: str | None) -> GenerationRequest:
    """CLI flags -> GenerationRequest (public model ids map to variants like the HTTP APIs do)."""
    model = args.model
    if args.duration and model in VARIANTS and model.endswith(f"-{VARIANTS[model].seconds}s"):
        # `--duration 10` with a 5 s local name picks its 10 s sibling when one exists.
        sibling = model.rsplit("-", 1)[0] + f"-{args.duration}s"
        model = sibling if sibling in VARIANTS else model
    try:
        request = request_for_model(
            model,
            args.prompt,
            seconds=args.duration,
            steps=args.steps,
            guidance=args.guidance,
            negative_prompt=args.negative_prompt,
            image=image_path,
            num_frames=args.frames,
            seed=args.seed,
        )
    except KeyError:
        raise InvalidRequest("model", args.model, f"unknown model {args.model!r} (see: k5serve weights list)") from None
    except ValueError as exc:
        raise InvalidRequest("duration", args.duration, str(exc)) from None
    if args.frames is not None or VARIANTS[request.variant].demo:
        request = dataclasses.replace(request, seconds=None)  # an explicit frame count; demo: its own length
    if args.resolution:
        try:
            width, height = (int(x) for x in args.resolution.lower().split("x"))
        except ValueError:
            raise InvalidRequest(
                "resolution", args.resolution, f"resolution must be WxH, got {args.resolution!r}"
            ) from None
        request = dataclasses.replace(request, width=width, height=height)
    elif args.aspect_ratio:
        width, height = size_for_aspect(args.aspect_ratio)
        request = dataclasses.replace(request, width=width, height=height)
    return request


def group_devices(args: argparse.Namespace) -> list[str]:
    """The devices of the one group `generate` runs: the first --sp-degree of --devices (a `+` joins
    devices as a comma does), or --device alone."""
    degree = args.sp_degree
    if degree < 1:
        raise InvalidRequest("sp-degree", degree, f"--sp-degree must be at least 1, got {degree}")
    if not args.devices:
        if degree > 1:
            raise InvalidRequest("devices", None, f"--sp-degree {degree} needs --devices with {degree} devices")
        return [args.device]
    devices = [d.strip() for d in args.devices.replace("+", ",").split(",") if d.strip()]
    if len(devices) < degree:
        raise InvalidRequest(
            "devices", args.devices, f"--sp-degree {degree} needs {degree} devices, --devices lists {len(devices)}"
        )
    return devices[:degree]


def _fetch_image(url: str, folder: Path) -> str:
    import httpx

    with httpx.stream("GET", url, follow_redirects=True, timeout=30) as resp:
        resp.raise_for_status()
        path = folder / "input-image"
        with open(path, "wb") as fh:
            for chunk in resp.iter_bytes():
                fh.write(chunk)
    return str(path)


def run_generate(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # diffusers/transformers set their own level when first imported (after this line): their
    # environment switches are the only setting that holds, and keeps their warnings off the bar.
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for noisy in ("httpx", "diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="k5serve-") as tmp:
        image = args.image
        try:
            if image and image.startswith(("http://", "https://")):
                image = _fetch_image(image, Path(tmp))
            req = build_request(args, image)
            devices = group_devices(args)
            from pipelines.group import build_engine

            try:
                engine = build_engine(devices, weights_dir=args.weights_dir)
            except ValueError as exc:  # a device or degree the group cannot use
                raise InvalidRequest("sp-degree", args.sp_degree, str(exc)) from None
            resolved = engine.prepare(req)
            if resolved.demo:
                print(
                    f"k5serve: DEMO MODE - no Kandinsky 5 weights under {args.weights_dir}; "
                    f"using the tiny random-weight model at {resolved.width}x{resolved.height}, "
                    f"{resolved.num_frames} frames (output is noise). "
                    f"Get real weights with: k5serve weights download {req.variant}",
                    file=sys.stderr,
                )
            started = time.perf_counter()
            try:
                with StepProgress(resolved.steps) as progress:
                    result = engine.generate(resolved, args.output, on_step=progress.on_step)
            finally:
                if hasattr(engine, "stop"):  # a group: its ranks are processes of their own
                    engine.stop()
            elapsed = time.perf_counter() - started
        except InvalidRequest as exc:
            print(f"k5serve: invalid {exc.field}: {exc.message}", file=sys.stderr)
            return 2
        except WeightsMissing as exc:
            print(f"k5serve: {exc}", file=sys.stderr)
            return 1
        except (EngineError, WorkerLost) as exc:  # WorkerLost: a rank of the group died
            print(f"k5serve: generation failed: {exc}", file=sys.stderr)
            return 1
        except OSError as exc:
            print(f"k5serve: {exc}", file=sys.stderr)
            return 1
    print(
        f"{result.path}  ({result.width}x{result.height}, {result.num_frames} frames @ {result.fps} fps, "
        f"{result.steps} steps, seed {result.seed}, {elapsed:.1f} s)"
    )
    return 0


class StepProgress:
    """Denoising progress on stderr: a tqdm bar on a terminal, a few plain lines otherwise.

    While it is open, log records go through the bar (tqdm.write) so they land above it instead of
    being glued onto its line. A terminal that reports no size (a bare pty: 0x0) would make tqdm
    draw nothing (it computes -1 columns and rows), so the size falls back to 80x24 as
    shutil.get_terminal_size does.
    """

    PLAIN_LINES = 10  # off a terminal: about this many "denoising i/n" lines per run

    def __init__(self, total: int, stream=None) -> None:
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self.bar = None
        self._exit = contextlib.ExitStack()
        self._started = time.perf_counter()
        self._next_plain = 1

    def __enter__(self) -> StepProgress:
        if self.tty:
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            columns, rows = _terminal_size(self.stream)
            self.bar = tqdm(
                total=self.total, unit="step", desc="denoising", file=self.stream, ncols=columns - 1, nrows=rows
            )
            self._exit.enter_context(logging_redirect_tqdm(tqdm_class=tqdm))
        return self

    def __exit__(self, *exc) -> None:
        self._exit.close()
        if self.bar is not None:
            self.bar.close()

    @property
    def on_step(self) -> Callable[[int, int], None]:
        return self._bar_step if self.bar is not None else self._plain_step

    def _bar_step(self, i: int, n: int) -> None:
        self.bar.update(i - self.bar.n)
        if i == n:
            self.bar.close()  # now: the decode and the write that follow are not denoising time

    def _plain_step(self, i: int, n: int) -> None:
        # Lines for a log or a pipe: every ~10% and the last step, never a carriage-return bar.
        if i >= self._next_plain or i == n:
            print(f"denoising {i}/{n} steps ({time.perf_counter() - self._started:.1f} s)", file=self.stream)
            self._next_plain = i + max(1, n // self.PLAIN_LINES)


def _terminal_size(stream) -> tuple[int, int]:
    """(columns, rows) of the terminal behind `stream`; 80x24 for any it does not report."""
    try:
        size = os.get_terminal_size(stream.fileno())
        columns, rows = size.columns, size.lines
    except (OSError, ValueError, AttributeError):
        columns, rows = 0, 0
    return columns or 80, rows or 24
