"""Shared fixtures. Tiny checkpoints are built once per session and loaded from disk through
the real loader, exactly as real weights are."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


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
from server_fixtures import live_server, loopback, tls_files  # noqa: E402,F401
