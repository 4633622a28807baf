"""`k5serve generate PROMPT -o OUT.mp4`: one video from the command line, no server."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import tempfile
from pathlib import Path

from pipelines.errors import EngineError, InvalidRequest, WeightsMissing
from pipelines.request import GenerationRequest, request_for_model
from pipelines.variants import VARIANTS, size_for_aspect

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
    for noisy in ("httpx", "diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="k5serve-") as tmp:
        image = args.image
        try:
            if image and image.startswith(("http://", "https://")):
                image = _fetch_image(image, Path(tmp))
            req = build_request(args, image)
            from pipelines.engine import Engine

            engine = Engine(args.weights_dir, device=args.device)
            resolved = engine.prepare(req)
            if resolved.demo:
                print(
                    f"k5serve: DEMO MODE - no Kandinsky 5 weights under {args.weights_dir}; "
                    f"using the tiny random-weight model at {resolved.width}x{resolved.height}, "
                    f"{resolved.num_frames} frames (output is noise). "
                    f"Get real weights with: k5serve weights download {req.variant}",
                    file=sys.stderr,
                )
            result = engine.generate(resolved, args.output, on_step=_progress(resolved.steps))
        except InvalidRequest as exc:
            print(f"k5serve: invalid {exc.field}: {exc.message}", file=sys.stderr)
            return 2
        except WeightsMissing as exc:
            print(f"k5serve: {exc}", file=sys.stderr)
            return 1
        except EngineError as exc:
            print(f"k5serve: generation failed: {exc}", file=sys.stderr)
            return 1
        except OSError as exc:
            print(f"k5serve: {exc}", file=sys.stderr)
            return 1
    print(
        f"{result.path}  ({result.width}x{result.height}, {result.num_frames} frames @ {result.fps} fps, "
        f"{result.steps} steps, seed {result.seed}, {sum(result.timings.values()):.1f} s)"
    )
    return 0


def _progress(total: int):
    """A tqdm bar on a terminal; nothing otherwise (logs and pipes stay clean)."""
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    bar = tqdm(total=total, unit="step", desc="denoising", file=sys.stderr)

    def on_step(i: int, n: int) -> None:
        bar.update(i - bar.n)
        if i == n:
            bar.close()

    return on_step
