"""What the simple text-to-video contracts (AI/ML API, OneRouter) build the same way once their
own parsers have checked the wire fields: the GenerationRequest for a public or local model id."""

from __future__ import annotations

from pipelines.request import GenerationRequest
from pipelines.variants import demo_size, resolve_model


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
    variant, public = resolve_model(model, seconds)
    if variant.demo:  # the tiny demo variants make at most 256 px: same aspect, demo size
        width, height = demo_size(width, height)
    return GenerationRequest(
        variant=variant.name,
        prompt=prompt,
        negative_prompt=negative_prompt,
        width=width,
        height=height,
        seconds=seconds,
        steps=steps if steps is not None else (public.steps if public else None),
        guidance=public.guidance if public else None,
        seed=seed,
    )
