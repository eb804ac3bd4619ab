"""Layer 4, the HTTP API: thin handlers over the request service.

What lives here: the route table (``router``), the protocol-neutral ``Request`` and
``Responder`` both HTTP/1.1 and HTTP/2 speak (``http``), ``dispatch`` (route, run, turn
errors into OpenAI's envelope; request ids; the access line), and the handlers: the OpenAI
endpoints (``openai``), jobs (``jobs``), health and metrics (``health``). A handler reads
headers and body, authenticates, calls :mod:`runestone_proxy.gateway.service`, and encodes
and writes the answer (headers, SSE framing, the 202 for a parked job); the request flow
itself is the service's.

May import: ``gateway/``, ``providers/``, ``protocol/`` and the leaves (``config``,
``errors``, ``logs``, ``telemetry``, ``metrics``); never ``server/``, which implements the
connections that call ``dispatch`` (``tests/test_layers.py`` holds the rule).
"""
