"""Everything a contract module may use, built once by create_app and handed to each router."""

from __future__ import annotations

from dataclasses import dataclass

from .admission import Admission
from .contracts import Contract, Contracts
from .devices import WorkerSpec
from .engine_protocol import EngineLike
from .feed import ChangeFeed, JobListener
from .intake import IntakeLimits, allow_decoding
from .jobs import Job, JobStatus
from .logs import log_state_change
from .manager import JobManager
from .metrics import Metrics
from .netguard import UrlGuard
from .pool import InThreadEngine, WorkerPool, Workers
from .retention import Retention
from .scheduler import Scheduler
from .settings import Settings
from .storage import Storage
from .store import JobStore
from .uploads import Uploads
from .web import ApiKeys, base_url
from .webhooks import WebhookDispatcher
from .worker import GpuWorker


@dataclass
class Services:
    settings: Settings
    engine: EngineLike  # admission's (prepare, available, demo): the injected engine, or a FrontEngine
    store: JobStore
    storage: Storage
    manager: JobManager
    feed: ChangeFeed
    retention: Retention | None  # None: finished jobs are kept (retention_hours = 0)
    pool: WorkerPool
    webhooks: WebhookDispatcher
    metrics: Metrics
    keys: ApiKeys
    intake: IntakeLimits
    guard: UrlGuard
    contracts: Contracts
    admission: Admission
    uploads: Uploads  # files sent through fal's storage protocol (api/fal_storage.py)

    @classmethod
    def build(cls, settings: Settings, engine: EngineLike | Workers, contracts: list[Contract]) -> Services:
        """Everything built and wired here, once: the job manager's parts (scheduler, store, change
        feed, retention), the workers, and who listens to its changes (logs, metrics, the webhook
        dispatcher). `engine`: one in-process engine (one worker, in a thread: tests, embedding), or
        `Workers` (worker processes, Ray actors: pool.py)."""
        guard = UrlGuard(settings.url_allowlist)
        allow_decoding(settings.image_max_pixels)
        storage = Storage(settings.data_dir)
        store = JobStore(storage.database)
        registry = Contracts(contracts)
        feed = ChangeFeed()
        manager = JobManager(
            store,
            storage,
            max_queue=settings.max_queue,
            scheduler=Scheduler(),
            feed=feed,
            webhook_body=registry.webhook_body,
            max_worker_deaths=settings.worker_max_deaths,
        )
        if isinstance(engine, Workers):
            pool = WorkerPool(engine.specs, engine.factory, manager, storage)
            engine.front.pool = pool
            engine = engine.front
        else:
            one = InThreadEngine(engine)
            pool = WorkerPool([WorkerSpec("w0", (str(engine.device),))], lambda _: one, manager, storage)
        uploads = Uploads(settings.data_dir / "uploads", settings.image_max_bytes, settings.image_max_pixels)
        hours = settings.retention_hours
        retention = Retention(manager, store, hours, uploads=uploads) if hours else None
        webhooks = WebhookDispatcher(
            store,
            timeout=settings.webhook_timeout,
            max_attempts=settings.webhook_max_attempts,
            backoff=settings.webhook_backoff,
            max_backoff=settings.webhook_max_backoff,
            guard=guard,
        )
        metrics = Metrics(manager, engine, pool)
        feed.add_listener(log_state_change)
        feed.add_listener(metrics.observe)
        feed.add_delete_listener(metrics.forget)
        feed.add_listener(_wake_on_webhook(webhooks))
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
            feed=feed,
            retention=retention,
            pool=pool,
            webhooks=webhooks,
            metrics=metrics,
            keys=ApiKeys(settings.api_keys),
            intake=intake,
            guard=guard,
            contracts=registry,
            admission=Admission(
                engine,
                manager,
                storage,
                intake,
                settings.max_prompt_chars,
                uploads,
                expand_prompts=settings.expand_prompts,
            ),
            uploads=uploads,
        )

    @property
    def worker(self) -> GpuWorker:
        """The first worker (the only one where an engine was injected)."""
        return self.pool.workers[0]

    def base_url(self, request) -> str:
        return base_url(request, self.settings.public_url)


def _wake_on_webhook(webhooks: WebhookDispatcher) -> JobListener:
    """A job that asked for a webhook just ended: its delivery is on disk (saved with the terminal
    state), so the dispatcher looks now instead of at its next poll."""

    def listener(job: Job, previous: JobStatus | None) -> None:
        if job.webhook_url and job.status.terminal and previous is not job.status:
            webhooks.notify()

    return listener
