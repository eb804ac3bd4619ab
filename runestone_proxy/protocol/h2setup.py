"""The h2 state machine as the gateway's HTTP/2 server connections use it. No I/O.

:func:`server_protocol` builds one ``h2.connection.H2Connection`` with its first output
(the server preface: SETTINGS, and a connection-level WINDOW_UPDATE) already queued. What
it configures, and why:

* h2's header checks and normalisation are off in both directions. Inbound blocks go
  through :func:`~runestone_proxy.protocol.h2headers.read_request` instead (h2's verdict,
  for a fraction of the cost); responses are built clean by the stream's responder (lower
  case, no connection-specific fields) and split cookies are joined where the request is
  read, as RFC 9113 §8.2.3 asks.
* Literals go out without Huffman coding, and fields already in the dynamic table without
  a search (``h2headers.LiteralEncoder``).
* SETTINGS: the advertised MAX_CONCURRENT_STREAMS, MAX_HEADER_LIST_SIZE and
  INITIAL_WINDOW_SIZE go out first; then h2's own stream cap is raised above the
  advertised one, because h2 treats a stream beyond it as a connection error, while RFC
  9113 §5.1.2 allows the kinder REFUSED_STREAM, which the connection sends itself.
* The connection window is opened to ``(max streams + 1) x stream window`` up front (RFC
  9113 §6.9.2: SETTINGS never change it; WINDOW_UPDATE does), so one stalled stream never
  starves the others at connection level: each stream holds at most its own window, and
  the one to spare covers the credit the connection owes for bodies already read, which it
  sends a stream window at a time.
"""

from __future__ import annotations

import h2.config
import h2.connection
from h2.settings import SettingCodes, Settings

from runestone_proxy.config import LimitsConfig
from runestone_proxy.protocol.h2headers import LiteralEncoder

__all__ = ["server_protocol"]

_DEFAULT_WINDOW = 65535  # RFC 9113 §6.9.2: every window starts here
_MAX_WINDOW = 2**31 - 1  # RFC 9113 §6.9.1


def server_protocol(limits: LimitsConfig) -> h2.connection.H2Connection:
    """A server-side h2 connection, configured and started (see the module docstring)."""
    proto = h2.connection.H2Connection(
        config=h2.config.H2Configuration(
            client_side=False,
            header_encoding=None,
            validate_inbound_headers=False,
            normalize_inbound_headers=False,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
    )
    proto.encoder = LiteralEncoder()
    advertised = {
        SettingCodes.MAX_CONCURRENT_STREAMS: limits.h2_max_concurrent_streams,
        SettingCodes.MAX_HEADER_LIST_SIZE: limits.h2_max_header_list_bytes,
        SettingCodes.INITIAL_WINDOW_SIZE: limits.h2_initial_window_bytes,
    }
    proto.local_settings = Settings(client=False, initial_values=advertised)
    proto.initiate_connection()
    advertised[SettingCodes.MAX_CONCURRENT_STREAMS] = 2 * limits.h2_max_concurrent_streams + 16
    proto.local_settings = Settings(client=False, initial_values=advertised)
    proto.decoder.max_header_list_size = limits.h2_max_header_list_bytes
    streams = limits.h2_max_concurrent_streams + 1
    target = min(streams * limits.h2_initial_window_bytes, _MAX_WINDOW)
    if target > _DEFAULT_WINDOW:
        proto.increment_flow_control_window(target - _DEFAULT_WINDOW)
    return proto
