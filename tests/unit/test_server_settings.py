"""Settings: defaults, K5SERVE_* environment variables, CLI flags, and clear startup errors."""

from __future__ import annotations

import subprocess
import sys

import fakes
import pytest
from pydantic import ValidationError
from server_fixtures import ROOT, app_client, wait_until

from server import cli
from server.settings import Settings


def test_defaults_bind_loopback(monkeypatch):
    for key in list(__import__("os").environ):
        if key.startswith("K5SERVE_"):
            monkeypatch.delenv(key)
    s = Settings()
    assert (s.host, s.port, s.api_keys, s.fal_run_port, s.require_weights) == ("127.0.0.1", 8000, [], None, False)
    assert str(s.data_dir) == "data" and str(s.weights_dir) == "weights"


def test_every_flag_reads_its_environment_variable(monkeypatch, tmp_path):
    (tmp_path / "c.pem").write_text("x")
    (tmp_path / "k.pem").write_text("x")
    env = {
        "K5SERVE_HOST": "0.0.0.0",
        "K5SERVE_PORT": "9000",
        "K5SERVE_WEIGHTS_DIR": "/w",
        "K5SERVE_DATA_DIR": "/d",
        "K5SERVE_DEVICE": "cuda:1",
        "K5SERVE_MODELS": "kandinsky5-tiny-t2v, kandinsky5-tiny-i2v",
        "K5SERVE_API_KEY": "k1,k2",
        "K5SERVE_PUBLIC_URL": "https://videos.example.com/",
        "K5SERVE_SSL_CERTFILE": str(tmp_path / "c.pem"),
        "K5SERVE_SSL_KEYFILE": str(tmp_path / "k.pem"),
        "K5SERVE_MAX_QUEUE": "7",
        "K5SERVE_FAL_RUN_PORT": "9001",
        "K5SERVE_REQUIRE_WEIGHTS": "true",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    s = Settings()
    assert (s.host, s.port, str(s.weights_dir), str(s.data_dir), s.device) == ("0.0.0.0", 9000, "/w", "/d", "cuda:1")
    assert s.models == ["kandinsky5-tiny-t2v", "kandinsky5-tiny-i2v"] and s.api_keys == ["k1", "k2"]
    assert s.public_url == "https://videos.example.com" and s.tls
    assert (s.max_queue, s.fal_run_port, s.require_weights) == (7, 9001, True)


def test_cli_flags_override_the_environment(monkeypatch):
    monkeypatch.setenv("K5SERVE_PORT", "9000")
    seen = {}
    monkeypatch.setattr("server.app.run", lambda settings: seen.setdefault("s", settings) and 0)
    argv = [
        "serve",
        "--port",
        "8123",
        "--api-key",
        "a",
        "--api-key",
        "b",
        "--models",
        "kandinsky5-tiny-t2v",
        "--fal-run-port",
        "8124",
        "--require-weights",
    ]
    assert cli.main(argv) == 0
    s = seen["s"]
    assert (s.port, s.api_keys, s.models, s.fal_run_port, s.require_weights) == (
        8123,
        ["a", "b"],
        ["kandinsky5-tiny-t2v"],
        8124,
        True,
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ssl_certfile": "/nope.pem"}, "both ssl_certfile and ssl_keyfile"),
        ({"public_url": "videos.example.com"}, r"absolute http\(s\) URL"),
        ({"port": 8000, "fal_run_port": 8000}, "must differ"),
        ({"max_queue": 0}, "greater than or equal to 1"),
    ],
)
def test_bad_settings_are_rejected_with_a_reason(kwargs, message):
    with pytest.raises(ValidationError, match=message):
        Settings(**kwargs)


def test_serve_prints_setting_errors_instead_of_a_traceback(capsys):
    assert cli.main(["serve", "--ssl-certfile", "/missing.pem"]) == 2
    assert "k5serve serve:" in capsys.readouterr().err


