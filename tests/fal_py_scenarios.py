"""Scenarios for the real, unmodified PyPI `fal-client`, run in a subprocess by test_fal_client.py.

The client reads FAL_KEY, FAL_RUN_HOST, FAL_QUEUE_RUN_HOST at import time and trusts the test CA
through SSL_CERT_FILE: exactly the settings docs/fal.md gives users. Prints one JSON object.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from datetime import datetime
from pathlib import Path

import fal_client
import httpx

T2V = "fal-ai/kandinsky5/text-to-video"
DISTILL = "fal-ai/kandinsky5/text-to-video/distill"
PRO_I2V = "fal-ai/kandinsky5-pro/image-to-video"


def _update(status) -> dict:
    return {"type": type(status).__name__, "logs": [log["message"] for log in getattr(status, "logs", None) or []]}


def subscribe() -> dict:
    updates = []
    result = fal_client.subscribe(
        T2V,
        arguments={"prompt": "a red fox running through snow", "num_inference_steps": 3, "seed": 1},
        with_logs=True,
        on_queue_update=lambda s: updates.append(_update(s)),
    )
    return {"result": result, "updates": updates}


def submit_status_result() -> dict:
    handle = fal_client.submit(T2V, arguments={"prompt": "a lighthouse at dusk", "num_inference_steps": 2})
    seen = []
    while True:
        status = fal_client.status(T2V, handle.request_id, with_logs=True)
        seen.append(_update(status))
        if isinstance(status, fal_client.Completed):
            break
        time.sleep(0.1)
    return {
        "request_id": handle.request_id,
        "statuses": seen,
        "handle_status": type(handle.status()).__name__,
        "metrics": status.metrics,
        "result": fal_client.result(T2V, handle.request_id),
    }


def cancel() -> dict:
    handle = fal_client.submit(T2V, arguments={"prompt": "a long one", "num_inference_steps": 100})
    while not isinstance(handle.status(), fal_client.InProgress):
        time.sleep(0.05)
    handle.cancel()
    final = None
    while not isinstance(final, fal_client.Completed):
        final = handle.status()
        time.sleep(0.05)
    try:
        handle.get()
        error = None
    except fal_client.client.FalClientHTTPError as exc:
        error = {"status_code": exc.status_code, "error_type": exc.error_type, "message": exc.message}
    return {"error": error, "status_error_type": final.error_type}


def run() -> dict:
    return {"result": fal_client.run(DISTILL, arguments={"prompt": "a paper boat on a river"})}


def image_to_video(image_path: str) -> dict:
    result = fal_client.subscribe(
        PRO_I2V,
        arguments={
            "prompt": "the picture comes alive",
            "image_url": fal_client.encode_file(image_path),
            "num_inference_steps": 2,
        },
    )
    return {"result": result}


def _resolve_fal_storage_to(port: int) -> None:
    """rest.fal.ai and v3.fal.media -> the local k5serve on `port`, in THIS process only: what a
    hosts entry plus k5serve on port 443 do for a user (docs/fal.md). The client still sends
    Host/SNI rest.fal.ai and v3.fal.media; nothing else resolves differently."""
    real = socket.getaddrinfo

    def getaddrinfo(host, service, *args, **kwargs):
        if host in ("rest.fal.ai", "v3.fal.media"):
            return real("127.0.0.1", port, *args, **kwargs)
        return real(host, service, *args, **kwargs)

    socket.getaddrinfo = getaddrinfo


def uploads(image_path: str) -> dict:
    """upload_file / upload_image / upload (repository fal_v3: token from rest.fal.ai, bytes to
    v3.fal.media; and the "fal" repository: initiate + PUT), then two of them used for I2V."""
    from PIL import Image

    _resolve_fal_storage_to(int(os.environ["K5SERVE_STORAGE_PORT"]))
    data = Path(image_path).read_bytes()
    with Image.open(image_path) as image:
        urls = {
            "upload_file": fal_client.upload_file(image_path),
            "upload_image": fal_client.upload_image(image, format="png"),
            "upload": fal_client.upload(data, "image/png", file_name="raw.png"),
            "fal_repository": fal_client.upload(data, "image/png", repository="fal", fallback_repository=[]),
        }
    back = {name: httpx.get(url, timeout=30).content for name, url in urls.items()}
    results = [
        fal_client.subscribe(
            PRO_I2V, arguments={"prompt": "it moves", "image_url": urls[name], "num_inference_steps": 2}
        )
        for name in ("upload_file", "upload_image")
    ]
    return {
        "urls": urls,
        "same_bytes": {name: content == data for name, content in back.items()},
        "png": {name: content[:4] == b"\x89PNG" for name, content in back.items()},
        "results": results,
    }


def invalid() -> dict:
    try:
        fal_client.subscribe(T2V, arguments={"prompt": "x", "aspect_ratio": "16:9"})
    except fal_client.client.FalClientHTTPError as exc:
        return {"status_code": exc.status_code, "message": exc.message}
    return {"status_code": None}


def missing_prompt() -> dict:
    try:
        fal_client.subscribe(T2V, arguments={"num_inference_steps": 2})
    except fal_client.client.FalClientHTTPError as exc:
        return {"status_code": exc.status_code, "message": exc.message}
    return {"status_code": None}


def log_times() -> dict:
    """Each log line's timestamp as the client hands it over, and as datetime.fromisoformat reads it."""
    handle = fal_client.submit(T2V, arguments={"prompt": "a clock tower", "num_inference_steps": 2})
    while not isinstance(status := handle.status(with_logs=True), fal_client.Completed):
        time.sleep(0.1)
    stamps = [log["timestamp"] for log in status.logs]
    parsed = [datetime.fromisoformat(stamp) for stamp in stamps]
    offsets = [None if p.utcoffset() is None else p.utcoffset().total_seconds() for p in parsed]
    return {"timestamps": stamps, "offsets": offsets, "epochs": [p.timestamp() for p in parsed], "now": time.time()}


if __name__ == "__main__":
    name, *args = sys.argv[1:]
    print(json.dumps(globals()[name](*args)))
