"""Prompt expansion through the contracts: each one's switch (OneRouter `expand_prompt`, AI/ML API
`enhance_prompt`, fal `enable_prompt_expansion`), the server default (K5SERVE_EXPAND_PROMPTS /
--expand-prompts), and where the rewritten prompt is reported (OneRouter `revised_prompt`, AI/ML
`meta.revised_prompt`, fal logs, /api/jobs). Fake engines in process, then a real `k5serve serve`
on the tiny checkpoints end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import fakes
import pytest
from server_fixtures import app_client, server_process, wait_until

ONEROUTER = "/v1/videos/generations"
AIML = "/v2/video/generations"
FAL = "fal-ai/kandinsky5/text-to-video"
PROMPT = "A cute baby sea otter"
ONE = {"model": "kandinsky5-text-to-video", "prompt": PROMPT, "num_inference_steps": 2}


def only_job(client) -> dict:
    (job,) = client.get("/api/jobs").json()["jobs"]
    return job


# -- OneRouter: an extension switch, and `revised_prompt` ---------------------------------------------


@pytest.mark.parametrize(
    ("default", "switch", "expanded"),
    [(False, None, False), (False, True, True), (True, None, True), (True, False, False)],
)
def test_onerouter_switch_and_server_default(tmp_path, default, switch, expanded):
    engine = fakes.FakeEngine()
    body = ONE if switch is None else {**ONE, "expand_prompt": switch}
    with app_client(engine, tmp_path, expand_prompts=default) as client:
        response = client.post(ONEROUTER, json=body)
        assert response.status_code == 200, response.text
        revised = response.json()["data"][0]["revised_prompt"]
        job = only_job(client)
    assert engine.resolved[0].expand_prompt is expanded
    assert engine.calls[0].expand_prompt is expanded  # the stored request says what ran, default included
    assert revised == (fakes.expanded(PROMPT) if expanded else "")
    assert job["revised_prompt"] == (fakes.expanded(PROMPT) if expanded else None)


@pytest.mark.parametrize("value", ["yes", 1, [], {}])
def test_onerouter_switch_of_the_wrong_type_is_400(tmp_path, value):
    with app_client(fakes.FakeEngine(), tmp_path) as client:
        response = client.post(ONEROUTER, json={**ONE, "expand_prompt": value})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "expand_prompt"


# -- AI/ML API: `enhance_prompt` (the SDK forwards it), reported in `meta` ---------------------------


def test_aimlapi_enhance_prompt_runs_expansion_and_reports_it(tmp_path):
    engine = fakes.FakeEngine()
    with app_client(engine, tmp_path) as client:
        ids = []
        for enhance in (True, False):
            body = {"model": "sber-ai/kandinsky5-distill-t2v", "prompt": PROMPT, "enhance_prompt": enhance}
            created = client.post(AIML, json=body)
            assert created.status_code == 201, created.text
            ids.append(created.json()["id"])

        def poll(generation_id):
            body = client.get(AIML, params={"generation_id": generation_id}).json()
            return body if body["status"] == "completed" else None

        enhanced, plain = (wait_until(lambda i=i: poll(i), what="completed") for i in ids)
    assert [r.expand_prompt for r in engine.resolved] == [True, False]
    assert enhanced["meta"] == {"revised_prompt": fakes.expanded(PROMPT)}
    assert "meta" not in plain  # as before: no expansion, nothing added


# -- fal: `enable_prompt_expansion` (fal's own name for it), the rewrite in the logs -------------------


def test_fal_enable_prompt_expansion_and_the_log_line(tmp_path):
    engine = fakes.FakeEngine()
    with app_client(engine, tmp_path) as client:
        submitted = client.post(f"/{FAL}", json={"prompt": PROMPT, "enable_prompt_expansion": True}).json()
        status_url = f"/fal-ai/kandinsky5/requests/{submitted['request_id']}/status"
        done = wait_until(
            lambda: (r := client.get(status_url, params={"logs": 1})).status_code == 200 and r.json(),
            what="COMPLETED",
        )
        wrong = client.post(f"/{FAL}", json={"prompt": PROMPT, "enable_prompt_expansion": "maybe"}).json()
        refused = client.get(f"/fal-ai/kandinsky5/requests/{wrong['request_id']}")
    assert engine.resolved[0].expand_prompt is True
    messages = [line["message"] for line in done["logs"]]
    assert any(m.startswith("prompt expanded") and m.endswith(fakes.expanded(PROMPT)) for m in messages)
    assert refused.status_code == 422
    assert refused.json()["detail"][0]["loc"] == ["body", "enable_prompt_expansion"]


# -- end to end: a real server on the tiny checkpoints ------------------------------------------------


@pytest.mark.slow
def test_live_onerouter_revised_prompt_is_the_tiny_qwens_rewrite(tmp_path, tiny_weights_dir, engine):
    """`k5serve serve --expand-prompts`: the default rewrites, the request's switch turns it off, and
    `revised_prompt` is exactly what the tiny Qwen makes of the prompt for that seed."""
    from pipelines.expand import expand_prompt

    server = server_process(tmp_path, fake=False, weights_dir=tiny_weights_dir, extra=["--expand-prompts"])
    server.start()
    try:
        with server.client() as client:
            body = {**ONE, "num_inference_steps": 1, "seed": 42}
            expanded = client.post(ONEROUTER, json=body, timeout=300)  # synchronous: as long as the run
            plain = client.post(ONEROUTER, json={**body, "expand_prompt": False}, timeout=300)
            jobs = client.get("/api/jobs").json()["jobs"]
            config = client.get("/api/config").json()
            video = client.get(expanded.json()["data"][0]["url"]) if expanded.status_code == 200 else None
    finally:
        server.stop()
    assert expanded.status_code == 200 and plain.status_code == 200, (expanded.text, plain.text)
    want = expand_prompt(engine.pipeline("kandinsky5-tiny-t2v"), PROMPT, task="t2v", seed=42)
    assert expanded.json()["data"][0]["revised_prompt"] == want and want != PROMPT
    assert plain.json()["data"][0]["revised_prompt"] == ""
    assert [j["revised_prompt"] for j in jobs] == [None, want]  # newest first
    assert config["expand_prompts"] is True
    assert video.status_code == 200 and video.content[4:8] == b"ftyp"


# aimlapi-sdk-python vendors its own `openai` package: it runs in a child process from its own folder
# (as tests/contracts/test_aimlapi.py runs it; `make test` installs it there).
AIMLAPI_SDK = Path(sys.prefix) / "aimlapi-sdk"
SDK_SCRIPT = """
import json, sys
from aimlapi import AIMLAPI

