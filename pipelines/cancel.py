"""Cancellation as an interface: what the engine checks at every step boundary, and two tokens.

The engine only reads a `Cancellation` (`cancelled`, `raise_if_cancelled()`); who sets it and how
is the token's business. `CancelToken` is the in-process one the server's worker thread uses.
`ProcessCancelToken` is backed by a multiprocessing Event, so the same protocol works when the
engine runs in a child process: the parent keeps the token and cancels, the child generates.
(A Ray actor would get a token backed by something Ray can share, e.g. an actor flag; the engine
would not change.)
"""

from __future__ import annotations

import multiprocessing
import threading
from typing import Protocol, runtime_checkable

from .errors import Cancelled


@runtime_checkable
class Cancellation(Protocol):
    """Read side of a cancel token: the engine calls `raise_if_cancelled()` at step boundaries."""

    @property
    def cancelled(self) -> bool: ...

    def raise_if_cancelled(self) -> None: ...


@runtime_checkable
class CancelSwitch(Cancellation, Protocol):
    """Both sides: whoever owns a run (the job manager) calls `cancel()`; the engine reads it."""

    def cancel(self) -> None: ...


class _Token:
    """`raise_if_cancelled` in terms of `cancelled`, shared by the tokens below."""

    @property
    def cancelled(self) -> bool:
        raise NotImplementedError

    def raise_if_cancelled(self) -> None:
        if self.cancelled:
            raise Cancelled("cancelled")


class CancelToken(_Token):
    """Set from any thread of this process; the engine stops at the next step boundary."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()


class ProcessCancelToken(_Token):
    """A token that crosses into child processes: pass it to a `multiprocessing` Process (or pool
    initializer) of the same context and a cancel in either process is seen in both.

    Like every multiprocessing synchronisation object it travels when a process is started, not
    through a queue or pipe afterwards.
    """

    def __init__(self, context: multiprocessing.context.BaseContext | None = None) -> None:
        self._event = (context or multiprocessing.get_context("spawn")).Event()

    def cancel(self) -> None:
        self._event.set()

    def reset(self) -> None:
        """Re-arm for the next run: a worker process keeps one token for its whole life, since a
        token cannot be handed to a process after it has started."""
        self._event.clear()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()
