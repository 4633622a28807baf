"""The approximate modes' yardstick (test_quant.py, test_fp8_compute.py): one request's exact frames
and how far another seed moves them, computed once per session on the session engine."""

from __future__ import annotations

import pytest

# One request the approximate modes' drift is measured on (test_quant.py, test_fp8_compute.py)
APPROX_REQ = dict(variant="kandinsky5-tiny-t2v", prompt="a red fox", width=96, height=64, num_frames=9, steps=3, seed=3)


@pytest.fixture(scope="session")
def exact_and_seed_gap(engine):
    """APPROX_REQ's exact frames on the session engine, and the mean |diff| another seed makes: the
    scale an approximation's drift is bounded against."""
    from pipelines.request import GenerationRequest

    a = engine.generate_frames(GenerationRequest(**APPROX_REQ))
    b = engine.generate_frames(GenerationRequest(**{**APPROX_REQ, "seed": 4}))
    assert a.approximations == []  # exact results say nothing
    return a.frames, float(abs(a.frames - b.frames).mean())
