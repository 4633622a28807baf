"""What the simple text-to-video contracts (AI/ML API, OneRouter) build the same way once their
own parsers have checked the wire fields: the GenerationRequest for a public or local model id."""

from __future__ import annotations

import dataclasses

from pipelines.request import GenerationRequest, request_for_model
from pipelines.variants import VARIANTS, demo_size


def t2v_request(
    model: str,
    *,
    prompt: str,
    negative_prompt: str | None,
    width: int,
    height: int,
    seconds: int,
    steps: int | None,
    seed: int | None,
) -> GenerationRequest:
    """The request for `model` at `seconds`: the public id's steps and guidance unless `steps` is
    given; the demo variants keep the aspect at their demo size. Raises ValueError (from
    resolve_model) when the model has no variant of that length."""
    request = request_for_model(
        model,
        prompt,
        seconds=seconds,
        steps=steps,
        negative_prompt=negative_prompt,
        width=width,
        height=height,
        seed=seed,
    )
    if VARIANTS[request.variant].demo:  # the tiny demo variants make at most 256 px: same aspect, demo size
        width, height = demo_size(width, height)
        request = dataclasses.replace(request, width=width, height=height)
    return request
