"""Opt-in approximate weights through the server (issue 14): a real tiny engine with
`--fp8-weights --text-encoder-int8` in process; /api/jobs and fal's logs say the video is approximate,
as they say MagCache's output is."""

from __future__ import annotations

import pytest
from server_fixtures import app_client, wait_until

from pipelines.engine import Engine
from pipelines.quant import TEXT_INT8, TRANSFORMER_FP8

FAL = "/fal-ai/kandinsky5/text-to-video"
BODY = {"prompt": "a red fox", "num_inference_steps": 2, "resolution": "512x512", "acceleration": "none"}


@pytest.mark.slow
def test_api_jobs_and_fal_logs_label_approximate_weights(tmp_path, tiny_weights_dir):
    engine = Engine(tiny_weights_dir, device="cpu", text_encoder_int8=True, fp8_weights=True)
    with app_client(engine, tmp_path) as client:
        rid = client.post(FAL, json=BODY).json()["request_id"]
        status = f"/fal-ai/kandinsky5/requests/{rid}/status?logs=1"
        wait_until(lambda: client.get(status).json()["status"] == "COMPLETED", timeout=300, what="completed")
        logs = [line["message"] for line in client.get(status).json()["logs"]]
        (job,) = client.get("/api/jobs").json()["jobs"]
    assert f"approximate: {TEXT_INT8} (opt-in server setting)" in logs
    assert f"approximate: {TRANSFORMER_FP8} (opt-in server setting)" in logs
    assert job["approximations"] == [TEXT_INT8, TRANSFORMER_FP8]