client = AIMLAPI(api_key="local-key", base_url=sys.argv[1] + "/v1")
seen = []
client.videos.generate_with_polling(
    model="sber-ai/kandinsky5-distill-t2v", prompt=sys.argv[2], seed=42, enhance_prompt=True,
    poll_interval=0.2, poll_timeout=120, extra_body={"num_inference_steps": 1}, status_callback=seen.append,
)
print(json.dumps(seen[-1]))
"""


@pytest.mark.slow
def test_live_aimlapi_sdk_enhance_prompt(live_server, engine):
    """The official SDK's own `enhance_prompt` parameter turns expansion on for that request; the
    completed body's `meta.revised_prompt` is the tiny Qwen's rewrite."""
    from pipelines.expand import expand_prompt

    assert (AIMLAPI_SDK / "aimlapi").is_dir(), "aimlapi SDK missing: run `make test` (it installs it)"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIML", "OPENAI", "K5SERVE_"))}
    env.update({"PYTHONPATH": str(AIMLAPI_SDK), "SSL_CERT_FILE": str(live_server.ca)})
    proc = subprocess.run(
        [sys.executable, "-c", SDK_SCRIPT, live_server.url, PROMPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, f"{proc.stderr}\n--- server log ---\n{live_server.log_tail()}"
    final = json.loads(proc.stdout.strip().splitlines()[-1])
    want = expand_prompt(engine.pipeline("kandinsky5-tiny-t2v"), PROMPT, task="t2v", seed=42)
    assert final["status"] == "completed" and final["meta"] == {"revised_prompt": want}
