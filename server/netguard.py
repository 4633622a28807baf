"""Outbound URLs (image_url fetches, fal webhooks) that cannot be turned against the server's own network.

Three layers, all in one `UrlGuard`:

* `check_url(url)`: the URL's shape, without any DNS: http(s) only, a host, no `user:pass@`, no
  metadata host names, and an IP-literal host (any spelling: `2130706433`, `0x7f.1`, `[::ffff:…]`)
  must be a public address.
* `GuardedBackend`: an httpcore network backend. Its `connect_tcp` resolves the host through the
  guard's resolver, checks EVERY address it gets, and connects to the checked IP itself, so the
  address checked is the address connected to (no DNS rebinding between check and connect). TLS
  SNI, certificate checks and the Host header keep the URL's host name (httpcore takes them from the
  URL, not from the socket).
* `client()`: an httpx.AsyncClient whose every connection, redirect hops included, goes through that
  backend. Environment proxies are ignored (a proxy would make the check meaningless).

Refused by default: loopback, private (RFC 1918, unique-local fc00::/7), link-local (169.254/16,
fe80::/10, so 169.254.169.254 too), shared/CGNAT 100.64/10, multicast, unspecified, reserved and
other non-global ranges, the IPv4-mapped / 6to4 / NAT64 IPv6 forms of those, and cloud metadata
names and addresses. `allowlist` entries (IP addresses, CIDR blocks, host names or `*.domain`)
admit what they name, e.g. an on-prem image store: K5SERVE_URL_ALLOWLIST=10.0.5.0/24,images.corp.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Union

import anyio
import httpcore
import httpx

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]  # noqa: UP007 - py3.10 target
Resolver = Callable[[str, int], Awaitable[Sequence[str]]]

SETTING = "K5SERVE_URL_ALLOWLIST"

# Names that are never an image store or a webhook receiver: cloud instance-metadata services.
METADATA_HOSTS = frozenset(
    {
        "metadata",
        "metadata.google.internal",
        "metadata.goog",
        "instance-data",
        "instance-data.ec2.internal",
        "metadata.azure.internal",
        "metadata.tencentyun.com",
        "metadata.packet.net",
        "metadata.platformequinix.com",
    }
)
# Names that always mean this machine (RFC 6761): checked as if they resolved to 127.0.0.1 and ::1.
LOCAL_HOSTS = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})

# Metadata addresses that Python's ipaddress may consider global (or that deserve a clearer name).
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean ...
        "169.254.170.2",  # AWS ECS task metadata
        "169.254.169.123",  # AWS time sync
        "100.100.100.200",  # Alibaba Cloud
        "192.0.0.192",  # Oracle Cloud
        "fd00:ec2::254",  # AWS IPv6
    )
)
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_IETF_V4 = ipaddress.ip_network("192.0.0.0/24")
_UNIQUE_LOCAL = ipaddress.ip_network("fc00::/7")
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))


class UrlRefused(ValueError):
    """An outbound URL the guard will not connect to; `message` says why (and which setting admits it)."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


# -- addresses ------------------------------------------------------------------------------------


def _legacy_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """inet_aton's spellings of IPv4, which resolvers accept: 2130706433, 0x7f.1, 0177.0.0.1, 127.1.

    None when `host` is not all-numeric parts (then it is a name); UrlRefused when it is numeric but
    out of range (no resolver should ever be asked about it).
    """
    parts = host[:-1].split(".") if host.endswith(".") else host.split(".")
    if not 1 <= len(parts) <= 4:
        return None
    values = []
    for part in parts:
        text = part.lower()
        try:
            if text.startswith("0x"):
                value = int(text[2:] or "0", 16)
            elif len(text) > 1 and text.startswith("0"):
                value = int(text[1:], 8)
            elif text.isdigit():
                value = int(text)
            else:
                return None
        except ValueError:
            return None
        values.append(value)
    *head, last = values
    if any(v > 255 for v in head) or last >= 256 ** (4 - len(head)):
        raise UrlRefused(f"{host!r} is not a valid IPv4 address")
    number = last
    for index, value in enumerate(head):
        number |= value << (8 * (3 - index))
    return ipaddress.IPv4Address(number)


def parse_ip(host: str) -> IPAddress | None:
    """The address an IP-literal host names (brackets, zone ids and legacy IPv4 forms included); None for names."""
    text = host.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if ":" in text:
        try:
            return ipaddress.IPv6Address(text.split("%", 1)[0])
        except ValueError as exc:
            raise UrlRefused(f"{host!r} is not a valid IPv6 address") from exc
    try:
        return ipaddress.IPv4Address(text)
    except ValueError:
        return _legacy_ipv4(text)


def embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 form carries (mapped, 6to4, NAT64, IPv4-compatible), if any."""
    if isinstance(ip, ipaddress.IPv4Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if any(ip in net for net in _NAT64) or (int(ip) >> 32 == 0 and int(ip) > 1):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def refusal(ip: IPAddress) -> str | None:
    """Why `ip` is refused by default ("a loopback address", ...), or None for a public address."""
    inner = embedded_ipv4(ip)
    if inner is not None and (reason := refusal(inner)) is not None:
        return f"{reason} in IPv6 form"
    checks = (
        (ip in METADATA_ADDRESSES, "a cloud metadata address"),
        (ip.is_unspecified, "the unspecified address"),
        (ip.is_loopback, "a loopback address"),
        (ip.is_link_local, "a link-local address"),
        (ip in _CGNAT, "a shared (CGNAT) address"),
        (ip.is_multicast, "a multicast address"),
        (ip in _UNIQUE_LOCAL, "a unique-local address"),
        (getattr(ip, "is_site_local", False), "a site-local address"),
        (ip.is_reserved, "a reserved address"),
        (ip.is_private, "a private address"),
        (ip in _IETF_V4, "a special-purpose address"),
        (not ip.is_global, "a non-public address"),
    )
    return next((reason for hit, reason in checks if hit), None)


class Allowlist:
    """K5SERVE_URL_ALLOWLIST: IP addresses, CIDR blocks, host names and `*.domain` patterns."""

    def __init__(self, entries: Iterable[str] = ()):
        self.networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        self.names: set[str] = set()
        self.suffixes: list[str] = []
        for raw in entries:
            entry = raw.strip().lower().rstrip(".")
            if not entry:
                continue
            if entry.startswith("[") and "]" in entry:
                entry = entry[1:].replace("]", "", 1)
            try:
                self.networks.append(ipaddress.ip_network(entry, strict=False))
                continue
            except ValueError:
                pass
            pattern = entry.removeprefix("*.")
            if not pattern or not all(c.isalnum() or c in "-." for c in pattern) or ":" in pattern:
                raise ValueError(f"url_allowlist entry {raw!r} is not an IP address, a CIDR block or a host name")
            if entry.startswith("*."):
                self.suffixes.append("." + pattern)
            else:
                self.names.add(pattern)

    def __bool__(self) -> bool:
        return bool(self.networks or self.names or self.suffixes)

    def admits_name(self, host: str) -> bool:
        name = host.lower().rstrip(".")
        return name in self.names or any(name.endswith(s) for s in self.suffixes)

    def admits_ip(self, ip: IPAddress) -> bool:
        candidates = [ip] + ([inner] if (inner := embedded_ipv4(ip)) is not None else [])
        return any(c.version == net.version and c in net for c in candidates for net in self.networks)


# -- the guard ------------------------------------------------------------------------------------


async def system_resolver(host: str, port: int) -> list[str]:
    """The OS resolver (getaddrinfo in a worker thread): every address, in the resolver's order."""
    infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses: list[str] = []
    for _family, _type, _proto, _name, sockaddr in infos:
        address = str(sockaddr[0])
        if address not in addresses:
            addresses.append(address)
    return addresses


