"""The route table: (method, path pattern) -> handler.

Static paths are one dict lookup (the hot path: ``/v1/chat/completions``); patterns with
``{name}`` segments are matched segment by segment afterwards. A path that exists under other
methods answers 405 with ``Allow``; an unknown path answers 404. Both errors come from
:mod:`runestone_proxy.errors`, so they leave in OpenAI's envelope like every other error.
"""

from __future__ import annotations

import attrs

from runestone_proxy.api.http import Handler
from runestone_proxy.errors import MethodNotAllowed, NotFound


@attrs.frozen
class _Pattern:
    segments: tuple[str, ...]
    handlers: dict[str, Handler]

    def match(self, parts: list[str]) -> dict[str, str] | None:
        if len(parts) != len(self.segments):
            return None
        params: dict[str, str] = {}
        for want, got in zip(self.segments, parts, strict=True):
            if want.startswith("{") and want.endswith("}"):
                if not got:
                    return None
                params[want[1:-1]] = got
            elif want != got:
                return None
        return params


@attrs.define
class Router:
    """Maps (method, path) to a handler; ``HEAD`` falls back to ``GET`` (RFC 9110 §9.3.2)."""

    _static: dict[str, dict[str, Handler]] = attrs.Factory(dict)
    _patterns: list[_Pattern] = attrs.Factory(list)

    def add(self, method: str, pattern: str, handler: Handler) -> None:
        if not pattern.startswith("/"):
            raise ValueError(f"route pattern must start with '/': {pattern!r}")
        if "{" not in pattern:
            self._static.setdefault(pattern, {})[method] = handler
            return
        segments = tuple(pattern.strip("/").split("/"))
        for existing in self._patterns:
            if existing.segments == segments:
                existing.handlers[method] = handler
                return
        self._patterns.append(_Pattern(segments, {method: handler}))

    def resolve(self, method: str, path: str) -> tuple[Handler, dict[str, str]]:
        """The handler and path parameters for a request, or raise 404 / 405."""
        handlers = self._static.get(path)
        params: dict[str, str] = {}
        if handlers is None:
            parts = path.strip("/").split("/")
            for pattern in self._patterns:
                found = pattern.match(parts)
                if found is not None:
                    handlers, params = pattern.handlers, found
                    break
        if handlers is None:
            raise NotFound(f"Unknown request URL: {method} {path}.", code="unknown_url")
        handler = handlers.get(method)
        if handler is None and method == "HEAD":
            handler = handlers.get("GET")
        if handler is None:
            allow = sorted({*handlers, *(("HEAD",) if "GET" in handlers else ())})
            raise MethodNotAllowed(
                f"Method {method} is not allowed on {path}; allowed: {', '.join(allow)}.",
                allow=tuple(allow),
            )
        return handler, params
