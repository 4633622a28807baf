"""The outbound-URL guard (server/netguard.py): hostile addresses are refused before any connection,
the address checked is the address connected to, and redirects are checked hop by hop.

Nothing here connects beyond loopback. Refusals of private, link-local and metadata addresses are
checked at the address-check level with an injected resolver and a recording network backend that
never opens a socket; end-to-end fetches only ever reach servers on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket

import fakes
import httpcore
import httpx
import pytest
from server_fixtures import ImageServer, app_client, wait_until

from server.intake import ImageInputError, IntakeLimits, fetch_image
from server.netguard import Allowlist, UrlGuard, UrlRefused, parse_ip, refusal

PUBLIC = "93.184.215.14"  # only ever handed to the recording backend, which opens no socket
PRO_I2V = "fal-ai/kandinsky5-pro/image-to-video"
T2V = "fal-ai/kandinsky5/text-to-video"


def png(size=(32, 24)) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(buf, "PNG")
    return buf.getvalue()


# -- test doubles: a resolver and a network backend that record and never touch the network --------


class FakeResolver:
    def __init__(self, answers: dict[str, list[list[str]] | list[str]]):
        self.answers = answers
        self.calls: list[str] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append(host)
        answer = self.answers[host]
        if answer and isinstance(answer[0], list):  # a sequence of answers, one per lookup
            return answer[min(len(self.calls), len(answer)) - 1]
        return answer


class RecordingBackend(httpcore.AsyncNetworkBackend):
    """Records what the guard asks to connect to; opens no socket."""

    def __init__(self):
        self.calls: list[tuple[str, int]] = []

    async def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        self.calls.append((host, port))
        raise httpcore.ConnectError("recording backend: no connection made")


def get_through(guard: UrlGuard, url: str, backend: RecordingBackend, **kw) -> None:
    async def go():
        async with guard.client(timeout=5, inner=backend, **kw) as client:
            await client.get(url)

    asyncio.run(go())


# -- address parsing and the refusal table --------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "address"),
    [
        ("2130706433", "127.0.0.1"),
        ("0x7f.1", "127.0.0.1"),
        ("0x7f000001", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("0xa9.0xfe.0xa9.0xfe", "169.254.169.254"),
        ("2852039166", "169.254.169.254"),
        ("10.0.1", "10.0.0.1"),
        ("127.0.0.1.", "127.0.0.1"),
    ],
)
def test_legacy_ipv4_spellings_parse_as_the_resolver_reads_them(host, address):
    assert parse_ip(host) == ipaddress.ip_address(address)
    # the same as the C library's inet_aton, which getaddrinfo uses for numeric hosts (no network)
    assert ipaddress.IPv4Address(socket.inet_aton(host.rstrip("."))) == ipaddress.ip_address(address)


@pytest.mark.parametrize(
    ("host", "address"),
    [("[::1]", "::1"), ("fe80::1%eth0", "fe80::1"), ("[::ffff:169.254.169.254]", "::ffff:169.254.169.254")],
)
def test_ipv6_brackets_and_zone_ids(host, address):
    assert parse_ip(host) == ipaddress.ip_address(address)


@pytest.mark.parametrize("host", ["example.com", "images.test", "1.2.3.4.5", "0x7g.1", "127.0.0.one"])
def test_names_are_not_addresses(host):
    assert parse_ip(host) is None


@pytest.mark.parametrize("host", ["999.1.1.1", "1.2.3.256", "4294967296", "[::1::2]"])
def test_numeric_hosts_out_of_range_are_refused(host):
    with pytest.raises(UrlRefused, match="not a valid"):
        parse_ip(host)


HOSTILE_ADDRESSES = {
    "127.0.0.1": "loopback",
    "127.8.9.10": "loopback",
    "::1": "loopback",
    "0.0.0.0": "unspecified",
    "::": "unspecified",
    "10.1.2.3": "private",
    "172.16.0.1": "private",
    "192.168.1.1": "private",
    "169.254.169.254": "metadata",
    "169.254.1.1": "link-local",
    "fe80::1": "link-local",
    "100.64.0.1": "CGNAT",
    "100.100.100.200": "metadata",
    "192.0.0.192": "metadata",
    "fc00::1": "unique-local",
    "fd00:ec2::254": "metadata",
    "fec0::1": "site-local",
    "224.0.0.1": "multicast",
    "239.255.255.250": "multicast",
    "ff02::1": "multicast",
    "240.0.0.1": "reserved",
    "255.255.255.255": "reserved",
    "198.18.0.1": "private",
    "::ffff:127.0.0.1": "loopback address in IPv6 form",
    "::ffff:169.254.169.254": "metadata address in IPv6 form",
    "::ffff:10.0.0.1": "private address in IPv6 form",
    "::ffff:100.64.0.1": "CGNAT) address in IPv6 form",
    "2002:7f00:1::": "loopback address in IPv6 form",  # 6to4 of 127.0.0.1
    "2002:a9fe:a9fe::": "metadata address in IPv6 form",  # 6to4 of 169.254.169.254
    "64:ff9b::a9fe:a9fe": "metadata address in IPv6 form",  # NAT64 of 169.254.169.254
    "::127.0.0.1": "loopback address in IPv6 form",  # IPv4-compatible
}


@pytest.mark.parametrize(("address", "reason"), HOSTILE_ADDRESSES.items())
def test_refusal_table(address, reason):
    assert reason in (refusal(ipaddress.ip_address(address)) or "")


@pytest.mark.parametrize("address", [PUBLIC, "8.8.8.8", "2606:4700:4700::1111", "2002:5db8:d70e::"])
def test_public_addresses_pass(address):
    assert refusal(ipaddress.ip_address(address)) is None


HOSTILE_URLS = [
    "http://127.0.0.1/",
    "http://2130706433/",
    "http://0x7f.1/",
    "http://0177.0.0.1/",
    "http://127.1/",
    "http://[::1]/",
    "http://[::ffff:127.0.0.1]/",
    "http://[::ffff:169.254.169.254]/",
    "http://[::ffff:a9fe:a9fe]/",
    "http://169.254.169.254/latest/meta-data/",
    "http://0xa9fea9fe/latest/meta-data/",
    "http://0.0.0.0:8000/",
    "http://[::]/",
    "http://10.0.0.1/",
    "http://100.64.0.1/",
    "http://[fc00::1]/",
    "http://[fe80::1%25eth0]/",
    "http://224.0.0.1/",
    "http://metadata.google.internal/computeMetadata/v1/",
    "http://METADATA.google.internal./",
    "http://metadata/",
    "http://localhost/",
    "http://app.localhost:8080/",
    "https://127.0.0.1:443/",
    "ftp://example.com/a.png",
    "file:///etc/passwd",
    "gopher://example.com:70/_GET",
    "javascript:alert(1)",
    "//example.com/a.png",
    "http:///a.png",
    "http://user:pass@example.com/",
    "http://example.com@127.0.0.1/",
    "http://example.com\\@127.0.0.1/",
    "http://exa mple.com/",
    "http://example.com/\r\nHost: 127.0.0.1",
]


@pytest.mark.parametrize("url", HOSTILE_URLS)
def test_hostile_urls_are_refused_without_dns(url):
    resolver = FakeResolver({})
    with pytest.raises(UrlRefused):
        UrlGuard(resolver=resolver).check_url(url)
    assert resolver.calls == []


CONNECT_LEVEL = [
    u for u in HOSTILE_URLS if u.startswith("http") and not any(c in u for c in "\\ \r") and ":pass@" not in u
]


@pytest.mark.parametrize("url", CONNECT_LEVEL)
def test_hostile_urls_never_reach_a_socket(url):
    """The connect layer refuses on its own too (a URL that skipped check_url, or a redirect hop)."""
    backend = RecordingBackend()
    with pytest.raises((UrlRefused, httpx.UnsupportedProtocol, httpx.InvalidURL, httpx.LocalProtocolError)):
        get_through(UrlGuard(resolver=FakeResolver({})), url, backend)
    assert backend.calls == []


@pytest.mark.parametrize("address", list(HOSTILE_ADDRESSES))
def test_a_name_resolving_to_a_hostile_address_is_refused_before_connecting(address):
    resolver = FakeResolver({"innocent.test": [address]})
    backend = RecordingBackend()
    with pytest.raises(UrlRefused, match=r"innocent\.test resolves to"):
        get_through(UrlGuard(resolver=resolver), "http://innocent.test/a.png", backend)
    assert resolver.calls == ["innocent.test"] and backend.calls == []


def test_one_hostile_answer_among_public_ones_refuses_the_host():
    resolver = FakeResolver({"mixed.test": [PUBLIC, "10.0.0.1"]})
    backend = RecordingBackend()
    with pytest.raises(UrlRefused, match=r"10\.0\.0\.1, a private address"):
        get_through(UrlGuard(resolver=resolver), "http://mixed.test/", backend)
    assert backend.calls == []


def test_dns_rebinding_connects_to_the_checked_address():
    """First lookup public, every later one private: the connection goes to the address that was
    checked (an IP, never the name, so nothing re-resolves), and a second request is refused."""
    resolver = FakeResolver({"rebind.test": [[PUBLIC], ["127.0.0.1"]]})
    backend = RecordingBackend()
    guard = UrlGuard(resolver=resolver)
    with pytest.raises(httpx.ConnectError):
        get_through(guard, "http://rebind.test:8080/a.png", backend)
    assert backend.calls == [(PUBLIC, 8080)]
    with pytest.raises(UrlRefused, match="loopback"):
        get_through(guard, "http://rebind.test:8080/a.png", backend)
    assert backend.calls == [(PUBLIC, 8080)] and resolver.calls == ["rebind.test", "rebind.test"]


def test_every_resolved_address_is_tried_in_order():
    resolver = FakeResolver({"multi.test": [PUBLIC, "2606:4700:4700::1111"]})
    backend = RecordingBackend()
    with pytest.raises(httpx.ConnectError):
        get_through(UrlGuard(resolver=resolver), "https://multi.test/", backend)
    assert backend.calls == [(PUBLIC, 443), ("2606:4700:4700::1111", 443)]


def test_a_slow_resolver_is_a_connect_timeout():
    async def slow(host, port):
        await asyncio.sleep(30)
        return [PUBLIC]

    backend = RecordingBackend()

    async def go():
        async with UrlGuard(resolver=slow).client(timeout=0.2, inner=backend) as client:
            await client.get("http://slow-dns.test/")

    with pytest.raises(httpx.ConnectTimeout):
        asyncio.run(go())
    assert backend.calls == []


# -- the allowlist --------------------------------------------------------------------------------


def test_allowlist_admits_addresses_blocks_and_names():
    allow = Allowlist(["127.0.0.1", "10.20.0.0/16", "[::1]", "images.corp", "*.store.corp"])
    ip = ipaddress.ip_address
    assert allow.admits_ip(ip("127.0.0.1")) and allow.admits_ip(ip("::ffff:127.0.0.1"))
    assert allow.admits_ip(ip("10.20.3.4")) and not allow.admits_ip(ip("10.21.0.1"))
    assert allow.admits_ip(ip("::1")) and not allow.admits_ip(ip("127.0.0.2"))
    assert allow.admits_name("images.corp") and allow.admits_name("IMAGES.corp.")
    assert allow.admits_name("a.store.corp") and not allow.admits_name("store.corp")
    assert not allow.admits_name("evilstore.corp") and not allow.admits_name("images.corp.evil.com")


@pytest.mark.parametrize("entry", ["http://images.corp/", "10.0.0.0/33", "a b", "images.corp:8080", "*."])
def test_bad_allowlist_entries_are_rejected_at_startup(entry):
    from server.settings import Settings

    with pytest.raises(ValueError, match="url_allowlist"):
        Settings(url_allowlist=[entry])


def test_allowlisted_names_and_blocks_are_reachable_at_the_check_level():
    backend = RecordingBackend()
    resolver = FakeResolver({"images.corp": ["10.9.8.7"], "other.corp": ["10.20.0.5"]})
    guard = UrlGuard(["images.corp", "10.20.0.0/16"], resolver=resolver)
    for url in ("http://images.corp/a.png", "http://other.corp/a.png", "http://10.20.1.1/a.png"):
        with pytest.raises(httpx.ConnectError):  # the recording backend: admitted, "connected"
            get_through(guard, url, backend)
    assert backend.calls == [("10.9.8.7", 80), ("10.20.0.5", 80), ("10.20.1.1", 80)]
    with pytest.raises(UrlRefused):  # the name admits only itself, not other private addresses
        guard.check_url("http://10.9.8.7/a.png")


def test_settings_read_the_allowlist_from_the_environment(monkeypatch):
    from server.settings import Settings

    monkeypatch.setenv("K5SERVE_URL_ALLOWLIST", "127.0.0.1, 10.0.0.0/8 ,images.corp")
    assert Settings().url_allowlist == ["127.0.0.1", "10.0.0.0/8", "images.corp"]


# -- loopback end to end: a real image server on 127.0.0.1 ----------------------------------------


@pytest.fixture
def images():
    server = ImageServer()
    yield server
    server.close()


@pytest.fixture
def images2():
    server = ImageServer()
    yield server
    server.close()


def fetch(url: str, tmp_path, guard: UrlGuard, **limits):
    return asyncio.run(fetch_image(url, tmp_path / "img", IntakeLimits(guard=guard, **limits)))


LOOPBACK = ["127.0.0.1"]


def test_loopback_is_refused_without_the_allowlist_and_no_connection_is_made(tmp_path, images):
    images.file("/a.png", png())
    for url in (f"{images.url}/a.png", f"http://localhost:{images.port}/a.png", f"http://2130706433:{images.port}/"):
        with pytest.raises(ImageInputError, match=r"refused: .*K5SERVE_URL_ALLOWLIST"):
            fetch(url, tmp_path, UrlGuard())
    assert images.connections == 0


def test_a_name_resolved_by_the_guard_keeps_its_host_header(tmp_path, images):
    images.file("/a.png", png())
    resolver = FakeResolver({"images.test": ["127.0.0.1"]})
    path, size = fetch(f"http://images.test:{images.port}/a.png", tmp_path, UrlGuard(LOOPBACK, resolver=resolver))
    assert path.read_bytes() == png() and size == (32, 24)
    [(_, headers)] = images.requests
    assert headers["Host"] == f"images.test:{images.port}"


def test_https_by_name_verifies_the_certificate_of_the_name(tmp_path, monkeypatch):
    """The socket goes to the checked IP while TLS (SNI and certificate check) and Host use the URL's
    name: a certificate issued for images.test only (not for 127.0.0.1) verifies."""
    import ssl

    import trustme

    ca = trustme.CA()
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("images.test").configure_cert(server_ctx)
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))
    server = ImageServer(tls=server_ctx)
    try:
        server.file("/a.png", png())
        guard = UrlGuard(LOOPBACK, resolver=FakeResolver({"images.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]}))
        _, size = fetch(f"https://images.test:{server.port}/a.png", tmp_path, guard)
        assert size == (32, 24) and server.requests[0][1]["Host"] == f"images.test:{server.port}"
        with pytest.raises(ImageInputError, match="could not be fetched"):  # same socket, wrong name
            fetch(f"https://other.test:{server.port}/a.png", tmp_path, guard)
    finally:
        server.close()


def test_redirect_between_loopback_ports_is_followed(tmp_path, images, images2):
    images2.file("/b.png", png((40, 20)))
    images.redirect("/a.png", f"{images2.url}/b.png")
    _, size = fetch(f"{images.url}/a.png", tmp_path, UrlGuard(LOOPBACK))
    assert size == (40, 20) and images.connections == 1 and images2.connections == 1


@pytest.mark.parametrize(
    "target",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.1/a.png",
        "http://[::1]:{port}/b.png",
        "http://0x7f.2:{port}/b.png",  # 127.0.0.2: loopback, but not the allow-listed address
        "http://private.test:{port}/b.png",
        "http://metadata.google.internal/",
    ],
)
def test_redirect_to_a_refused_address_is_refused(tmp_path, images, images2, target):
    images2.file("/b.png", png())
    images.redirect("/a.png", target.format(port=images2.port))
    resolver = FakeResolver({"private.test": ["10.1.1.1"]})
    guard = UrlGuard(["127.0.0.1/32"], resolver=resolver)  # 127.0.0.1 itself, not 127.0.0.0/8 nor ::1
    with pytest.raises(ImageInputError, match="was refused"):
        fetch(f"{images.url}/a.png", tmp_path, guard)
    assert images.connections == 1 and images2.connections == 0


def test_redirect_loop_is_capped(tmp_path, images):
    images.redirect("/loop", "/loop")
    with pytest.raises(ImageInputError, match="redirected more than 3 times"):
        fetch(f"{images.url}/loop", tmp_path, UrlGuard(LOOPBACK))
    assert len(images.requests) == 4  # the request and three redirects followed


def test_a_slow_drip_hits_the_whole_fetch_deadline(tmp_path, images):
    """Each byte arrives well within the read timeout; the deadline covers the whole fetch."""
    images.stream("/drip.png", total=10_000_000, chunk=1, declare=True, delay=0.05)
    with pytest.raises(ImageInputError, match=r"timed out after 0\.5 s .*K5SERVE_IMAGE_FETCH_TIMEOUT"):
        fetch(f"{images.url}/drip.png", tmp_path, UrlGuard(LOOPBACK), timeout=0.5)


def test_a_silent_server_times_out(tmp_path):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)  # accepts the connection, never answers
    try:
        with pytest.raises(ImageInputError, match="timed out"):
            fetch(f"http://127.0.0.1:{listener.getsockname()[1]}/x.png", tmp_path, UrlGuard(LOOPBACK), timeout=0.3)
    finally:
        listener.close()


def test_an_oversized_stream_is_cut_off_without_reading_it_all(tmp_path, images):
    total = 256 * 1024 * 1024
    images.stream("/huge.png", total=total)  # no Content-Length: the cap is found while reading
    with pytest.raises(ImageInputError, match="larger than 4096 bytes, the limit"):
        fetch(f"{images.url}/huge.png", tmp_path, UrlGuard(LOOPBACK), max_bytes=4096)
    assert images.done.wait(30)  # the server's writes failed once we hung up
    assert images.sent < total // 4


def test_a_declared_oversized_body_is_refused_before_reading(tmp_path, images):
    total = 256 * 1024 * 1024
    images.stream("/declared.png", total=total, declare=True)
    with pytest.raises(ImageInputError, match=f"is {total} bytes; the limit is 4096"):
        fetch(f"{images.url}/declared.png", tmp_path, UrlGuard(LOOPBACK), max_bytes=4096)
    assert images.done.wait(30)
    assert images.sent < total // 4


def test_a_gzip_bomb_is_capped_on_its_decoded_size(tmp_path, images):
    import gzip

    bomb = gzip.compress(b"\0" * (8 * 1024 * 1024))  # ~8 KB on the wire

    def send(handler):
        handler.send_response(200)
        handler.send_header("content-encoding", "gzip")
        handler.send_header("content-length", str(len(bomb)))
        handler.end_headers()
        handler.wfile.write(bomb)

    images.routes["/bomb.png"] = send
    with pytest.raises(ImageInputError, match="decompresses to more than 65536 bytes"):
        fetch(f"{images.url}/bomb.png", tmp_path, UrlGuard(LOOPBACK), max_bytes=65536)


# -- end to end through the contracts -------------------------------------------------------------


def test_without_the_allowlist_a_loopback_image_url_is_refused_end_to_end(tmp_path, images):
    """fal and OpenAI answer their own 4xx for a loopback image URL, and the image server sees no
    connection at all; an earlier finished result is still served."""
    images.file("/a.png", png())
    with app_client(fakes.FakeEngine(), tmp_path) as client:
        ok = client.post(f"/{T2V}", json={"prompt": "a fox", "num_inference_steps": 2}).json()["request_id"]
        wait_until(lambda: client.get(f"/fal-ai/kandinsky5/requests/{ok}/status").status_code == 200)

        rid = client.post(f"/{PRO_I2V}", json={"prompt": "x", "image_url": f"{images.url}/a.png"}).json()["request_id"]
        wait_until(lambda: client.get(f"/fal-ai/kandinsky5-pro/requests/{rid}/status").status_code == 200)
        result = client.get(f"/fal-ai/kandinsky5-pro/requests/{rid}")
        assert result.status_code == 422
        [item] = result.json()["detail"]
        assert item["loc"] == ["body", "image_url"] and "K5SERVE_URL_ALLOWLIST" in item["msg"]

        body = {"prompt": "x", "input_reference": {"image_url": f"http://localhost:{images.port}/a.png"}}
        response = client.post("/v1/videos", json=body)
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["param"] == "input_reference" and "refused" in error["message"]

        assert client.get(f"/fal-ai/kandinsky5/requests/{ok}").status_code == 200
    assert images.connections == 0


def test_with_the_allowlist_the_same_url_works_end_to_end(tmp_path, images):
    images.file("/a.png", png((48, 32)))
    with app_client(fakes.FakeEngine(), tmp_path, url_allowlist=["127.0.0.1"]) as client:
        body = {"prompt": "x", "image_url": f"{images.url}/a.png", "num_inference_steps": 1}
        rid = client.post(f"/{PRO_I2V}", json=body).json()["request_id"]
        wait_until(lambda: client.get(f"/fal-ai/kandinsky5-pro/requests/{rid}/status").status_code == 200)
        assert client.get(f"/fal-ai/kandinsky5-pro/requests/{rid}").status_code == 200
    assert images.connections == 1


@pytest.mark.parametrize(
    "hook",
    [
        "http://169.254.169.254/hook",
        "http://127.0.0.1:9/hook",
        "http://[::ffff:10.0.0.1]/hook",
        "http://metadata.google.internal/hook",
        "ftp://example.com/hook",
        "not a url",
        "http://user:pw@example.com/hook",
    ],
)
def test_an_obviously_bad_webhook_is_fals_422_at_submit(tmp_path, hook):
    with app_client(fakes.FakeEngine(), tmp_path) as client:
        response = client.post(f"/{T2V}", params={"fal_webhook": hook}, json={"prompt": "x"})
        assert response.status_code == 422
        [item] = response.json()["detail"]
        assert item["loc"] == ["query", "fal_webhook"] and item["type"] == "value_error"
        assert item["msg"].startswith("fal_webhook") and item["input"] == hook
        assert client.app.state.services.manager.list() == []  # nothing was queued


def test_a_webhook_name_resolving_to_a_refused_address_is_abandoned_without_retry(tmp_path, images):
    """Host names are checked when the delivery connects: refused once, logged, never retried."""
    with app_client(fakes.FakeEngine(), tmp_path, webhook_backoff=0.05, webhook_max_backoff=0.1) as client:
        services = client.app.state.services
        services.guard.resolver = FakeResolver({"hooks.test": ["127.0.0.1"]})
        hook = f"http://hooks.test:{images.port}/hook"
        rid = client.post(f"/{T2V}", params={"fal_webhook": hook}, json={"prompt": "x"}).json()["request_id"]
        wait_until(lambda: services.store.webhook(rid) and services.store.webhook(rid).state != "pending")
        delivery = services.store.webhook(rid)
    assert delivery.state == "abandoned" and delivery.attempts == 1  # abandoned: never due again
    assert "refused" in delivery.last_error and "loopback" in delivery.last_error
    assert images.connections == 0


def test_a_resolver_answering_junk_is_a_connect_error_not_a_crash(tmp_path):
    guard = UrlGuard(resolver=FakeResolver({"junk.test": ["not-an-address"], "empty.test": []}))
    for url in ("http://junk.test/a.png", "http://empty.test/a.png"):
        with pytest.raises(ImageInputError, match=r"could not be fetched \(ConnectError"):
            fetch(url, tmp_path, guard)
