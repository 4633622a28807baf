"""Everything a contract module may use, built once by create_app and handed to each router."""

from __future__ import annotations

from dataclasses import dataclass

from pipelines.errors import InvalidRequest

from .intake import IntakeLimits, allow_decoding
from .manager import JobManager
from .netguard import UrlGuard
from .settings import Settings
from .storage import Storage
from .store import JobStore
from .web import ApiKeys, base_url
from .webhooks import WebhookDispatcher
from .worker import EngineLike, GpuWorker


@dataclass
class Services:
    settings: Settings
    engine: EngineLike
    store: JobStore
    storage: Storage
    manager: JobManager
    worker: GpuWorker
    webhooks: WebhookDispatcher
    keys: ApiKeys
    intake: IntakeLimits
    guard: UrlGuard

    @classmethod
    def build(cls, settings: Settings, engine: EngineLike) -> Services:
        guard = UrlGuard(settings.url_allowlist)
        allow_decoding(settings.image_max_pixels)
        storage = Storage(settings.data_dir)
        store = JobStore(storage.database)
        manager = JobManager(store, storage, max_queue=settings.max_queue)
        webhooks = WebhookDispatcher(
            store,
            timeout=settings.webhook_timeout,
            max_attempts=settings.webhook_max_attempts,
            backoff=settings.webhook_backoff,
            max_backoff=settings.webhook_max_backoff,
            guard=guard,
        )
        manager.on_webhook_queued = webhooks.notify
        return cls(
            settings=settings,
            engine=engine,
            store=store,
            storage=storage,
            manager=manager,
            worker=GpuWorker(engine, manager, storage),
            webhooks=webhooks,
            keys=ApiKeys(settings.api_keys),
            intake=IntakeLimits(
                timeout=settings.image_fetch_timeout,
                max_bytes=settings.image_max_bytes,
                data_uri_max_bytes=settings.data_uri_max_bytes,
                max_pixels=settings.image_max_pixels,
                guard=guard,
            ),
            guard=guard,
        )

    def check_text(self, prompt: object, negative_prompt: object = None) -> None:
        """The server's own limit on prompt length: cheap, so contracts also call it before fetching
        an image. Raises InvalidRequest worded with the setting that sets the limit."""
        limit = self.settings.max_prompt_chars
        for name, value in (("prompt", prompt), ("negative_prompt", negative_prompt)):
            if isinstance(value, str) and len(value) > limit:
                raise InvalidRequest(
                    name, value, f"{name} is {len(value)} characters; the limit is {limit} (K5SERVE_MAX_PROMPT_CHARS)"
                )

    def prepare(self, greq):
        """The server's own limits, then the engine's validation. Raises InvalidRequest or WeightsMissing."""
        self.check_text(greq.prompt, greq.negative_prompt)
        return self.engine.prepare(greq)

    def base_url(self, request) -> str:
        return base_url(request, self.settings.public_url)
