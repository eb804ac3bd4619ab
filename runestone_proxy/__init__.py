"""Runestone: an OpenAI-compatible LLM API gateway on Trio.

The package is layered, low to high; a module imports only its own layer or a lower one
(``tests/test_layers.py`` holds the code to it)::

    protocol/    sans-IO: HTTP/1.1 pieces, HTTP/2 limits, SSE
    providers/   pure translators, per provider and direction
    gateway/     the domain: the request service (admit -> plan -> complete | stream ->
                 settle, run_job, reload), and the interfaces it needs (transport, job queue)
    api/         HTTP handlers, thin: parse, call the service, write the answer
    server/      Trio I/O implementing those interfaces, and the nursery tree (app.py)

Leaves, importable from every layer and importing none: ``config/``, ``errors``, ``logs``,
``telemetry``, ``metrics`` and this ``__init__``. ``__main__`` is top level, like
``server/``.
"""

__version__ = "0.1.0"
