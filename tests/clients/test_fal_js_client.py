"""The real JS `@fal-ai/client` 1.10.1 under node against the live k5serve (TLS, test CA).

`fal.subscribe` in polling and in streaming (SSE) mode, through `proxyUrl` and through
`requestMiddleware`, `fal.run` through the middleware (which maps fal.run to the run port), and
uploads (`fal.storage.upload`, a Blob input) through both, kept on the server.
`make test` installs tests/js/node_modules; without node or the package these tests fail
with the command that fixes it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

JS = Path(__file__).parents[1] / "js"

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("js_client_installed")]


@pytest.fixture(scope="session")
def js_client_installed() -> None:
    """Not a skip: `make test` installs node's @fal-ai/client; a missing one is a broken set-up."""
    assert shutil.which("node"), "node is not installed"
    assert (JS / "node_modules" / "@fal-ai" / "client").is_dir(), "run `make test` (npm install in tests/js)"


def run_node(live_server, mode: str, hook: str, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAL_")}
    env.update(
        {
            "K5SERVE_URL": live_server.url,
            "K5SERVE_RUN_URL": f"https://{live_server.run_host}",
            "FAL_KEY": "local-key",
            "NODE_EXTRA_CA_CERTS": str(live_server.ca),
            "TZ": "Asia/Tokyo",  # far from UTC: a log time without its offset would read 9 h off
            **extra,
        }
    )
    proc = subprocess.run(
        ["node", "scenarios.js", mode, hook], cwd=JS, env=env, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, f"{proc.stderr}\n--- server log ---\n{live_server.log_tail()}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def assert_video(live_server, result: dict, base: str) -> None:
    assert result["requestId"], "x-fal-request-id must reach the JS client"
    video = result["data"]["video"]
    assert video["content_type"] == "video/mp4" and video["url"].startswith(f"{base}/files/")
    data = httpx.get(video["url"], verify=str(live_server.ca), timeout=30).content
    assert len(data) == video["file_size"] and data[4:8] == b"ftyp"


# polling through requestMiddleware is the plainest path (native routes, like the Python client);
# the three below cover both modes through both hooks, the SSE stream through the proxy included.
@pytest.mark.parametrize(("mode", "hook"), [("polling", "proxy"), ("streaming", "middleware"), ("streaming", "proxy")])
def test_js_subscribe(live_server, mode, hook):
    out = run_node(live_server, mode, hook)
    result = out["result"]
    assert_video(live_server, result, live_server.url)

    statuses = [u["status"] for u in out["updates"]]
    assert statuses[-1] == "COMPLETED" and set(statuses) <= {"IN_QUEUE", "IN_PROGRESS", "COMPLETED"}
    logs = out["updates"][-1]["logs"] if mode == "streaming" else [m for u in out["updates"] for m in u["logs"]]
    assert "step 2/2" in logs
    if mode == "streaming":  # the client accumulates incremental logs: no step may appear twice
        assert logs.count("step 2/2") == 1
    times = [t for u in out["updates"] for t in u["times"]]
    assert times and all(t is not None and abs(time.time() * 1000 - t) < 300_000 for t in times), times


def test_js_run_through_the_middleware_reaches_the_run_port(live_server):
    out = run_node(live_server, "run", "middleware")
    assert_video(live_server, out["result"], f"https://{live_server.run_host}")


@pytest.mark.parametrize("hook", ["proxy", "middleware"])
def test_js_uploads_stay_on_the_server_and_feed_image_to_video(live_server, test_image, hook):
    """`fal.storage.upload(blob)` answers this server's URL (the same bytes come back), and a Blob
    as `image_url` is uploaded by the client, then read from disk by admission for I2V."""
    out = run_node(live_server, "upload", hook, K5SERVE_TEST_IMAGE=str(test_image))
    assert out["uploadUrl"].startswith(f"{live_server.url}/uploads/") and out["sameBytes"]
    assert_video(live_server, out["result"], live_server.url)
