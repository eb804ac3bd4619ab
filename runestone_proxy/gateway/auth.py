"""API keys: who is calling, and for which tenant. Pure (no I/O).

Keys come from ``[[auth.keys]]`` (``key_env`` names an environment variable holding the key,
or ``key_sha256`` holds only its digest, so no plaintext secret sits in the file) and from
``RUNESTONE_API_KEYS`` (a comma list, tenant ``default``). Only SHA-256 digests are kept in
memory; a presented key is hashed and looked up by digest, then compared with
``hmac.compare_digest`` so the check takes the same time whether or not it matches.

Clients send ``Authorization: Bearer <key>`` (OpenAI SDKs) or ``x-api-key: <key>``
(Anthropic SDKs). With auth enabled but no key configured at all, the gateway runs open
(tenant ``default``) and says so loudly at start; ``open`` tells the caller which.

Keys made at run time (the admin API, the CLI: :mod:`.api_keys`) sit beside the config keys
in :class:`RuntimeKeys`, one object that outlives the reloads (the config table is rebuilt
on each; the runtime table is swapped whole by its refresh). A presented key is looked up
in the config table first, so a config key wins a digest clash. A runtime record may carry
``expires_at`` (a rotated key's old secret, valid for a grace), checked per request.
Creating the first runtime key closes a gateway that ran open for want of keys.

:class:`KeySlots` is a key's own ``max_concurrent``: a counter per key id, in this process
(the Redis state backend holds it fleet-wide instead: ``server/redis_limits.py``).
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable, Mapping
from typing import Literal

import attrs

from runestone_proxy.config import Config
from runestone_proxy.errors import AuthenticationFailed, RateLimited
from runestone_proxy.gateway.budget import NO_BUDGETS, Budgets
from runestone_proxy.gateway.ratelimit import UNLIMITED, KeyLimits
from runestone_proxy.telemetry import mask_key


@attrs.frozen
class Principal:
    tenant: str
    key_mask: str
    #: A stable, non-secret id for per-key limits and the ledger: a config key's digest
    #: prefix, a runtime key's ``key_...`` id (the same across its rotations).
    key_id: str
    limits: KeyLimits = UNLIMITED
    budgets: Budgets = NO_BUDGETS
    #: The key's own cap on requests in flight (:class:`KeySlots`); None: none.
    max_concurrent: int | None = None


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
    #: The key's budgets (config or store alike: :mod:`.budget_book` enforces them from the
    #: principal); NO_BUDGETS (the very object) when none is set.
    budgets: Budgets = NO_BUDGETS
    #: The principal's ``key_id`` (default: the digest's first 12 hex digits).
    key_id: str = attrs.field(
        kw_only=True, default=attrs.Factory(lambda self: self.sha256[:12], takes_self=True)
    )
    name: str = attrs.field(kw_only=True, default="")
    mask: str = attrs.field(kw_only=True, default="-")
    source: Literal["config", "store"] = attrs.field(kw_only=True, default="config")
    max_concurrent: int | None = attrs.field(kw_only=True, default=None)
    #: Unix time after which this secret answers 401 (a rotated key's old secret).
    expires_at: float | None = attrs.field(kw_only=True, default=None)


@attrs.define(eq=False)
class RuntimeKeys:
    """The keys held in the store, as this process last loaded them (swapped whole)."""

    records: Mapping[str, KeyRecord] = attrs.Factory(dict)
    #: The store's ``keys_version`` they were loaded at (-1: never loaded).
    version: int = -1
    #: Wall clock for ``expires_at``; tests pass their own.
    clock: Callable[[], float] = time.time

    def install(self, records: Mapping[str, KeyRecord], version: int) -> None:
        self.records = records
        self.version = version


@attrs.frozen
class KeyStore:
    enabled: bool
    records: Mapping[str, KeyRecord]
    runtime: RuntimeKeys = attrs.Factory(RuntimeKeys)

    @property
    def open(self) -> bool:
        """True when requests need no key (auth disabled, or no key configured or made)."""
        return not self.enabled or not (self.records or self.runtime.records)

    @classmethod
    def build(
        cls, config: Config, env: Mapping[str, str], runtime: RuntimeKeys | None = None
    ) -> KeyStore:
        """The config's key table; ``runtime``: the run-time keys held so far (a reload
        passes the old store's, so they survive it)."""
        records: dict[str, KeyRecord] = {}
        for entry in config.auth.keys:
            if entry.key_sha256 is not None:
                sha = entry.key_sha256.lower()
                name, mask = "sha256", "-"
            else:
                value = env.get(entry.key_env or "")
                if not value:
                    continue  # the variable is unset: this key does not exist on this host
                sha = digest(value)
                name, mask = entry.key_env or "", mask_key(value)
            records[sha] = KeyRecord(
                entry.tenant,
                entry.active,
                sha,
                KeyLimits.from_config(entry),
                Budgets.from_config(entry),
                name=name,
                mask=mask,
                max_concurrent=entry.max_concurrent,
            )
        for value in env.get("RUNESTONE_API_KEYS", "").split(","):
            value = value.strip()
            if value:
                sha = digest(value)
                record = KeyRecord(
                    "default", True, sha, name="RUNESTONE_API_KEYS", mask=mask_key(value)
                )
                records.setdefault(sha, record)
        return cls(config.auth.enabled, records, runtime or RuntimeKeys())

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
        record = self.records.get(sha)  # the config's first: it wins a clash
        if record is None:
            record = self.runtime.records.get(sha)
        if (
            record is None
            or not hmac.compare_digest(record.sha256, sha)
            or not record.active
            or (record.expires_at is not None and self.runtime.clock() >= record.expires_at)
        ):
            raise KeyRejected(
                f"Incorrect API key provided: {mask}.",
                key_mask=mask,
                tenant=record.tenant if record is not None else None,
            )
        return Principal(
            record.tenant, mask, record.key_id, record.limits, record.budgets, record.max_concurrent
        )


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


def key_at_capacity(principal: Principal) -> RateLimited:
    """The 429 for a key whose ``max_concurrent`` requests are all in flight (in this process,
    or across the fleet on the Redis state backend)."""
    return RateLimited(
        f"Too many concurrent requests for API key {principal.key_mask}: its limit is "
        f"{principal.max_concurrent} in flight. Retry when one of them has finished.",
        retry_after_s=1,
    )


@attrs.define(eq=False)
class KeySlots:
    """Requests in flight per key id, for keys with ``max_concurrent``, in this process (on
    the Redis state backend the shared limits count them instead, fleet-wide; this counts
    only the requests admitted while it falls back to local limits)."""

    in_flight: dict[str, int] = attrs.Factory(dict)

    def acquire(self, principal: Principal) -> bool:
        """Take one of the key's slots (True), or nothing if it has no cap (False); 429
        ``rate_limit_exceeded`` when all are taken. Pair a True with :meth:`release`."""
        cap = principal.max_concurrent
        if cap is None:
            return False
        held = self.in_flight.get(principal.key_id, 0)
        if held >= cap:
            raise key_at_capacity(principal)
        self.in_flight[principal.key_id] = held + 1
        return True

    def release(self, key_id: str) -> None:
        held = self.in_flight.get(key_id, 0) - 1
        if held > 0:
            self.in_flight[key_id] = held
        else:
            self.in_flight.pop(key_id, None)  # bounded: idle keys leave the dict
