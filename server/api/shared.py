"""What several contracts do the same way: the text-to-video request AI/ML API and OneRouter build
once their own parsers have checked the wire fields, and the wait of the synchronous routes
(OneRouter, fal's run host)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Mapping

from fastapi import Request

from pipelines.request import GenerationRequest, request_for_model
from pipelines.variants import VARIANTS, demo_size

from ..jobs import CLIENT_DISCONNECTED, Job
from ..manager import JobManager


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
    expand_prompt: bool | None = None,
    aliases: Mapping[str, str] | None = None,
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
        expand_prompt=expand_prompt,
        aliases=aliases,
    )
    if VARIANTS[request.variant].demo:  # the tiny demo variants make at most 256 px: same aspect, demo size
        width, height = demo_size(width, height)
        request = dataclasses.replace(request, width=width, height=height)
    return request


async def hold_until_done(manager: JobManager, job: Job, request: Request) -> Job:
    """A synchronous route (OneRouter, fal's run host) waits on the connection until `job` ends.
    A caller that hangs up cancels its job (CLIENT_DISCONNECTED): nobody is left to read the
    result, so the GPU goes to the others. Returns the job as it ended."""
    asked = False
    while not job.status.terminal:
        job = await manager.wait_for_change(job.id, job.version, timeout=1.0)
        if not asked and not job.status.terminal and await request.is_disconnected():
            await asyncio.to_thread(manager.cancel, job.id, CLIENT_DISCONNECTED)
            asked = True  # a running job stops at its next step; keep waiting for that
    return job
