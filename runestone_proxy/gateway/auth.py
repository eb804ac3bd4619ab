"""API keys: who is calling, and for which tenant. Pure (no I/O).

Keys come from ``[[auth.keys]]`` (``key_env`` names an environment variable holding the key,
or ``key_sha256`` holds only its digest, so no plaintext secret sits in the file) and from
``RUNESTONE_API_KEYS`` (a comma list, tenant ``default``). Only SHA-256 digests are kept in
memory; a presented key is hashed and looked up by digest, then compared with
``hmac.compare_digest`` so the check takes the same time whether or not it matches.

Clients send ``Authorization: Bearer <key>`` (OpenAI SDKs) or ``x-api-key: <key>``
(Anthropic SDKs). With auth enabled but no key configured at all, the gateway runs open
(tenant ``default``) and says so loudly at start; ``open`` tells the caller which.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping

import attrs

from runestone_proxy.config import Config
from runestone_proxy.errors import AuthenticationFailed
from runestone_proxy.gateway.budget import NO_BUDGETS, Budgets
from runestone_proxy.gateway.ratelimit import UNLIMITED, KeyLimits
from runestone_proxy.telemetry import mask_key


@attrs.frozen
class Principal:
    tenant: str
    key_mask: str
    key_id: str  # digest prefix: a stable, non-secret id for per-key limits
    limits: KeyLimits = UNLIMITED
    budgets: Budgets = NO_BUDGETS


class KeyRejected(AuthenticationFailed):
    """401 ``invalid_api_key`` for a key that was presented but is unknown or inactive.

    Carries what telemetry may say about it: the key's mask, and its tenant when the key is
    known (inactive). The client's message never says which of the two it was."""

    def __init__(self, message: str, *, key_mask: str, tenant: str | None) -> None:
        super().__init__(message)
        self.key_mask = key_mask
        self.tenant = tenant


ANONYMOUS = Principal(tenant="default", key_mask="-", key_id="anonymous")


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@attrs.frozen
class KeyRecord:
    tenant: str
    active: bool
    sha256: str
    limits: KeyLimits = UNLIMITED
    budgets: Budgets = NO_BUDGETS


@attrs.frozen
class KeyStore:
    enabled: bool
    records: Mapping[str, KeyRecord]

    @property
    def open(self) -> bool:
        """True when requests need no key (auth disabled, or no key configured)."""
        return not self.enabled or not self.records

    @classmethod
    def build(cls, config: Config, env: Mapping[str, str]) -> KeyStore:
        records: dict[str, KeyRecord] = {}
        for entry in config.auth.keys:
            if entry.key_sha256 is not None:
                sha = entry.key_sha256.lower()
            else:
                value = env.get(entry.key_env or "")
                if not value:
                    continue  # the variable is unset: this key does not exist on this host
                sha = digest(value)
            limits, budgets = KeyLimits.from_config(entry), Budgets.from_config(entry)
            records[sha] = KeyRecord(entry.tenant, entry.active, sha, limits, budgets)
        for value in env.get("RUNESTONE_API_KEYS", "").split(","):
            value = value.strip()
            if value:
                sha = digest(value)
                records.setdefault(sha, KeyRecord("default", True, sha))
        return cls(config.auth.enabled, records)

    def authenticate(self, authorization: bytes | None, x_api_key: bytes | None) -> Principal:
        """The caller's principal, or :class:`AuthenticationFailed` (401 invalid_api_key)."""
        if self.open:
            return ANONYMOUS
        presented = presented_key(authorization, x_api_key)
        if presented is None:
            raise AuthenticationFailed(
                "You didn't provide an API key. You need to provide your API key in an "
                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
            )
        sha = digest(presented)
        mask = mask_key(presented)
        record = self.records.get(sha)
        if record is None or not hmac.compare_digest(record.sha256, sha) or not record.active:
            raise KeyRejected(
                f"Incorrect API key provided: {mask}.",
                key_mask=mask,
                tenant=record.tenant if record is not None else None,
            )
        return Principal(record.tenant, mask, sha[:12], record.limits, record.budgets)


def presented_key(authorization: bytes | None, x_api_key: bytes | None) -> str | None:
    """The key a request presents: ``Authorization: Bearer`` (OpenAI SDKs) first, else
    ``x-api-key`` (Anthropic SDKs); None when it presents none."""
    if authorization:
        scheme, _, token = authorization.partition(b" ")
        if scheme.lower() == b"bearer" and token.strip():
            return token.strip().decode("latin-1")
    if x_api_key and x_api_key.strip():
        return x_api_key.strip().decode("latin-1")
    return None
