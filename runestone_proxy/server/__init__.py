"""Layer 5, the Trio I/O: everything that owns a socket, a file, a thread or a signal.

What lives here: the listener and the HTTP/1.1 and HTTP/2 connections (``frontend`` adds
their shared bookkeeping to ``api.dispatch.Dispatcher``), the pooled upstream client (which
implements ``gateway.transport``), the SQLite store (which implements ``gateway.queue``)
and its drainer, the aliases file reader and watcher, systemd integration, and ``app``: the
nursery tree that owns every long-lived task and wires the service to the API.

May import: every layer below it (``api/``, ``gateway/``, ``providers/``, ``protocol/``)
and the leaves; nothing imports ``server/`` but ``__main__`` and other ``server`` modules
(``tests/test_layers.py`` holds the rule).
"""
