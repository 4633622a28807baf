"""Why the server refuses a request: one small hierarchy, raised by shared code, rendered by contracts.

Shared code (admission, API keys, body limits) raises these; it never builds a response itself. The
app's one exception handler finds the contract that owns the request's path (contracts.py) and lets
it word the answer in its own shape, from one table in its module. User errors (BadInput, TooLarge,
Unauthorized, ModelUnavailable) are kept apart from capacity and infrastructure refusals
(QueueFull, Unavailable): the contracts map the first to 4xx and the second to 429/503.
"""

from __future__ import annotations

from pipelines.errors import reword


class Refused(Exception):
    """Base: the request is refused before any job exists (or, for fal, is recorded as failed)."""

    status = 400  # the plain HTTP status, for paths no contract owns; contracts choose their own

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class BadInput(Refused):
    """A value the server cannot run. `field` is the engine's name for it (contracts map it to their
    own: steps -> num_inference_steps, image -> image_url / input_reference), `value` what was sent."""

    def __init__(self, field: str, value: object, message: str):
        super().__init__(message)
        self.field = field
        self.value = value

    def message_for(self, field: str) -> str:
        """The message worded with the client's field name ("steps must…" -> "num_inference_steps must…")."""
        return reword(self.message, self.field, field)


class ModelUnavailable(Refused):
    """The model is known but its weights are not on this server; the message names the download command."""

    status = 404


class QueueFull(Refused):
    status = 429

    def __init__(self, limit: int):
        super().__init__(f"the queue is full ({limit} jobs waiting); try again later")
        self.limit = limit


class Unavailable(Refused):
    """No new job can be accepted now: the device is unusable, warm-up failed or the job store
    cannot write. Every contract answers 503 in its own error shape with this message."""

    status = 503


class Unauthorized(Refused):
    """A missing or wrong API key (--api-key)."""

    status = 401

    def __init__(self, message: str = "missing or invalid API key"):
        super().__init__(message)


class TooLarge(Refused):
    """The request body is over K5SERVE_MAX_BODY_BYTES."""

    status = 413
