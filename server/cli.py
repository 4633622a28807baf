"""`k5serve` command line: serve, generate, weights (flags fixed by design.md).

Every flag also reads K5SERVE_<FLAG> from the environment.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _env(flag: str, default=None):
    return os.environ.get("K5SERVE_" + flag.upper().replace("-", "_"), default)


def _env_list(flag: str) -> list[str]:
    raw = _env(flag)
    return [item.strip() for item in raw.split(",") if item.strip()] if raw else []


def _add_weights_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights-dir", default=_env("weights-dir", "weights"), type=Path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="k5serve", description="Kandinsky 5 video generation server")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the HTTP server")
    serve.add_argument("--host", default=None)
    serve.add_argument("--port", type=int, default=None)
    _add_weights_dir(serve)
    serve.add_argument("--data-dir", default=None, type=Path)
    serve.add_argument("--device", default=None, help="auto|cpu|cuda|cuda:N (one worker; see --devices)")
    serve.add_argument(
        "--devices",
        default=None,
        help="one worker process per device: auto (every visible GPU, else the CPU), all, or a list "
        "such as cuda:0,cuda:2 or cpu,cpu; a+b joins devices into one sequence-parallel group",
    )
    serve.add_argument("--sp-degree", type=int, default=None, help="devices per sequence-parallel group (default 1)")
    serve.add_argument("--models", default=None, help="comma-separated variant names to load")
    serve.add_argument("--api-key", action="append", default=None, help="repeat for several keys")
    serve.add_argument("--public-url", default=None)
    serve.add_argument("--ssl-certfile", default=None)
    serve.add_argument("--ssl-keyfile", default=None)
    serve.add_argument("--max-queue", type=int, default=None)
    serve.add_argument("--fal-run-port", type=int, default=None)
    serve.add_argument("--require-weights", action="store_true", default=None)
    serve.add_argument(
        "--memory-mode",
        default=None,
        choices=["auto", "gpu", "offload_text", "stream_text", "offload_model", "stream"],
        help="where the weights live (docs/memory.md); default: auto, the fastest that fits",
    )
    serve.add_argument("--host-memory", type=float, default=None, help="GiB of host RAM for offloaded weights")
    serve.add_argument(
        "--text-encoder-int8", action="store_true", default=None, help="8-bit Qwen weights (approximate, labelled)"
    )
    serve.add_argument(
        "--fp8-weights",
        action="store_true",
        default=None,
        help="scaled fp8 transformer weights (approximate, labelled)",
    )
    serve.add_argument(
        "--fp8-compute",
        action="store_true",
        default=None,
        help="fp8 matmuls for the transformer's attention and FFN-in projections; CUDA sm_89+ only "
        "(approximate, labelled)",
    )
    serve.add_argument(
        "--device-memory",
        type=float,
        default=None,
        metavar="GIB",
        help="device memory budget in GiB (default: what the GPU reports); models are evicted to stay under it",
    )
    serve.add_argument(
        "--compile", default=None, choices=["auto", "on", "off"], help="compile the transformer blocks (auto: on CUDA)"
    )
    serve.add_argument(
        "--expand-prompts",
        action="store_true",
        default=None,
        help="rewrite prompts with Qwen2.5-VL first, as the official pipelines (default: off, as diffusers)",
    )
    serve.add_argument(
        "--ray-address",
        default=None,
        help="run the workers as Ray actors on this cluster's GPUs (auto: the one `ray start` made here)",
    )

    gen = sub.add_parser("generate", help="make one video and exit")
    gen.add_argument("prompt")
    gen.add_argument("-o", "--output", required=True, type=Path)
    gen.add_argument("--model", default=_env("model", "kandinsky5-lite-t2v-distilled-5s"))
    gen.add_argument("--image", default=_env("image"), help="image file or http(s) URL (image-to-video)")
    gen.add_argument("--negative-prompt", default=_env("negative-prompt"))
    gen.add_argument("--seed", type=int, default=_env("seed"))
    gen.add_argument("--steps", type=int, default=_env("steps"))
    gen.add_argument("--guidance", type=float, default=_env("guidance"))
    size = gen.add_mutually_exclusive_group()
    size.add_argument("--resolution", default=_env("resolution"), help="WxH, e.g. 768x512")
    size.add_argument("--aspect-ratio", default=_env("aspect-ratio"), choices=["3:2", "1:1", "2:3"])
    gen.add_argument("--duration", type=int, default=_env("duration"), choices=[5, 10])
    gen.add_argument("--frames", type=int, default=_env("frames"), help="frame count (4k+1); overrides --duration")
    _add_weights_dir(gen)
    gen.add_argument("--device", default=_env("device", "auto"))
    gen.add_argument(
        "--devices",
        default=_env("devices"),
        help="devices for one sequence-parallel group, e.g. cuda:0,cuda:1 or cpu,cpu (the first --sp-degree are used)",
    )
    gen.add_argument(
        "--sp-degree",
        type=int,
        default=int(_env("sp-degree", "1")),
        help="devices that make the video together (Ulysses sequence parallelism; docs/scale-out.md)",
    )

    weights = sub.add_parser("weights", help="list, download or verify checkpoints")
    wsub = weights.add_subparsers(dest="weights_command", required=True)
    wl = wsub.add_parser("list")
    _add_weights_dir(wl)
    wd = wsub.add_parser("download")
    wd.add_argument("name")
    _add_weights_dir(wd)
    wd.add_argument("--from", dest="source", type=Path, default=None, help="import a folder copied by hand")
    wv = wsub.add_parser("verify")
    wv.add_argument("name")
    _add_weights_dir(wv)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "generate":
        from .generate_cmd import run_generate

        return run_generate(args)
    from pipelines import weights

    return weights.main(args)


def _serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from .app import run
    from .settings import Settings

    overrides = {k: v for k, v in vars(args).items() if v is not None and k != "command"}
    if "models" in overrides:
        overrides["models"] = [m.strip() for m in overrides["models"].split(",") if m.strip()]
    if "api_key" in overrides:
        overrides["api_keys"] = overrides.pop("api_key")
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        for err in exc.errors():
            where = "--" + str(err["loc"][0]).replace("_", "-") if err["loc"] else "settings"
            print(f"k5serve serve: {where}: {err['msg']}", file=sys.stderr)
        return 2
    return run(settings)


if __name__ == "__main__":
    sys.exit(main())
