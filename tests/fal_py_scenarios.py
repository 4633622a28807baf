"""Scenarios for the real, unmodified PyPI `fal-client`, run in a subprocess by test_fal_client.py.

The client reads FAL_KEY, FAL_RUN_HOST, FAL_QUEUE_RUN_HOST at import time and trusts the test CA
through SSL_CERT_FILE: exactly the settings docs/fal.md gives users. Prints one JSON object.
"""

from __future__ import annotations

import json
import sys
import time

import fal_client

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


def invalid() -> dict:
    try:
        fal_client.subscribe(T2V, arguments={"prompt": "x", "aspect_ratio": "16:9"})
    except fal_client.client.FalClientHTTPError as exc:
        return {"status_code": exc.status_code, "message": exc.message}
    return {"status_code": None}


if __name__ == "__main__":
    name, *args = sys.argv[1:]
    print(json.dumps(globals()[name](*args)))
