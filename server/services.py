"""Everything a contract module may use, built once by create_app and handed to each router."""

from __future__ import annotations

from dataclasses import dataclass

from .admission import Admission
from .contracts import Contract, Contracts
from .engine_protocol import EngineLike
from .intake import IntakeLimits, allow_decoding
from .manager import JobManager
from .netguard import UrlGuard
from .settings import Settings
from .storage import Storage
from .store import JobStore
from .web import ApiKeys, base_url
from .webhooks import WebhookDispatcher
from .worker import GpuWorker


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
    contracts: Contracts
    admission: Admission

    @classmethod
    def build(cls, settings: Settings, engine: EngineLike, contracts: list[Contract]) -> Services:
        guard = UrlGuard(settings.url_allowlist)
        allow_decoding(settings.image_max_pixels)
        storage = Storage(settings.data_dir)
        store = JobStore(storage.database)
        registry = Contracts(contracts)
        manager = JobManager(store, storage, max_queue=settings.max_queue)
        for contract in registry.all:  # TODO(merge): inject registry.webhook_body
            if contract.webhook_body is not None:
                manager.set_webhook_format(contract.name, contract.webhook_body)
        webhooks = WebhookDispatcher(
            store,
            timeout=settings.webhook_timeout,
            max_attempts=settings.webhook_max_attempts,
            backoff=settings.webhook_backoff,
            max_backoff=settings.webhook_max_backoff,
            guard=guard,
        )
        manager.on_webhook_queued = webhooks.notify
        intake = IntakeLimits(
            timeout=settings.image_fetch_timeout,
            max_bytes=settings.image_max_bytes,
            data_uri_max_bytes=settings.data_uri_max_bytes,
            max_pixels=settings.image_max_pixels,
            guard=guard,
        )
        return cls(
            settings=settings,
            engine=engine,
            store=store,
            storage=storage,
            manager=manager,
            worker=GpuWorker(engine, manager, storage),
            webhooks=webhooks,
            keys=ApiKeys(settings.api_keys),
            intake=intake,
            guard=guard,
            contracts=registry,
            admission=Admission(engine, manager, storage, intake, settings.max_prompt_chars),
        )

    def base_url(self, request) -> str:
        return base_url(request, self.settings.public_url)
