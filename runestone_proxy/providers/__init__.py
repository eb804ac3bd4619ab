"""Layer 2, the provider translators: each client dialect <-> each provider's wire format.

What lives here: per provider and per direction, pure functions and small state tables that
build an upstream request from a :class:`~.base.ProviderCall`, and turn the provider's
answer, error body or stream events into OpenAI shapes (``openai``, ``anthropic_*``,
``completions``, ``provider_errors``), the interface they share (``base``), and the
in-process ``mock`` provider. Unit-tested with plain data.

May import: the standard library, ``protocol/``, and the leaves (``config``, ``errors``,
``logs``, ``telemetry``, ``metrics``); never trio, httpx or structlog, and never
``gateway/``, ``api/`` or ``server/``. ``tests/test_layers.py`` holds both rules.
"""
