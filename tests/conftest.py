"""Shared fixtures. Tiny checkpoints are built once per session and loaded from disk through
the real loader, exactly as real weights are."""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path

import pytest

# ---- loopback only: no test may reach (or even resolve) anything beyond this machine ----------

_LOOPBACK_NAMES = {"localhost", "localhost.", "ip6-localhost"}


def _is_loopback(host: object) -> bool:
    if host is None or host == "":
        return True  # bind/resolve of the wildcard or a local service
    if isinstance(host, bytes):
        host = host.decode()
    if not isinstance(host, str):
        return False
    if host.lower() in _LOOPBACK_NAMES or host.lower().endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


class NonLoopbackTraffic(OSError):
    """A test tried to connect to or resolve a non-loopback address (blocked before any packet)."""


_real_connect, _real_connect_ex = socket.socket.connect, socket.socket.connect_ex
_real_getaddrinfo = socket.getaddrinfo


def _guarded_connect(self, address, *args):
    if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address[0]):
        raise NonLoopbackTraffic(f"tests may only connect to loopback, not {address[0]!r}")
    return _real_connect(self, address, *args)


def _guarded_connect_ex(self, address, *args):
    if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address[0]):
        raise NonLoopbackTraffic(f"tests may only connect to loopback, not {address[0]!r}")
    return _real_connect_ex(self, address, *args)


def _guarded_getaddrinfo(host, *args, **kwargs):
    if not _is_loopback(host):
        raise NonLoopbackTraffic(f"tests may only resolve loopback names, not {host!r}")
    return _real_getaddrinfo(host, *args, **kwargs)


socket.socket.connect = _guarded_connect  # type: ignore[method-assign]
socket.socket.connect_ex = _guarded_connect_ex  # type: ignore[method-assign]
socket.getaddrinfo = _guarded_getaddrinfo


@pytest.fixture(scope="session")
def tiny_weights_dir(tmp_path_factory) -> Path:
    """A weights folder holding both tiny variants (and nothing else: demo mode).

    Set K5SERVE_TEST_WEIGHTS to reuse a folder across runs while developing.
    """
    from pipelines.tiny import ensure_tiny

    folder = Path(os.environ.get("K5SERVE_TEST_WEIGHTS") or tmp_path_factory.mktemp("weights"))
    ensure_tiny(folder, "kandinsky5-tiny-t2v")
    ensure_tiny(folder, "kandinsky5-tiny-i2v")
    return folder


@pytest.fixture(scope="session")
def tiny_nabla_dir(tiny_weights_dir, tmp_path_factory) -> Path:
    """The tiny t2v checkpoint with a nabla transformer config (as Pro and Lite 10 s have)."""
    import json
    import shutil

    from pipelines.variants import NABLA_TRANSFORMER_CONFIG

    folder = tmp_path_factory.mktemp("nabla") / "kandinsky5-tiny-t2v"
    shutil.copytree(tiny_weights_dir / "kandinsky5-tiny-t2v", folder)
    config_path = folder / "transformer" / "config.json"
    config = json.loads(config_path.read_text())
    config.update(NABLA_TRANSFORMER_CONFIG, attention_P=0.9)
    config_path.write_text(json.dumps(config))
    return folder


@pytest.fixture
def reference_flex_calls(monkeypatch) -> list[int]:
    """Counts calls of FlexAttention's unfused reference implementation (the one that materialises
    every score); diffusers' flex module global is put back after the test."""
    import importlib

    from diffusers.models import attention_dispatch

    # start from stock diffusers' flex module: a CPU pipeline loaded earlier in this process (another
    # test module, in any order under pytest-xdist) installed the dense-on-CPU wrapper (pipelines/flex_cpu.py)
    current = attention_dispatch.flex_attention
    monkeypatch.setattr(attention_dispatch, "flex_attention", getattr(current, "_k5_original", current))
    hop = importlib.import_module("torch._higher_order_ops.flex_attention")
    calls = [0]
    original = hop.math_attention

    def counting(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(hop, "math_attention", counting)
    return calls


@pytest.fixture(scope="session")
def engine(tiny_weights_dir):
    """One CPU engine in demo mode for the session (pipelines stay loaded between tests)."""
    from pipelines.engine import Engine

    return Engine(tiny_weights_dir, device="cpu")


@pytest.fixture(scope="session")
def test_image(tmp_path_factory) -> Path:
    """A textured RGB image (a flat colour is normalised away by the random tiny VAE)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("images") / "noise.png"
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    return path


# ---- server fixtures (server engineer): live servers, TLS, in-process apps; see server_fixtures.py ----
# ---- and the approximate modes' yardstick (approx_fixtures.py) ----
from approx_fixtures import exact_and_seed_gap  # noqa: E402,F401
from server_fixtures import live_server, loopback, tls_files  # noqa: E402,F401
