"""Server test fixtures (imported by conftest.py): in-process apps with fake engines, and real
`k5serve serve` processes over TLS for the client-library tests."""

from __future__ import annotations

import contextlib
import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.settings import Settings

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


@contextlib.contextmanager
def app_client(engine, data_dir: Path, **settings) -> Iterator[TestClient]:
    """A TestClient (lifespan running: worker + webhooks) around create_app with `engine`."""
    app = create_app(Settings(data_dir=data_dir, **settings), engine)
    with TestClient(app) as client:
        wait_until(lambda: client.get("/readyz").status_code == 200, timeout=10, what="readyz")
        yield client


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class TLSFiles:
    cert: Path  # server certificate chain (PEM)
    key: Path
    ca: Path  # what clients trust (SSL_CERT_FILE / NODE_EXTRA_CA_CERTS)


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory) -> TLSFiles:
    import trustme

    folder = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    # fal's storage hosts too: the Python upload tests resolve them to the server (docs/fal.md, "Uploads")
    cert = ca.issue_cert("localhost", "127.0.0.1", "rest.fal.ai", "v3.fal.media")
    files = TLSFiles(folder / "server.pem", folder / "server.key", folder / "ca.pem")
    cert.private_key_pem.write_to_path(str(files.key))
    cert.cert_chain_pems[0].write_to_path(str(files.cert))
    for extra in cert.cert_chain_pems[1:]:
        with open(files.cert, "ab") as fh:
            fh.write(extra.bytes())
    ca.cert_pem.write_to_path(str(files.ca))
    return files


@dataclass
class ServerProcess:
    """A `k5serve serve` child process (real engine) or tests/fake_serve.py (fake engine)."""

    args: list[str]
    env: dict[str, str]
    port: int
    run_port: int | None
    scheme: str
    log_path: Path
    ca: Path | None = None
    proc: subprocess.Popen | None = None
    starts: int = field(default=0)

    @property
    def url(self) -> str:
        return f"{self.scheme}://localhost:{self.port}"

    @property
    def host(self) -> str:
        return f"localhost:{self.port}"

    @property
    def run_host(self) -> str:
        return f"localhost:{self.run_port}"

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, verify=str(self.ca) if self.ca else True, timeout=30, **kwargs)

    def start(self, timeout: float = 120.0) -> None:
        self.starts += 1
        log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(self.args, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        deadline = time.monotonic() + timeout
        with self.client() as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
                with contextlib.suppress(httpx.HTTPError):
                    if client.get("/readyz").status_code == 200:
                        return
                time.sleep(0.1)
        raise AssertionError(f"server not ready after {timeout} s:\n{self.log_tail()}")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""


def server_process(
    tmp: Path,
    *,
    fake: bool,
    tls: TLSFiles | None = None,
    weights_dir: Path | None = None,
    extra: list[str] = (),
    env: dict[str, str] | None = None,
    run_port: bool = True,
) -> ServerProcess:
    port = free_port()
    rport = free_port() if run_port else None
    entry = [sys.executable, str(TESTS / "fake_serve.py")] if fake else [sys.executable, "-m", "server.cli"]
    args = [*entry, "serve", "--port", str(port), "--data-dir", str(tmp / "data")]
    if rport:
        args += ["--fal-run-port", str(rport)]
    if weights_dir is not None:
        args += ["--weights-dir", str(weights_dir)]
    if tls is not None:
        args += ["--ssl-certfile", str(tls.cert), "--ssl-keyfile", str(tls.key)]
    args += list(extra)
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("K5SERVE_")}
    child_env.update({"PYTHONUNBUFFERED": "1", "K5SERVE_DEVICE": "cpu", **(env or {})})
    return ServerProcess(
        args=args,
        env=child_env,
        port=port,
        run_port=rport,
        scheme="https" if tls else "http",
        log_path=tmp / "server.log",
        ca=tls.ca if tls else None,
    )


