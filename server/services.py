"""Everything a contract module may use, built once by create_app and handed to each router."""

from __future__ import annotations

from dataclasses import dataclass

from .intake import IntakeLimits
from .manager import JobManager
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

    @classmethod
    def build(cls, settings: Settings, engine: EngineLike) -> Services:
        storage = Storage(settings.data_dir)
        store = JobStore(storage.database)
        manager = JobManager(store, storage, max_queue=settings.max_queue)
        webhooks = WebhookDispatcher(
            store,
            timeout=settings.webhook_timeout,
            max_attempts=settings.webhook_max_attempts,
            backoff=settings.webhook_backoff,
            max_backoff=settings.webhook_max_backoff,
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
            intake=IntakeLimits(settings.image_fetch_timeout, settings.image_max_bytes),
        )

    def base_url(self, request) -> str:
        return base_url(request, self.settings.public_url)
