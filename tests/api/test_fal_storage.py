"""fal's storage protocol served locally (server/api/fal_storage.py, server/uploads.py): the wire
steps of both clients, their limits and keys, capability URLs, retention, and an upload used as
`image_url` without the server fetching itself (the real clients: tests/clients/)."""

from __future__ import annotations

import hashlib
import io
import os
import time

import fakes
import pytest
from server_fixtures import app_client, wait_until

from server.uploads import Uploads

PRO_I2V = "fal-ai/kandinsky5-pro/image-to-video"
KEY = {"Authorization": "Key k1"}


def png(size=(300, 450)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 10)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def client(tmp_path):
    with app_client(fakes.FakeEngine(), tmp_path, api_keys=["k1"]) as client:
        yield client


def initiate(client, name="cat.png", path="/storage/upload/initiate?storage_type=fal-cdn-v3") -> dict:
    response = client.post(path, json={"content_type": "image/png", "file_name": name}, headers=KEY)
    assert response.status_code == 200, response.text
    return response.json()


def cdn_token(client) -> dict:
    response = client.post("/storage/auth/token?storage_type=fal-cdn-v3", json={}, headers=KEY)
    assert response.status_code == 200, response.text
    return response.json()


def test_js_initiate_then_put_serves_the_file_at_an_unguessable_url(client):
    slot = initiate(client, name="../../etc/My Cat.png")
    assert slot["file_url"].startswith("http://testserver/uploads/") and slot["file_url"].endswith("/My_Cat.png")
    assert client.get(slot["file_url"]).status_code == 404  # nothing until the bytes arrive
    put = client.put(slot["upload_url"], content=png(), headers={"Content-Type": "image/png"})  # no key: the URL
    assert put.status_code == 200, put.text
    got = client.get(slot["file_url"])
    assert got.status_code == 200 and got.content == png() and got.headers["content-type"] == "image/png"
    assert got.headers["x-content-type-options"] == "nosniff"
    # one PUT per slot; a wrong secret or token finds nothing
    assert client.put(slot["upload_url"], content=png()).status_code == 404
    token = slot["file_url"].split("/")[-2]
    assert client.put(f"/storage/upload/{token}?secret=guess", content=png()).status_code == 404
    assert client.get(f"/uploads/{'A' * 32}/My_Cat.png").status_code == 404
    assert client.get(f"/uploads/{token}/.pending").status_code == 404


def test_api_keys_guard_initiate_and_tokens_but_not_the_capability_urls(client):
    for path in ("/storage/upload/initiate", "/storage/upload/initiate-multipart", "/storage/auth/token"):
        assert client.post(path, json={}).status_code == 401
        assert client.post(path, json={}, headers={"Authorization": "Key nope"}).status_code == 401
    assert client.post("/files/upload", content=png(), headers={"Authorization": "Bearer forged.x"}).status_code == 401
    assert client.post("/files/upload", content=png(), headers={"Authorization": "Bearer 1.x"}).status_code == 401


@pytest.mark.parametrize(
    ("data", "status", "message"),
    [
        (b"<html><script>alert(1)</script></html>", 422, "not a readable image"),
        (png((3000, 3000)), 422, "the limit is 1000000 (K5SERVE_IMAGE_MAX_PIXELS)"),
        (b"\0" * 70_000, 413, "the limit is 65536 (K5SERVE_IMAGE_MAX_BYTES)"),
    ],
)
def test_uploads_obey_the_image_limits(tmp_path, data, status, message):
    limits = {"image_max_bytes": 65536, "image_max_pixels": 1_000_000}
    with app_client(fakes.FakeEngine(), tmp_path, **limits) as client:
        slot = initiate(client)
        put = client.put(slot["upload_url"], content=data)
        assert put.status_code == status and message in put.text, put.text
        assert client.get(slot["file_url"]).status_code == 404
        direct = client.post("/files/upload", content=data, headers={"Content-Type": "image/png"})
        assert direct.status_code == status and message in direct.text
    # the refused direct upload left nothing; the slot stays open for a good PUT (until it expires)
    assert sorted(p.name for p in (tmp_path / "uploads").iterdir()) == sorted([".key", slot["file_url"].split("/")[-2]])


