"""Sequence-parallel degrees, torch-free: what start-up and admission refuse (pipelines/variants.py)."""

from __future__ import annotations

import pytest

from pipelines.memory import DITS
from pipelines.variants import ATTENTION_HEADS, VARIANTS, sp_degree_problem, valid_sp_degrees

LITE, PRO, TINY = "kandinsky5-lite-t2v-sft-5s", "kandinsky5-pro-t2v-sft-5s", "kandinsky5-tiny-t2v"


def test_valid_degrees_are_the_divisors_of_the_heads_up_to_one_node():
    assert valid_sp_degrees(LITE) == [2, 4, 7]  # 28 heads
    assert valid_sp_degrees(PRO) == [2, 4, 8]  # 32 heads
    assert valid_sp_degrees(TINY) == [2]  # the demo model: 2 heads, so the CPU tests can split it


def test_heads_follow_the_model_width_of_each_family():
    head_dims = {"lite": 64, "pro": 128, "tiny": 24}  # sum(axes_dims) of the published configs / tiny.py
    for family, heads in ATTENTION_HEADS.items():
        assert DITS[family].model_dim == heads * head_dims[family]


def test_every_variant_has_degrees():
    assert all(valid_sp_degrees(name) for name in VARIANTS)


@pytest.mark.parametrize(("names", "degree"), [([LITE], 2), ([LITE, PRO], 4), ([PRO], 8), ([TINY], 1), ([LITE], 1)])
def test_a_fitting_degree_has_no_problem(names, degree):
    assert sp_degree_problem(names, degree) is None


@pytest.mark.parametrize(
    ("names", "degree", "message"),
    [
        ([LITE], 8, "degree 8 does not fit kandinsky5-lite-t2v-sft-5s (28 attention heads"),
        ([PRO, LITE], 7, "degree 7 does not fit kandinsky5-pro-t2v-sft-5s (32 attention heads"),
        ([TINY], 4, "valid degrees: 2"),
        ([PRO], 3, "valid degrees: 2, 4, 8"),
    ],
)
def test_a_degree_that_does_not_fit_is_refused_naming_the_valid_ones(names, degree, message):
    assert message in sp_degree_problem(names, degree)