class UrlGuard:
    def __init__(self, allowlist: Iterable[str] | Allowlist = (), resolver: Resolver | None = None):
        self.allowlist = allowlist if isinstance(allowlist, Allowlist) else Allowlist(allowlist)
        self.resolver = resolver or system_resolver
        self._ssl_context: ssl.SSLContext | None = None

    @property
    def ssl_context(self) -> ssl.SSLContext:
        """Built once (loading the CA bundle takes tens of milliseconds); honours SSL_CERT_FILE/DIR."""
        if self._ssl_context is None:
            self._ssl_context = httpx.create_ssl_context()
        return self._ssl_context

    def check_ip(self, ip: IPAddress, host: str) -> None:
        if self.allowlist.admits_ip(ip):
            return
        reason = refusal(ip)
        if reason is not None:
            named = f"{host} is {reason}" if parse_ip(host) is not None else f"{host} resolves to {ip}, {reason}"
            raise UrlRefused(
                f"{named}; loopback, private, link-local and metadata addresses are refused unless {SETTING} lists them"
            )

    def check_host(self, host: str) -> IPAddress | None:
        """Checks that need no DNS. Returns the address of an IP-literal host (None for a name)."""
        if not host:
            raise UrlRefused("the URL has no host")
        ip = parse_ip(host)
        if ip is not None:
            self.check_ip(ip, host)
            return ip
        name = host.lower().rstrip(".")
        if self.allowlist.admits_name(name):
            return None
        if name in METADATA_HOSTS:
            raise UrlRefused(f"{host} is a cloud metadata host; it is refused unless {SETTING} lists it")
        if name in LOCAL_HOSTS or name.endswith(".localhost"):
            for local in (ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")):
                if self.allowlist.admits_ip(local):
                    return None
            self.check_ip(ipaddress.ip_address("127.0.0.1"), name)
        return None

    def check_url(self, url: str) -> httpx.URL:
        """The URL's shape and IP-literal host, without DNS. Raises UrlRefused."""
        if not isinstance(url, str) or any(c.isspace() or ord(c) < 32 or c == "\\" for c in url):
            raise UrlRefused("the URL contains whitespace, control characters or backslashes")
        try:
            parsed = httpx.URL(url)
        except (httpx.InvalidURL, ValueError, TypeError) as exc:
            raise UrlRefused(f"the URL is not valid ({exc})") from exc
        if parsed.scheme not in ("http", "https"):
            raise UrlRefused(f"only http and https URLs are fetched, not {parsed.scheme or 'a relative URL'}")
        if parsed.userinfo:
            raise UrlRefused("URLs with user:password@ are refused")
        self.check_host(parsed.host)
        return parsed

    async def resolve(self, host: str, port: int) -> list[str]:
        """The checked addresses to connect to for `host` (an IP literal checks without DNS)."""
        ip = self.check_host(host)
        if ip is not None:
            return [str(ip)]
        try:
            answers = list(await self.resolver(host, port))
        except UrlRefused:
            raise
        except OSError as exc:
            raise httpcore.ConnectError(f"could not resolve {host}: {exc}") from exc
        if not answers:
            raise httpcore.ConnectError(f"{host} has no address")
        name_admitted = self.allowlist.admits_name(host)
        addresses = []
        for answer in answers:
            try:
                address = ipaddress.ip_address(str(answer).split("%", 1)[0])
            except ValueError as exc:
                raise httpcore.ConnectError(f"{host} resolved to {answer!r}, not an address") from exc
            if not name_admitted:
                self.check_ip(address, host)  # EVERY address: one bad answer refuses the host
            addresses.append(str(address))
        return addresses

    def transport(self, inner: httpcore.AsyncNetworkBackend | None = None) -> GuardedTransport:
        return GuardedTransport(GuardedBackend(self, inner), self.ssl_context)

    def client(
        self,
        *,
        timeout: float,
        follow_redirects: bool = False,
        max_redirects: int = 3,
        inner: httpcore.AsyncNetworkBackend | None = None,
    ) -> httpx.AsyncClient:
        """An httpx client whose every connection (redirect hops included) goes through this guard."""
        return httpx.AsyncClient(
            transport=self.transport(inner),
            timeout=timeout,
            follow_redirects=follow_redirects,
            max_redirects=max_redirects,
            trust_env=False,  # no environment proxies (nor .netrc): the guard must see the real host
        )


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """connect_tcp resolves, checks every address and connects to a checked IP: never to a name."""

    def __init__(self, guard: UrlGuard, inner: httpcore.AsyncNetworkBackend | None = None):
        self.guard = guard
        self.inner = inner or httpcore.AnyIOBackend()

    async def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        try:
            with anyio.fail_after(timeout):
                addresses = await self.guard.resolve(host, port)
        except TimeoutError as exc:
            raise httpcore.ConnectTimeout(f"resolving {host} timed out") from exc
        error: Exception | None = None
        for address in addresses:
            try:
                return await self.inner.connect_tcp(
                    address, port, timeout=timeout, local_address=local_address, socket_options=socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                error = exc
        assert error is not None
        raise error

    async def connect_unix_socket(self, path, timeout=None, socket_options=None):
        raise UrlRefused("unix sockets are not reachable through the URL guard")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


class GuardedTransport(httpx.AsyncHTTPTransport):
    """httpx's own transport (exception mapping, streaming) on a pool that connects through the guard.

    httpx 0.28 has no public way to hand a network backend to AsyncHTTPTransport, so the pool it
    builds is replaced by one built the same way with `network_backend` set.
    """

    def __init__(self, backend: GuardedBackend, ssl_context: ssl.SSLContext):
        super().__init__(verify=ssl_context, trust_env=False)
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl_context,
            max_connections=10,
            max_keepalive_connections=5,
            keepalive_expiry=5.0,
            network_backend=backend,
        )
