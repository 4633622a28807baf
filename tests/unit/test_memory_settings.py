"""The memory flags (issue 14) reach the engine: --memory-mode's new choices, --host-memory and the
opt-in approximate weights, from the CLI and from K5SERVE_* (server/settings.py -> the engine a worker builds)."""

from __future__ import annotations

import pytest

from server import cli
from server.settings import Settings


def _serve(monkeypatch, argv: list[str]) -> Settings:
    seen = {}
    monkeypatch.setattr("server.app.run", lambda settings: seen.setdefault("s", settings) and 0)
    assert cli.main(["serve", *argv]) == 0
    return seen["s"]


def test_cli_flags(monkeypatch):
    s = _serve(monkeypatch, ["--memory-mode", "stream", "--host-memory", "48", "--fp8-weights", "--text-encoder-int8"])
    assert (s.memory_mode, s.host_memory, s.fp8_weights, s.text_encoder_int8) == ("stream", 48.0, True, True)


def test_defaults_are_exact_and_auto(monkeypatch):
    s = _serve(monkeypatch, [])
    assert (s.memory_mode, s.host_memory, s.fp8_weights, s.text_encoder_int8) == ("auto", None, False, False)


def test_environment(monkeypatch):
    monkeypatch.setenv("K5SERVE_MEMORY_MODE", "stream_text")
    monkeypatch.setenv("K5SERVE_FP8_WEIGHTS", "1")
    s = Settings()
    assert (s.memory_mode, s.fp8_weights) == ("stream_text", True)


def test_unknown_mode_is_refused(monkeypatch, capsys):
    with pytest.raises(SystemExit):
        cli.main(["serve", "--memory-mode", "everything"])
    assert "invalid choice" in capsys.readouterr().err


def test_fp8_compute_flag_and_environment_reach_the_engine_options(monkeypatch):
    """Off by default; --fp8-compute or K5SERVE_FP8_COMPUTE turns it on, as the Engine's keyword."""
    assert _serve(monkeypatch, []).engine_options()["fp8_compute"] is False
    assert _serve(monkeypatch, ["--fp8-compute"]).engine_options()["fp8_compute"] is True
    monkeypatch.setenv("K5SERVE_FP8_COMPUTE", "1")
    assert Settings().engine_options()["fp8_compute"] is True