def test_the_body_limit_answers_before_the_upload_is_read(tmp_path):
    with app_client(fakes.FakeEngine(), tmp_path, max_body_bytes=4096) as client:
        put = client.put(initiate(client)["upload_url"], content=png((600, 600)) + b"\0" * 8192)
        assert put.status_code == 413 and "K5SERVE_MAX_BODY_BYTES" in put.text


def test_python_token_then_cdn_upload(client):
    token = cdn_token(client)
    assert token["token_type"] == "Bearer" and token["base_url"] == "http://testserver"
    assert token["expires_at"].endswith("+00:00")  # fal_client compares it with an aware datetime
    bearer = {"Authorization": f"Bearer {token['token']}", "Content-Type": "image/png", "X-Fal-File-Name": "a.png"}
    response = client.post("/files/upload", content=png(), headers=bearer)
    assert response.status_code == 200, response.text
    url = response.json()["access_url"]
    assert url.startswith("http://testserver/uploads/") and url.endswith("/a.png")
    assert client.get(url).content == png()


def test_tokens_are_signed_and_expire(tmp_path):
    now = [1000.0]
    uploads = Uploads(tmp_path, 1 << 20, 10**6, clock=lambda: now[0])
    token, expires = uploads.issue_token(60)
    assert uploads.token_valid(token) and expires == 1060
    assert Uploads(tmp_path, 1 << 20, 10**6, clock=lambda: now[0]).token_valid(token)  # same key after a restart
    assert not uploads.token_valid(token.replace(".", ".x")) and not uploads.token_valid("2000." + token[5:])
    now[0] = 1061
    assert not uploads.token_valid(token)


