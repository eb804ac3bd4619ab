"""Layer 1, sans-IO protocol pieces: bytes in, events and bytes out.

What lives here: the incremental SSE parser and encoder (``sse``), HTTP/2 flood accounting
(``h2limits``), the request-body rate rule (``slowclient``), and the HTTP/1.1 pieces the
listener and the upstream pool share (``h1``: head writers, head checks, the connection phase
table), and the upstream response read without h11 (``h1response``: the head and a
Content-Length body; ``chunked``: a chunked body). No module here reads a clock, a socket or a file.

May import: the standard library, h11/h2, and the leaves (``config``, ``errors``, ``logs``,
``telemetry``, ``metrics``); never trio, httpx or structlog, and no other layer of the
package. ``tests/test_layers.py`` holds both rules.
"""
