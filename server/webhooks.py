"""Webhook deliveries: durable, retried with exponential backoff, never on the worker's thread.

A finished job's delivery is written to SQLite in the same transaction as its terminal state
(store.py), so it survives a restart. This asyncio task POSTs due deliveries, marks them
delivered on any 2xx, and otherwise retries after backoff * 2**attempt (capped) until
webhook_max_attempts, then gives up. Every POST goes through the URL guard (netguard.py): a URL it
refuses (a private address, a metadata host, ...) is abandoned at once, not retried. A crash
between a receiver's 2xx and our bookkeeping can repeat one delivery; receivers must be
idempotent on request_id (fal says the same).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import httpx

from .netguard import UrlGuard, UrlRefused
from .store import JobStore, WebhookDelivery

log = logging.getLogger("k5serve.webhooks")


class WebhookDispatcher:
    def __init__(
        self,
        store: JobStore,
        *,
        timeout: float = 15.0,
        max_attempts: int = 10,
        backoff: float = 2.0,
        max_backoff: float = 900.0,
        concurrency: int = 8,
        clock: Callable[[], float] = time.time,
        guard: UrlGuard | None = None,
    ):
        self.store = store
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.clock = clock
        self.guard = guard or UrlGuard()
        self._slots: asyncio.Semaphore | None = None  # created on the loop in start()
        self._concurrency = concurrency
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._in_flight: dict[int, asyncio.Task] = {}
        self._client: httpx.AsyncClient | None = None

    def start(self) -> None:
        """Start on the running event loop."""
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._slots = asyncio.Semaphore(self._concurrency)
        self._client = self.guard.client(timeout=self.timeout, follow_redirects=False)
        self._task = asyncio.create_task(self._run(), name="webhooks")

    async def stop(self) -> None:
        tasks = [t for t in (self._task, *self._in_flight.values()) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._client is not None:
            await self._client.aclose()

    def notify(self) -> None:
        """Thread-safe: a delivery was queued (called from the worker thread)."""
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(wake.set)

    # -- loop ------------------------------------------------------------------------------------

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            self._wake.clear()
            for delivery in self.store.due_webhooks(self.clock(), limit=64):
                if delivery.id not in self._in_flight:
                    task = asyncio.create_task(self._deliver(delivery))
                    self._in_flight[delivery.id] = task
                    task.add_done_callback(lambda _t, i=delivery.id: self._in_flight.pop(i, None))
            next_at = self.store.next_webhook_at()
            delay = 30.0 if next_at is None else min(30.0, max(0.05, next_at - self.clock()))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)

    async def _deliver(self, delivery: WebhookDelivery) -> None:
        assert self._slots is not None and self._client is not None
        async with self._slots:
            error, refused = await self._post(delivery)
        attempts = delivery.attempts + 1
        if refused:
            self.store.webhook_attempted(delivery.id, state="abandoned", next_at=self.clock(), error=error)
            log.warning("webhook for job %s refused, not retried: %s", delivery.job_id, error)
        elif error is None:
            self.store.webhook_attempted(delivery.id, state="delivered", next_at=self.clock(), error=None)
            log.info("webhook for job %s delivered (attempt %d)", delivery.job_id, attempts)
        elif attempts >= self.max_attempts:
            self.store.webhook_attempted(delivery.id, state="abandoned", next_at=self.clock(), error=error)
            log.warning("webhook for job %s abandoned after %d attempts: %s", delivery.job_id, attempts, error)
        else:
            delay = min(self.max_backoff, self.backoff * 2 ** (attempts - 1))
            self.store.webhook_attempted(delivery.id, state="pending", next_at=self.clock() + delay, error=error)
            log.info("webhook for job %s failed (%s); retry in %.1f s", delivery.job_id, error, delay)
        # the next due time moved: let the loop recompute its sleep
        if self._wake is not None:
            self._wake.set()

    async def _post(self, delivery: WebhookDelivery) -> tuple[str | None, bool]:
        """-> (error or None, refused: the guard will never allow this URL)."""
        headers = {**delivery.headers, "x-fal-webhook-timestamp": str(int(self.clock()))}
        try:
            self.guard.check_url(delivery.url)
            response = await self._client.post(delivery.url, content=delivery.body, headers=headers)
        except UrlRefused as exc:
            return f"refused: {exc.message}"[:300], True
        except (httpx.HTTPError, OSError, ValueError) as exc:  # retried: the receiver may come back
            return f"{type(exc).__name__}: {exc}"[:300], False
        if 200 <= response.status_code < 300:
            return None, False
        return f"HTTP {response.status_code}", False
