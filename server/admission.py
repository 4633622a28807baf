"""The one admission path: a contract's parsed request -> a queued Job, or a `Refused` error.

Every contract parses its wire body into a `Draft` and calls `Admission.admit`; everything between
happens here, once, in this order:

  1. prompt limits      cheap, so an over-long prompt is refused before any image is fetched
  2. job id + scratch   the contract's id format; the job's input folder, removed on any refusal
  3. image intake       URL / data: URI / upload -> a checked local file (intake.py, SSRF guard);
                        this server's own upload URLs are read from disk (uploads.py)
     video intake       a remix's / an extension's source: an uploaded mp4's bytes or a finished
                        job's stored mp4 -> the job's own input file (a source that expires or is
                        deleted while the job waits is still there when it runs)
  4. seed               drawn here and stored: a run repeated after a crash makes the same video
                        (and prompt expansion, when the request does not say: the server's default)
  5. resolve            once, by the engine: validated against the variant, demo stand-in, weights
                        present, fits the device's memory
  6. queue              persisted with its resolved request; the worker runs exactly that

Errors are the server.errors hierarchy; each contract renders them from one table.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.errors import InvalidRequest, WeightsMissing
from pipelines.request import GenerationRequest, ResolvedRequest

from .contracts import Contract
from .engine_protocol import EngineLike
from .errors import BadInput, ModelUnavailable
from .intake import ImageInputError, IntakeLimits, fetch_image
from .jobs import ErrorKind, Job, JobError, short_value
from .manager import JobManager
from .storage import Storage
from .uploads import Uploads


@dataclass(frozen=True)
class Draft:
    """What a contract parsed from its wire body: the request, and an image still to be fetched."""

    model: str  # the model id as the client sent it (reported back to the client)
    request: GenerationRequest  # `image` is filled in at admission from `image`, `video`/`extend` from `video`
    image: str | bytes | None = None  # an http(s) URL, a data: URI or an uploaded file's bytes
    # a source video: an uploaded file's bytes, or a file this server holds (a finished job's mp4;
    # never a path a client named). Remixed (video-to-video) or, with `extend`, continued.
    video: Path | bytes | None = None
    extend: bool = False


class Admission:
    def __init__(
        self,
        engine: EngineLike,
        manager: JobManager,
        storage: Storage,
        limits: IntakeLimits,
        max_prompt_chars: int,
        uploads: Uploads | None = None,
        *,
        expand_prompts: bool = False,
    ):
        """`expand_prompts`: the server's default for a request that does not say (K5SERVE_EXPAND_PROMPTS)."""
        self.engine = engine
        self.expand_prompts = expand_prompts
        self.manager = manager
        self.storage = storage
        self.limits = limits
        self.max_prompt_chars = max_prompt_chars
        self.uploads = uploads

    async def admit(
        self,
        contract: Contract,
        draft: Draft,
        *,
        base_url: str | None = None,
        webhook_url: str | None = None,
        meta: dict[str, Any] | None = None,
        waits: bool | None = None,
    ) -> Job:
        """Queue `draft` for `contract`. Raises BadInput, ModelUnavailable, QueueFull or Unavailable;
        nothing of a refused request stays on disk. `meta` is kept with the job for the contract.
        `waits`: the caller holds the connection for the result (default: the contract's
        `synchronous`); recorded on the job (Job.waits)."""
        request = draft.request
        self.check_text(request.prompt, request.negative_prompt)  # 1
        job_id = contract.new_job_id()  # 2
        try:
            if draft.image is not None:  # 3
                image = await self._fetch(contract, job_id, draft.image, base_url)
                request = dataclasses.replace(request, image=image)
            if draft.video is not None:
                video = await asyncio.to_thread(self._take_video, job_id, draft.video)
                request = dataclasses.replace(request, **{"extend" if draft.extend else "video": video})
            if request.seed is None:  # 4
                request = dataclasses.replace(request, seed=secrets.randbelow(2**31))
            if request.expand_prompt is None:  # 4b: the server's default, stored: what will run
                request = dataclasses.replace(request, expand_prompt=self.expand_prompts)
            if draft.video is not None:  # 5: the source is probed (decoded by ffmpeg): not on the event loop
                resolved = await asyncio.to_thread(self.resolve, request)
            else:
                resolved = self.resolve(request)
            return await asyncio.to_thread(  # 6: never block the event loop on the store
                self.manager.submit,
                contract=contract.name,
                model=draft.model,
                request=request,
                resolved=resolved,
                base_url=base_url,
                webhook_url=webhook_url,
                meta=dict(meta or {}),
                job_id=job_id,
                waits=contract.synchronous if waits is None else waits,
            )
        except BaseException:
            self.storage.remove_inputs(job_id)
            raise

    async def reject(
        self,
        contract: Contract,
        model: str,
        error: BadInput,
        *,
        base_url: str | None = None,
        webhook_url: str | None = None,
        meta: dict[str, Any] | None = None,
    ) -> Job:
        """Record a refused request as a FAILED job with no request (fal: invalid input is accepted at
        submit and reported on the result route, and through the webhook)."""
        failure = JobError(ErrorKind.INVALID_INPUT, error.message, error.field, short_value(error.value))
        return await asyncio.to_thread(
            self.manager.submit,
            contract=contract.name,
            model=model,
            request=None,
            base_url=base_url,
            webhook_url=webhook_url,
            meta=dict(meta or {}),
            error=failure,
            job_id=contract.new_job_id(),
        )

    def check_text(self, prompt: object, negative_prompt: object = None) -> None:
        """The server's own limit on prompt length, worded with the setting that sets it."""
        limit = self.max_prompt_chars
        for name, value in (("prompt", prompt), ("negative_prompt", negative_prompt)):
            if isinstance(value, str) and len(value) > limit:
                raise BadInput(
                    name, value, f"{name} is {len(value)} characters; the limit is {limit} (K5SERVE_MAX_PROMPT_CHARS)"
                )

    def resolve(self, request: GenerationRequest) -> ResolvedRequest:
        """The request as it will run (the engine validates, picks the demo stand-in, checks the
        weights and the memory fit). The job stores it; nothing resolves it again."""
        try:
            return self.engine.prepare(request)
        except InvalidRequest as exc:
            raise BadInput(exc.field, exc.value, exc.message) from exc
        except WeightsMissing as exc:
            raise ModelUnavailable(str(exc)) from exc

    def _take_video(self, job_id: str, source: Path | bytes) -> str:
        """The source video as the job's own input file (a hard link to a stored output when the
        file system allows, else a copy)."""
        path = self.storage.input_path(job_id, ".video.mp4")
        if isinstance(source, bytes):
            if len(source) > self.limits.max_bytes:
                limit = f"the limit is {self.limits.max_bytes} (K5SERVE_IMAGE_MAX_BYTES)"
                raise BadInput("video", f"{len(source)} bytes", f"video is {len(source)} bytes; {limit}")
            path.write_bytes(source)
        else:
            try:
                os.link(source, path)
            except OSError:
                shutil.copyfile(source, path)
        return str(path)

    async def _fetch(self, contract: Contract, job_id: str, source: str | bytes, base_url: str | None) -> str:
        field = contract.wire_field("image")
        try:
            if isinstance(source, str) and self.uploads is not None:
                # this server's own upload: read from disk, never fetched (the guard stays closed to loopback)
                source = await asyncio.to_thread(self.uploads.own_image, source, base_url, field) or source
            path, _ = await fetch_image(source, self.storage.input_path(job_id, ""), self.limits, field)
        except ImageInputError as exc:
            raise BadInput("image", source, exc.message) from exc
        return str(path)
