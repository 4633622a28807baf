"""json_echo: the bounded echo of a bad input that keeps its JSON shape (fal's 422 `input`)."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from server.jobs import json_echo

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=80),
    lambda inner: st.lists(inner, max_size=8) | st.dictionaries(st.text(max_size=80), inner, max_size=8),
    max_leaves=40,
)


def test_small_values_come_back_as_sent():
    for value in ({}, {"num_inference_steps": 3}, [1, "a", None, True, 2.5], {"a": {"b": [{"c": "d"}]}}, "x", 7):
        assert json_echo(value) == value


def test_long_strings_and_big_containers_are_cut_but_keep_their_shape():
    cut = json_echo({"prompt": "x" * 10_000, "n": 1})
    assert cut == {"prompt": "x" * 200 + "…", "n": 1}
    many = json_echo({f"k{i}": "v" * 100 for i in range(1000)})
    assert isinstance(many, dict) and list(many)[-1] == "…" and len(json.dumps(many)) < 2600
    long = json_echo(list(range(100_000)))
    assert isinstance(long, list) and long[0] == 0 and long[-1] == "…" and len(json.dumps(long)) < 2600


def test_deep_nesting_is_text_past_eight_levels():
    deep: list = []
    for _ in range(200):
        deep = [deep]
    echoed = json_echo(deep)
    for _ in range(8):
        (echoed,) = echoed
    assert isinstance(echoed, str) and echoed.startswith("[[")


@given(JSON)
def test_any_json_value_echoes_as_strict_json_within_the_budget(value):
    # A small budget so the generated values overrun it. Past the budget: at most the entry that
    # crossed it (a key and a value, each at most `limit` characters of up to 12 JSON characters)
    # and a closing "…" per level.
    text = json.dumps(json_echo(value, budget=300, limit=20), allow_nan=False)  # NaN: text, strict JSON
    assert len(text) <= 300 + 2 * (12 * 21 + 2) + 8 * 12
