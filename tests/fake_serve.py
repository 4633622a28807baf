"""`k5serve serve` with a fake engine, as a real process (restart and webhook tests kill it).

Same flags as `k5serve serve`; the fake's speed comes from K5SERVE_FAKE_STEP_TIME (seconds/step),
its other knobs (kill points and the calls that pause at them, big videos, file size limits, memory)
from the K5SERVE_FAKE_* variables listed in fakes.engine_from_env.

With K5SERVE_ENGINE_FACTORY set (fakes:worker_engine) the server runs as `k5serve serve` does: one
worker PROCESS per --devices entry, each building its fake through that factory (fakes.worker_engine).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fakes import engine_from_env

from server.app import run
from server.cli import build_parser
from server.settings import Settings


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None and k != "command"}
    if "api_key" in overrides:
        overrides["api_keys"] = overrides.pop("api_key")
    settings = Settings(**overrides)
    if settings.engine_factory != Settings.model_fields["engine_factory"].default:
        return run(settings)  # worker processes, as `k5serve serve`
    return run(settings, engine=engine_from_env())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
