"""Errors the engine raises. Torch-free so the server can catch them by type."""

from __future__ import annotations


class EngineError(Exception):
    """Base class for everything the engine raises on purpose."""


class InvalidRequest(EngineError, ValueError):
    """A request the model cannot do. `field` names the offending input, `value` is what was sent."""

    def __init__(self, field: str, value: object, message: str):
        super().__init__(message)
        self.field = field
        self.value = value
        self.message = message

    def message_for(self, field: str) -> str:
        """The message worded with the client's field name ("steps must…" -> "num_inference_steps must…")."""
        return reword(self.message, self.field, field)


def reword(message: str, field: str, wire_field: str) -> str:
    """`message` about `field`, worded with the name the client used for it, when it starts with it."""
    if wire_field != field and message.startswith(field + " "):
        return wire_field + message[len(field) :]
    return message


class WeightsMissing(EngineError):
    """The variant's checkpoint folder is absent or incomplete."""

    def __init__(self, variant: str, path: str, missing: list[str]):
        self.variant = variant
        self.path = path
        self.missing = missing
        what = ", ".join(missing)
        super().__init__(
            f"weights for {variant} are not available: {path} is missing {what}. "
            f"Fix: k5serve weights download {variant}"
        )

    @property
    def command(self) -> str:
        return f"k5serve weights download {self.variant}"


class Cancelled(EngineError):
    """The job's cancel token was set; raised at a step boundary, before any VAE decode."""


class OutOfMemory(EngineError):
    """The device ran out of memory for this request; the engine has freed what it could."""


class DeviceFailure(EngineError):
    """An unrecoverable device error (e.g. a CUDA launch failure): later jobs would fail too."""