def test_js_multipart_parts_then_complete(client):
    data = png()
    slot = initiate(client, path="/storage/upload/initiate-multipart?storage_type=fal-cdn-v3")
    base, query = slot["upload_url"].split("?")
    halves = [data[: len(data) // 2], data[len(data) // 2 :]]
    parts = []
    for number in (2, 1):  # any order
        response = client.put(f"{base}/{number}?{query}", content=halves[number - 1])
        assert response.status_code == 200, response.text
        parts.append(response.json())
    assert {p["partNumber"] for p in parts} == {1, 2}
    bad = client.post(f"{base}/complete?{query}", json={"parts": [{"partNumber": 1, "etag": "nope"}]})
    assert bad.status_code == 422 and "does not match" in bad.text
    done = client.post(f"{base}/complete?{query}", json={"parts": parts})
    assert done.status_code == 200, done.text
    assert client.get(slot["file_url"]).content == data


def test_python_multipart_with_etag_headers(client):
    data = png()
    bearer = {"Authorization": f"Bearer {cdn_token(client)['token']}"}
    created = client.post("/files/upload/multipart", headers={**bearer, "X-Fal-File-Name": "big.png"}).json()
    url, upload_id = created["access_url"], created["uploadId"]
    parts = []
    for number, chunk in enumerate((data[:1000], data[1000:]), start=1):
        response = client.put(f"{url}/multipart/{upload_id}/{number}", content=chunk, headers=bearer)
        assert response.status_code == 200, response.text
        parts.append({"partNumber": number, "etag": response.headers["etag"]})
    assert client.put(f"{url}/multipart/wrong-id/3", content=b"x", headers=bearer).status_code == 404
    done = client.post(f"{url}/multipart/{upload_id}/complete", json={"parts": parts}, headers=bearer)
    assert done.status_code == 200, done.text
    assert client.get(url).content == data


def test_multipart_parts_together_obey_the_size_limit(tmp_path):
    with app_client(fakes.FakeEngine(), tmp_path, image_max_bytes=4096) as client:
        base, query = initiate(client, path="/storage/upload/initiate-multipart")["upload_url"].split("?")
        assert client.put(f"{base}/1?{query}", content=b"\0" * 3000).status_code == 200
        over = client.put(f"{base}/2?{query}", content=b"\0" * 3000)
        assert over.status_code == 413 and "K5SERVE_IMAGE_MAX_BYTES" in over.text


def test_the_proxy_routes_rest_fal_ai_to_the_storage_routes(client):
    proxied = {**KEY, "x-fal-target-url": "https://rest.fal.ai/storage/upload/initiate?storage_type=fal-cdn-v3"}
    response = client.post("/api/fal/proxy", json={"content_type": "image/png", "file_name": "p.png"}, headers=proxied)
    assert response.status_code == 200, response.text
    slot = response.json()
    assert slot["upload_url"].startswith("http://testserver/storage/upload/")  # PUT straight here, not proxied
    assert client.put(slot["upload_url"], content=png()).status_code == 200
    other = {**KEY, "x-fal-target-url": "https://rest.fal.ai/billing"}
    assert client.post("/api/fal/proxy", json={}, headers=other).status_code == 404


def test_an_upload_url_is_read_from_disk_as_image_url(tmp_path):
    """The upload URL names this server (http://testserver, or a loopback address): admission reads the
    file, the SSRF guard (closed to loopback, no allowlist here) is never asked."""
    engine = fakes.FakeEngine()
    with app_client(engine, tmp_path) as client:
        slot = initiate(client)
        client.put(slot["upload_url"], content=png((300, 450)))
        token_path = slot["file_url"].removeprefix("http://testserver")
        for url in (slot["file_url"], f"http://127.0.0.1:9{token_path}", f"https://v3.fal.media{token_path}"):
            body = {"prompt": "x", "image_url": url, "resolution": "512P", "num_inference_steps": 1}
            rid = client.post(f"/{PRO_I2V}", json=body).json()["request_id"]
            wait_until(lambda rid=rid: client.get(f"/fal-ai/kandinsky5-pro/requests/{rid}/status").status_code == 200)
            result = client.get(f"/fal-ai/kandinsky5-pro/requests/{rid}")
            assert result.status_code == 200, result.text
    assert [run.nominal_size for run in engine.resolved] == [(512, 768)] * 3  # the 2:3 image was read


@pytest.mark.parametrize("host", ["http://testserver", "https://v3.fal.media"])
def test_an_own_upload_url_that_holds_nothing_is_refused_not_fetched(tmp_path, host):
    with app_client(fakes.FakeEngine(), tmp_path) as client:
        body = {"prompt": "x", "image_url": f"{host}/uploads/{'B' * 32}/gone.png", "num_inference_steps": 1}
        rid = client.post(f"/{PRO_I2V}", json=body).json()["request_id"]
        result = client.get(f"/fal-ai/kandinsky5-pro/requests/{rid}")
        assert result.status_code == 422 and "an upload this server does not hold" in result.text


def test_a_foreign_host_with_an_upload_like_path_still_goes_through_the_guard(tmp_path):
    with app_client(fakes.FakeEngine(), tmp_path) as client:
        body = {"prompt": "x", "image_url": f"http://127.0.0.1:9/uploads/{'C' * 32}/x.png"}
        rid = client.post(f"/{PRO_I2V}", json=body).json()["request_id"]
        result = client.get(f"/fal-ai/kandinsky5-pro/requests/{rid}")
        assert result.status_code == 422 and "refused" in result.text  # loopback stays refused


def test_uploads_expire_with_retention(tmp_path):
    with app_client(fakes.FakeEngine(), tmp_path, retention_hours=1) as client:
        kept, stale, unfilled = initiate(client), initiate(client), initiate(client)
        for slot in (kept, stale):
            assert client.put(slot["upload_url"], content=png()).status_code == 200
        root = tmp_path / "uploads"
        old = time.time() - 3610
        for slot in (stale, unfilled):
            os.utime(root / slot["file_url"].split("/")[-2], (old, old))
        client.app.state.services.retention.expire()  # the sweep the retention task runs periodically
        assert client.get(stale["file_url"]).status_code == 404
        assert not (root / unfilled["file_url"].split("/")[-2]).exists()
        assert client.get(kept["file_url"]).status_code == 200


def test_pending_slots_expire_after_an_hour_even_when_uploads_are_kept_longer(tmp_path):
    now = [10_000.0]
    uploads = Uploads(tmp_path, 1 << 20, 10**6, clock=lambda: now[0])
    slot = uploads.reserve("a.png")
    done = uploads.store(png(), "b.png")
    for token in (slot.token, done.token):
        os.utime(tmp_path / token, (now[0] - 3601, now[0] - 3601))
    assert uploads.expire(older_than=0) == 1
    assert not (tmp_path / slot.token).exists() and uploads.find(done.token, "b.png") is not None
    assert hashlib.sha256(uploads.find(done.token, "b.png").read_bytes()).digest() == hashlib.sha256(png()).digest()
