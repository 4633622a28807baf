"""An in-process uvicorn server on 127.0.0.1 (random port) around create_app with a fake engine.

For what a TestClient cannot show: a client that hangs up (the TestClient never reports a
disconnect). The app's services stay reachable (`server.services`) to check the job's state.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvicorn
from server_fixtures import free_port, wait_until

from server.app import create_app
from server.settings import Settings


@dataclass
class ThreadedServer:
    url: str
    app: object

    @property
    def services(self):
        return self.app.state.services


@contextlib.contextmanager
def threaded_server(engine, data_dir: Path, **settings) -> Iterator[ThreadedServer]:
    app = create_app(Settings(data_dir=data_dir, **settings), engine)
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(f"{url}/readyz", timeout=1).status_code == 200
        return False

    try:
        wait_until(ready, timeout=20, interval=0.05, what="the threaded server")
        yield ThreadedServer(url, app)
    finally:
        server.should_exit = True
        thread.join(20)
