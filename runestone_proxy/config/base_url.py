"""Where a provider's API lives: the ``base_url`` an operator wrote -> the API root.

Translators append their paths to one *API root*: ``/chat/completions``, ``/completions`` and
``/embeddings`` for the openai kind, ``/messages`` for anthropic. Operators write a
``base_url`` (in ``config.toml`` or as ``<PROVIDER>_BASE_URL``) in the form that provider's
own SDK reads from its variable, and those forms differ:

* openai: ``OPENAI_BASE_URL=https://api.openai.com/v1`` (the SDK's default); the SDK
  appends ``/chat/completions``, so the value *is* the root.
* anthropic: ``ANTHROPIC_BASE_URL=https://api.anthropic.com``; the SDK appends
  ``/v1/messages``.
* groq: ``GROQ_BASE_URL=https://api.groq.com``; the SDK appends ``/openai/v1/chat/...``.
* openrouter: ``https://openrouter.ai/api/v1``, the base URL its docs give the OpenAI SDK.
* generic (any other OpenAI-compatible server): whatever it documents for the OpenAI SDK,
  e.g. ``http://host:8000/v1`` for vLLM.

Users also write the other form (``ANTHROPIC_BASE_URL=https://api.anthropic.com/v1``,
``GROQ_BASE_URL=https://api.groq.com/openai/v1``, the OpenAI-SDK habit), so :func:`api_root`
accepts both and never doubles or drops a segment. The rule, one per dialect:

* A path that already ends in a version segment (``/v1``, ``/v2``) is the root as written.
* openai and generic: the value is the root as written (that is what the OpenAI SDK does
  with it: ``/v1beta/openai`` for Gemini, no version at all for some servers); only the
  openai dialect gives a *bare origin* (no path) its ``/v1``, since OpenAI's API has no
  other home.
* anthropic, groq, openrouter: the dialect's root suffix (``/v1``, ``/openai/v1``,
  ``/api/v1``) is appended to whatever path is there, which is then a prefix such as a
  corporate proxy's ``/anthropic``; where the path already ends in the first part of the
  suffix (``/api`` for openrouter, ``/openai`` for groq) only the rest is appended.

Trailing slashes are dropped. A URL with a query or fragment, or one that already names an
endpoint (``.../v1/messages``), is refused with a message saying what to write instead,
rather than turned into a URL that can only 404. Pure and called once per provider when the
configuration is loaded and when the gateway builds its providers, never per request.
"""

from __future__ import annotations

import re
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

Dialect = Literal["openai", "anthropic", "groq", "openrouter", "generic"]

#: The API root's path under the origin, per dialect (what its SDK appends to its base URL
#: before the endpoint path). Empty: the base_url is the root as written.
ROOT_SUFFIX: dict[str, str] = {
    "openai": "/v1",
    "anthropic": "/v1",
    "groq": "/openai/v1",
    "openrouter": "/api/v1",
    "generic": "",
}

#: Dialects whose base_url is the API root as written (the OpenAI SDK's meaning).
_VERBATIM = frozenset({"openai", "generic"})

_VERSION = re.compile(r"/v[0-9]+$")
_ENDPOINTS = ("/chat/completions", "/completions", "/embeddings", "/messages")


def api_root(url: str, dialect: str) -> str:
    """The URL the dialect's endpoint paths are appended to; ``ValueError`` if ``url`` can
    only be wrong. Idempotent: ``api_root(api_root(u, d), d) == api_root(u, d)``."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"must start with http:// or https:// and name a host: {url}")
    if parts.query or parts.fragment:
        raise ValueError(f"must not carry a query string or fragment: {url}")
    path = parts.path.rstrip("/")
    for endpoint in _ENDPOINTS:
        if path.endswith(endpoint):
            raise ValueError(
                f"is the API's base URL, not an endpoint: drop {endpoint!r} from {url}"
            )
    path += _missing(path, dialect)
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def _missing(path: str, dialect: str) -> str:
    """What to append to ``path`` (no trailing slash) to reach the dialect's API root."""
    suffix = ROOT_SUFFIX[dialect]
    if not suffix or _VERSION.search(path):
        return ""
    if dialect in _VERBATIM and path:
        return ""
    segments = suffix.split("/")[1:]
    for cut in range(len(segments) - 1, 0, -1):
        head = "/" + "/".join(segments[:cut])
        if path.endswith(head):
            return "/" + "/".join(segments[cut:])
    return suffix
