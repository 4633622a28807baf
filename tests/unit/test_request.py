"""pipelines.request: the resolved request survives its round trip through the job store."""

from __future__ import annotations

import json

import pytest

from pipelines.request import GenerationRequest, ResolvedRequest, resolve


@pytest.mark.parametrize(
    "req",
    [
        GenerationRequest(variant="kandinsky5-lite-t2v-sft-5s", prompt="a fox", seed=7, acceleration="regular"),
        GenerationRequest(variant="kandinsky5-tiny-t2v", prompt="a fox", width=128, height=96, num_frames=9, seed=1),
    ],
)
def test_resolved_request_round_trips_through_json(req):
    resolved = resolve(req)
    for candidate in (resolved, resolved.as_demo()):
        back = ResolvedRequest.from_dict(json.loads(json.dumps(candidate.to_dict())))
        assert back == candidate
        assert back.requested == candidate.requested  # not part of ==, so checked apart
        assert back.variant is candidate.variant


def test_an_unknown_variant_is_a_key_error():
    data = resolve(GenerationRequest(variant="kandinsky5-tiny-t2v", prompt="x", seed=1)).to_dict()
    with pytest.raises(KeyError):
        ResolvedRequest.from_dict({**data, "variant": "no-such-variant"})


def test_prompt_expansion_is_off_unless_asked_and_survives_the_store():
    base = GenerationRequest(variant="kandinsky5-tiny-t2v", prompt="a fox", seed=1)
    assert resolve(base).expand_prompt is False
    on = resolve(GenerationRequest(variant="kandinsky5-tiny-t2v", prompt="a fox", seed=1, expand_prompt=True))
    assert on.expand_prompt is True
    assert ResolvedRequest.from_dict(json.loads(json.dumps(on.to_dict()))).expand_prompt is True


def test_a_record_stored_before_prompt_expansion_still_loads():
    data = resolve(GenerationRequest(variant="kandinsky5-tiny-t2v", prompt="a fox", seed=1)).to_dict()
    del data["expand_prompt"], data["requested"]["expand_prompt"]
    old = ResolvedRequest.from_dict(data)
    assert old.expand_prompt is False and old.requested.expand_prompt is None
