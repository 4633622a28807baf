"""The suite-wide guard in conftest.py: tests reach loopback only, and fail loudly otherwise."""

from __future__ import annotations

import socket

import pytest
from conftest import NonLoopbackTraffic


@pytest.mark.parametrize("host", ["169.254.169.254", "10.0.0.1", "8.8.8.8", "2001:db8::1"])
def test_non_loopback_connect_is_refused_before_any_packet(host):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock, pytest.raises(NonLoopbackTraffic):
        sock.connect((host, 80))


@pytest.mark.parametrize("name", ["example.com", "metadata.google.internal"])
def test_non_loopback_names_are_not_resolved(name):
    with pytest.raises(NonLoopbackTraffic):
        socket.getaddrinfo(name, 80)


def test_loopback_still_works():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        with socket.create_connection(server.getsockname(), timeout=5):
            pass
    assert socket.getaddrinfo("localhost", 80)
