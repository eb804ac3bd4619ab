"""The transport interface: its value type, and that the server's pool is what it describes."""

from __future__ import annotations

import attrs
import pytest

from runestone_proxy.gateway import transport
from runestone_proxy.server import upstream


def test_timeouts_are_a_frozen_value_with_documented_defaults() -> None:
    t = transport.UpstreamTimeouts()
    assert (t.connect_s, t.first_byte_s, t.between_chunks_s, t.total_s) == (10, 60, 60, 600)
    assert t == transport.UpstreamTimeouts(connect_s=10)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        t.connect_s = 1  # type: ignore[misc]


def test_the_server_speaks_the_same_values() -> None:
    # One definition: the pool's defaults and the gateway's timeouts are the same class.
    assert upstream.UpstreamTimeouts is transport.UpstreamTimeouts
    assert isinstance(upstream.UpstreamPool().timeouts, transport.UpstreamTimeouts)
