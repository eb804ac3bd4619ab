"""The tables of the durable and shared stores: the overflow queue (``[overflow]``), the
usage ledger (``[ledger]``) and the limits' shared state (``[state]``)."""

from __future__ import annotations

from typing import Literal

import attrs

from runestone_proxy.config.fields import FieldError, _existing_file, _positive


@attrs.frozen
class OverflowConfig:
    """The durable overflow queue and its drainer: SQLite (embedded, one host) or PostgreSQL
    (one queue shared by every gateway of a fleet)."""

    backend: Literal["sqlite", "postgres"] = "sqlite"
    #: SQLite: relative paths live under $RUNESTONE_STATE_DIR (systemd StateDirectory) when set.
    database: str = "runestone.sqlite3"
    #: PostgreSQL: ``postgresql://user:pass@host:5432/db`` (libpq URI; ``?sslmode=...`` etc.).
    #: ``RUNESTONE_OVERFLOW_URL`` overrides it, so the password need not sit in the file.
    url: str | None = attrs.field(default=None, repr=False)  # may hold a password
    max_attempts: int = attrs.field(default=5, validator=_positive)
    #: Claims in a row with no outcome recorded (the outcome could not be stored, or the
    #: process died mid-run) after which a job is ``dead`` instead of claimed again.
    max_claims: int = attrs.field(default=3, validator=_positive)
    #: A claimed job's lease; an expired lease (crash) returns the job to the queue.
    lease_s: float = attrs.field(default=300.0, validator=_positive)
    backoff_base_s: float = attrs.field(default=1.0, validator=_positive)
    backoff_max_s: float = attrs.field(default=60.0, validator=_positive)
    #: Finished jobs' results are kept this long, then swept.
    retention_s: float = attrs.field(default=7 * 86400.0, validator=_positive)
    #: The same Idempotency-Key from the same tenant within this window returns the same job.
    idempotency_window_s: float = attrs.field(default=86400.0, validator=_positive)
    #: Environment variable holding the webhook HMAC-SHA256 secret.
    webhook_secret_env: str = "RUNESTONE_WEBHOOK_SECRET"
    webhook_timeout_s: float = attrs.field(default=10.0, validator=_positive)
    webhook_max_attempts: int = attrs.field(default=8, validator=_positive)
    #: Most enqueues committed in one transaction (group commit).
    group_commit_max_batch: int = attrs.field(default=256, validator=_positive)

    def __attrs_post_init__(self) -> None:
        if self.backend == "postgres" and not self.url:
            raise FieldError("url", 'backend = "postgres" needs url = "postgresql://..."')
        if self.url is not None and not self.url.startswith(("postgresql://", "postgres://")):
            raise FieldError("url", f"must be a postgresql:// URL, got {_redacted(self.url)!r}")


@attrs.frozen
class LedgerConfig:
    """How long the usage ledger keeps its raw records and its hourly and daily rollups
    (the store's retention sweep deletes what is older)."""

    #: Write a usage record per request (off: none is kept, and spend is not counted).
    enabled: bool = True
    retention_days: int = attrs.field(default=30, validator=_positive)
    hourly_retention_days: int = attrs.field(default=400, validator=_positive)
    daily_retention_days: int = attrs.field(default=1830, validator=_positive)
    #: Records wait at most this long for the writer (they also ride along any earlier
    #: write, and a full pass's worth goes at once): one commit per interval, not per
    #: request. A crash loses at most this much of the ledger; a drain writes it all.
    flush_interval_s: float = attrs.field(default=1.0, validator=_positive)


@attrs.frozen
class StateConfig:
    """Where the limits' shared state lives: in this process (``local``, the embedded
    default) or on Redis, shared by every worker and host: per-tenant concurrency slots (as
    leases that expire when their holder dies), per-key rpm/rph/tpm windows, budgets,
    breaker state and the hedging p95."""

    backend: Literal["local", "redis"] = "local"
    #: ``redis://[:password@]host:6379/0`` or ``rediss://`` (TLS). ``RUNESTONE_REDIS_URL``
    #: overrides it.
    url: str | None = attrs.field(default=None, repr=False)  # may hold a password
    #: Redis unreachable: ``fail_closed`` answers 503 to requests that need it;
    #: ``local`` falls back to this process's own limits (logged as a warning) until it is back.
    on_unavailable: Literal["fail_closed", "local"] = "fail_closed"
    #: A concurrency slot's lease: a holder that dies frees its slots after at most this long.
    lease_s: float = attrs.field(default=30.0, validator=_positive)
    #: Each Redis command's deadline; past it the server counts as unavailable.
    timeout_s: float = attrs.field(default=0.5, validator=_positive)
    #: Prefix of every Redis key Runestone writes (several gateways fleets may share a server).
    key_prefix: str = "runestone:"
    #: CA bundle for ``rediss://`` (default: the system's).
    tls_ca_file: str | None = attrs.field(default=None, validator=_existing_file)

    def __attrs_post_init__(self) -> None:
        if self.backend == "redis" and not self.url:
            raise FieldError("url", 'backend = "redis" needs url = "redis://host:6379/0"')
        if self.url is not None and not self.url.startswith(("redis://", "rediss://")):
            raise FieldError(
                "url", f"must be a redis:// or rediss:// URL, got {_redacted(self.url)!r}"
            )


def _redacted(url: str) -> str:
    """``url`` without its password, for error messages."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if not sep or not at:
        return url
    user = userinfo.partition(":")[0]
    return f"{scheme}://{user}:***@{host}" if ":" in userinfo else url