def test_require_weights_refuses_to_start_without_weights(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "server.cli",
            "serve",
            "--weights-dir",
            str(tmp_path),
            "--data-dir",
            str(tmp_path),
            "--require-weights",
            "--port",
            "0",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and "k5serve weights download" in proc.stderr


def test_public_url_makes_every_url_absolute_on_it(tmp_path):
    with app_client(fakes.FakeEngine(), tmp_path, public_url="https://videos.example.com") as client:
        sub = client.post("/fal-ai/kandinsky5/text-to-video", json={"prompt": "x", "num_inference_steps": 1}).json()
        assert sub["status_url"].startswith("https://videos.example.com/fal-ai/kandinsky5/requests/")
        rid = sub["request_id"]
        wait_until(lambda: client.get(f"/fal-ai/kandinsky5/requests/{rid}/status").status_code == 200)
        url = client.get(f"/fal-ai/kandinsky5/requests/{rid}").json()["video"]["url"]
        assert url.startswith("https://videos.example.com/files/")


@pytest.mark.parametrize(("flag", "expected"), [("auto", False), ("on", True), ("off", False)])
def test_compile_flag_reaches_the_engine(monkeypatch, tmp_path, flag, expected):
    """--compile auto|on|off (K5SERVE_COMPILE): auto is on for CUDA only, so off on this CPU. The
    engine is built in a worker process, by the factory named in settings (worker_main.py)."""
    from server.worker_main import build_engine, load_factory

    seen = {}
    monkeypatch.setattr("server.app.run", lambda settings: seen.setdefault("s", settings) and 0)
    assert cli.main(["serve", "--compile", flag, "--weights-dir", str(tmp_path), "--device", "cpu"]) == 0
    assert seen["s"].compile == flag
    factory = load_factory(seen["s"].engine_factory)
    assert factory is build_engine
    assert factory(["cpu"], **seen["s"].engine_options()).options.compile is expected


def test_compile_flag_rejects_other_values(capsys):
    with pytest.raises(SystemExit):
        cli.main(["serve", "--compile", "yes"])
    assert "--compile" in capsys.readouterr().err


def test_prompt_expansion_is_off_by_default_and_set_by_flag_or_environment(monkeypatch):
    monkeypatch.delenv("K5SERVE_EXPAND_PROMPTS", raising=False)
    assert Settings().expand_prompts is False  # the exact diffusers pipeline unless asked
    monkeypatch.setenv("K5SERVE_EXPAND_PROMPTS", "true")
    assert Settings().expand_prompts is True
    monkeypatch.delenv("K5SERVE_EXPAND_PROMPTS")
    seen = {}
    monkeypatch.setattr("server.app.run", lambda settings: seen.setdefault("s", settings) and 0)
    assert cli.main(["serve", "--expand-prompts"]) == 0
    assert seen["s"].expand_prompts is True


def test_device_memory_flag_and_environment_reach_the_engine_in_bytes(monkeypatch, tmp_path):
    """--device-memory GIB (K5SERVE_DEVICE_MEMORY) overrides the detected budget; the flag wins."""
    from server.pool import local_workers
    from server.worker_main import build_engine

    seen = {}
    monkeypatch.setattr("server.app.run", lambda settings: seen.setdefault("s", settings) and 0)
    monkeypatch.setenv("K5SERVE_DEVICE_MEMORY", "12")
    assert cli.main(["serve", "--weights-dir", str(tmp_path), "--device", "cpu"]) == 0
    assert seen.pop("s").device_memory == 12
    assert cli.main(["serve", "--device-memory", "1.5", "--weights-dir", str(tmp_path), "--device", "cpu"]) == 0
    engine = build_engine(["cpu"], **seen["s"].engine_options())  # what a worker process builds
    assert engine.capacity == 3 * 2**29 and engine.placements.capacity == engine.capacity
    front = local_workers(seen["s"]).front  # and admission's fit check counts the same budget
    assert front.preparer.placements.capacity == engine.capacity
    monkeypatch.delenv("K5SERVE_DEVICE_MEMORY")
    with pytest.raises(ValidationError, match="device_memory"):
        Settings(device_memory=0)
