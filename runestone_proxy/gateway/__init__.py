"""Layer 3, the domain: what happens to a request, with no sockets and no files.

What lives here: the request service (``service``, ``service_state``, ``admission``): the
one flow every generation request and queued job takes, accept -> admit -> plan ->
complete | stream -> settle, taking and returning plain values (no HTTP); request-body
validation (``request_body``) and the metadata splice (``metadata``); auth (``auth``), rate
limits and tenant capacity (``ratelimit``, ``limits``, ``capacity``), routing and
deployments (``routing``, ``deployments``), circuit breakers, failover and hedging
(``breaker``, ``failover``, ``failover_stream``: a stream handed over as a value), the
provider call (``pipeline``), the overflow queue's rules (``overflow``, ``job_results``), and the
interfaces the domain needs from the I/O layer, as ``typing.Protocol`` s that ``server/``
implements: ``transport`` (an upstream HTTP client) and ``queue`` (the durable job queue).
Policies are plain functions returning decisions; async code here awaits only through
those interfaces, trio primitives and cancel scopes.

May import: ``providers/``, ``protocol/``, the leaves (``config``, ``errors``, ``logs``,
``telemetry``, ``metrics``), trio and third-party libraries; never ``api/`` or ``server/``
(``tests/test_layers.py`` holds the rule).
"""