@pytest.fixture(scope="session")
def live_server(tmp_path_factory, tls_files, tiny_weights_dir) -> Iterator[ServerProcess]:
    """ONE real `k5serve serve` (demo mode, tiny weights, TLS, run port) shared by the client tests."""
    tmp = tmp_path_factory.mktemp("live")
    server = server_process(
        tmp, fake=False, tls=tls_files, weights_dir=tiny_weights_dir, env={"K5SERVE_SSE_KEEPALIVE": "1"}
    )
    server.start()
    yield server
    server.stop()


class Loopback:
    """A tiny HTTP server on 127.0.0.1 in a thread: records POSTs (webhook receiver), serves GETs
    from `files` (image URLs), and answers `fail_with` to the next `failures` POSTs."""

    def __init__(self):
        import http.server
        import threading

        self.deliveries: list[dict] = []
        self.files: dict[str, tuple[str, bytes]] = {}
        self.failures = 0
        self.fail_with = 500
        self.delay = 0.0  # seconds to sit on each POST before answering
        self.hold = False  # when True, each POST is read, then held unanswered until `released` is set
        self.holding = threading.Event()  # set once a POST is being held
        self.released = threading.Event()
        self.lock = threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_POST(self):
                import time

                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                if outer.hold:  # the sender is mid-delivery (e.g. a crash test kills it now)
                    outer.holding.set()
                    outer.released.wait(30)
                    return
                time.sleep(outer.delay)
                with outer.lock:
                    failing = outer.failures > 0
                    outer.failures -= failing
                    answered = outer.fail_with if failing else 200
                    outer.deliveries.append(
                        {"path": self.path, "headers": dict(self.headers), "body": body, "answered": answered}
                    )
                self.send_response(outer.fail_with if failing else 200)
                self.send_header("content-length", "0")
                self.end_headers()

            def do_GET(self):
                content_type, data = outer.files.get(self.path, ("text/plain", b""))
                self.send_response(200 if self.path in outer.files else 404)
                self.send_header("content-type", content_type)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def ok_deliveries(self) -> list[dict]:
        import json

        with self.lock:
            return [json.loads(d["body"]) for d in self.deliveries if d["answered"] == 200]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def loopback() -> Iterator[Loopback]:
    server = Loopback()
    yield server
    server.close()


class ImageServer:
    """HTTP/1.0 server on 127.0.0.1 counting connections and requests; `routes` maps a path to a
    function of the request handler."""

    def __init__(self, tls=None):
        self.connections = 0
        self.requests: list[tuple[str, dict]] = []
        self.routes: dict[str, Callable] = {}
        self.sent = 0
        self.done = threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                outer.requests.append((self.path, dict(self.headers)))
                route = outer.routes.get(self.path)
                if route is None:
                    self.send_error(404)
                    return
                route(self)

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def process_request(self, request, client_address):
                outer.connections += 1
                super().process_request(request, client_address)

        self.server = Server(("127.0.0.1", 0), Handler)
        if tls is not None:  # an ssl.SSLContext for the server side
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def file(self, path: str, data: bytes, content_type: str = "image/png") -> None:
        def send(handler):
            handler.send_response(200)
            handler.send_header("content-type", content_type)
            handler.send_header("content-length", str(len(data)))
            handler.end_headers()
            handler.wfile.write(data)

        self.routes[path] = send

    def redirect(self, path: str, location: str, status: int = 302) -> None:
        def send(handler):
            handler.send_response(status)
            handler.send_header("location", location)
            handler.send_header("content-length", "0")
            handler.end_headers()

        self.routes[path] = send

    def stream(self, path: str, total: int, chunk: int = 65536, declare: bool = False, delay: float = 0.0):
        """Up to `total` bytes, `chunk` at a time (after `delay` s each), until the client hangs up."""

        def send(handler):
            handler.send_response(200)
            handler.send_header("content-type", "image/png")
            if declare:
                handler.send_header("content-length", str(total))
            handler.end_headers()
            try:
                while self.sent < total:
                    time.sleep(delay)
                    handler.wfile.write(b"\0" * chunk)
                    handler.wfile.flush()
                    self.sent += chunk
            except OSError:
                pass
            finally:
                self.done.set()

        self.routes[path] = send

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
