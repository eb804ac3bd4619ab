"""API keys managed at run time: :class:`KeyManager`, the one place that changes keys (the
admin API and the CLI both call it) and keeps this process's key table in step with the
store; the table's records (:func:`records_from`) and the admin's views of a key. The stored
row, its settings and the checks on what an admin sends are in :mod:`.api_key_values`.

A stored key has a public id (``key_<16 hex>``), a tenant, the SHA-256 of its secret (the
secret itself is shown once, when it is made, and kept nowhere), a mask (``sk-...abcd``) to
tell keys apart, and its settings (:class:`KeySettings`: name, rpm/rph/tpm, max_concurrent,
budgets). Config keys (``[[auth.keys]]``, ``RUNESTONE_API_KEYS``) are listed beside them
but read-only here: the config file is their source of truth.

How this works
--------------
* **Rotation keeps the id.** Rotating gives the key a new secret; the old secret's digest
  moves to ``previous_sha256`` and stays valid until ``previous_expires_at`` (the grace),
  then answers 401. Limits, budgets and the usage ledger follow the id, so a rotation
  neither resets a key's budget nor splits its usage. Rotating again during a grace ends
  the older secret at once (one previous secret at most, as AWS access keys allow two).
* **Every change bumps ``keys_version``** in the same transaction. This process reloads its
  table right after its own change (:meth:`KeyManager.sync`); every other process sharing
  the store polls the version every :data:`REFRESH_INTERVAL_S` and reloads when it moved.
* **Revoked is final**: a revoked key leaves every process's table at the next sync and
  answers 401; it stays in the store (listed as ``revoked``) for the audit trail.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal, Protocol

import attrs
import trio

from runestone_proxy import telemetry
from runestone_proxy.errors import BadRequest, NotFound, PermissionDenied
from runestone_proxy.gateway.api_key_values import (
    KeySettings,
    StoredKey,
    apply_settings,
    check_id,
    check_tenant,
)
from runestone_proxy.gateway.auth import KeyRecord, KeyStore, RuntimeKeys, digest
from runestone_proxy.gateway.budget import Budgets
from runestone_proxy.gateway.ratelimit import KeyLimits
from runestone_proxy.telemetry import mask_key

#: How often every process asks the store whether the keys changed. One indexed read of a
#: one-row table (tens of microseconds on the store's thread) twice a second is nothing,
#: and it puts a change made elsewhere (another worker, another host, the CLI) in force
#: within about half a second, inside the one second the admin API promises.
REFRESH_INTERVAL_S = 0.5
SECRET_PREFIX = "sk-rs-"
ID_PREFIX = "key_"


class KeyAdminStore(Protocol):
    """What the key manager needs from the durable store (server/store_keys.py)."""

    async def insert_key(self, key: StoredKey) -> None: ...

    async def list_keys(self, tenant: str | None) -> list[StoredKey]: ...

    async def get_key(self, key_id: str) -> StoredKey | None: ...

    async def update_key(
        self, key_id: str, settings: KeySettings, now: float
    ) -> StoredKey | None: ...

    async def revoke_key(self, key_id: str, now: float) -> StoredKey | None: ...

    async def rotate_key(
        self, key_id: str, sha256: str, mask: str, grace_end: float, now: float
    ) -> StoredKey | None: ...

    async def keys_version(self) -> int: ...

    async def load_keys(self) -> tuple[int, list[StoredKey]]:
        """The version, then every key not revoked (read in that order)."""
        ...


# --- the in-memory table ------------------------------------------------------------------------


def records_from(keys: Iterable[StoredKey]) -> dict[str, KeyRecord]:
    """Digest -> record for the keys not revoked: each key's secret, and its previous
    secret while the grace lasts (``expires_at``; checked per request)."""
    records: dict[str, KeyRecord] = {}
    for key in keys:
        if key.revoked_at is not None:
            continue
        record = record_for(key)
        records[key.sha256] = record
        if key.previous_sha256 is not None and key.previous_expires_at is not None:
            records[key.previous_sha256] = attrs.evolve(
                record,
                sha256=key.previous_sha256,
                mask=key.previous_mask or "-",
                expires_at=key.previous_expires_at,
            )
    return records


def record_for(key: StoredKey) -> KeyRecord:
    s = key.settings
    return KeyRecord(
        key.tenant,
        key.revoked_at is None,
        key.sha256,
        KeyLimits(s.rpm, s.rph, s.tpm),
        Budgets.from_config(s),  # read from the principal exactly as a config key's are
        key_id=key.id,
        name=s.name,
        mask=key.mask,
        source="store",
        max_concurrent=s.max_concurrent,
    )


# --- views --------------------------------------------------------------------------------------


def key_view(key: StoredKey, now: float) -> dict[str, Any]:
    """A stored key as the admin API shows it: never the secret, nor its digest."""
    s = key.settings
    rotation = None
    if key.previous_expires_at is not None and key.previous_expires_at > now:
        if key.revoked_at is None:
            rotation = {"previous_mask": key.previous_mask, "expires_at": key.previous_expires_at}
    return {
        "object": "runestone.key",
        "id": key.id,
        "tenant": key.tenant,
        "name": s.name,
        "mask": key.mask,
        "source": "store",
        "status": "revoked" if key.revoked_at is not None else "active",
        "created_at": key.created_at,
        "updated_at": key.updated_at,
        "revoked_at": key.revoked_at,
        "rotation": rotation,
        "limits": {"rpm": s.rpm, "rph": s.rph, "tpm": s.tpm, "max_concurrent": s.max_concurrent},
        "budgets": {
            "budget_usd_day": s.budget_usd_day,
            "budget_usd_month": s.budget_usd_month,
            "budget_tokens_day": s.budget_tokens_day,
        },
    }


def config_key_view(record: KeyRecord) -> dict[str, Any]:
    """A config key (read-only here), in the same shape."""
    limits = record.limits
    return {
        "object": "runestone.key",
        "id": record.key_id,
        "tenant": record.tenant,
        "name": record.name,
        "mask": record.mask,
        "source": "config",
        "status": "active" if record.active else "inactive",
        "created_at": None,
        "updated_at": None,
        "revoked_at": None,
        "rotation": None,
        "limits": {
            "rpm": limits.rpm,
            "rph": limits.rph,
            "tpm": limits.tpm,
            "max_concurrent": record.max_concurrent,
        },
        "budgets": {
            "budget_usd_day": record.budgets.usd_day,
            "budget_usd_month": record.budgets.usd_month,
            "budget_tokens_day": record.budgets.tokens_day,
        },
    }


# --- the manager --------------------------------------------------------------------------------

Action = Literal["create", "update", "revoke", "rotate"]


@attrs.frozen
class NewSecret:
    """A key just made or rotated: the secret (shown this once) and the stored row."""

    secret: str
    key: StoredKey


@attrs.define(eq=False)
class KeyManager:
    """Changes keys in the store and keeps ``runtime`` (this process's table) in step.

    ``keys`` returns the current :class:`KeyStore` (it is rebuilt on reload): its config
    records are listed beside the stored keys, and win a digest clash."""

    store: KeyAdminStore
    runtime: RuntimeKeys
    keys: Callable[[], KeyStore]
    clock: Callable[[], float] = time.time

    async def sync(self) -> bool:
        """Reload the table if the store's ``keys_version`` moved; True if it did."""
        version = await self.store.keys_version()
        if version == self.runtime.version:
            return False
        version, rows = await self.store.load_keys()
        self.runtime.install(records_from(rows), version)
        # One line per change per process (changes are an admin's, rare): when each worker
        # or gateway put it in force.
        telemetry.emit("keys.loaded", version=version, keys=len(rows))
        return True

    async def refresh(
        self,
        interval_s: float = REFRESH_INTERVAL_S,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Load the table, report started, then poll every ``interval_s`` until cancelled. A
        failed poll (store busy or gone) keeps the table held and tries again next time."""
        await self.sync()
        task_status.started()
        while True:
            await trio.sleep(interval_s)
            try:
                await self.sync()
            except Exception as exc:  # the store's errors are GatewayErrors; keep polling
                telemetry.emit("keys.refresh.failed", error=str(exc))

    # --- reads -----------------------------------------------------------------------------

    async def list(self, tenant: str | None = None) -> list[dict[str, Any]]:
        """Config keys first, then stored keys (oldest first), masked."""
        now = self.clock()
        views = [
            config_key_view(r)
            for r in self._config_records()
            if tenant is None or r.tenant == tenant
        ]
        views += [key_view(k, now) for k in await self.store.list_keys(tenant)]
        return views

    async def show(self, key_id: str) -> dict[str, Any]:
        check_id(key_id)
        for record in self._config_records():
            if record.key_id == key_id:
                return config_key_view(record)
        return key_view(await self._get(key_id), self.clock())

    # --- changes ---------------------------------------------------------------------------

    async def create(self, tenant: str, settings: KeySettings, *, admin: str) -> NewSecret:
        check_tenant(tenant)
        secret = SECRET_PREFIX + secrets.token_urlsafe(32)
        now = self.clock()
        key = StoredKey(
            ID_PREFIX + secrets.token_hex(8),
            tenant,
            digest(secret),
            mask_key(secret),
            now,
            now,
            settings,
        )
        await self.store.insert_key(key)
        await self._changed("create", key, admin)
        return NewSecret(secret, key)

    async def update(self, key_id: str, body: Mapping[str, Any], *, admin: str) -> StoredKey:
        """Apply the settings ``body`` names (400 for another field or a bad value)."""
        current = await self._changeable(key_id)
        settings = apply_settings(current.settings, body)
        key = await self.store.update_key(key_id, settings, self.clock())
        key = await self._written(key_id, key)
        await self._changed("update", key, admin)
        return key

    async def revoke(self, key_id: str, *, admin: str) -> StoredKey:
        """Revoke (idempotent: a revoked key is returned as it is)."""
        current = await self._changeable(key_id, revoked_ok=True)
        if current.revoked_at is not None:
            return current
        key = await self.store.revoke_key(key_id, self.clock())
        key = key if key is not None else await self._get(key_id)  # revoked meanwhile
        await self._changed("revoke", key, admin)
        return key

    async def rotate(self, key_id: str, grace_s: float, *, admin: str) -> NewSecret:
        await self._changeable(key_id)
        secret = SECRET_PREFIX + secrets.token_urlsafe(32)
        now = self.clock()
        key = await self.store.rotate_key(
            key_id, digest(secret), mask_key(secret), now + grace_s, now
        )
        key = await self._written(key_id, key)
        await self._changed("rotate", key, admin, grace_s=grace_s)
        return NewSecret(secret, key)

    # --- helpers ---------------------------------------------------------------------------

    def _config_records(self) -> Sequence[KeyRecord]:
        return list({r.key_id: r for r in self.keys().records.values()}.values())

    async def _get(self, key_id: str) -> StoredKey:
        key = await self.store.get_key(check_id(key_id))
        if key is None:
            raise NotFound(f"No key with id '{key_id[:64]}' was found.", param="id")
        return key

    async def _changeable(self, key_id: str, *, revoked_ok: bool = False) -> StoredKey:
        check_id(key_id)
        if any(r.key_id == key_id for r in self._config_records()):
            raise PermissionDenied(
                f"Key '{key_id}' comes from the config file and is read-only here; change "
                "it in config.toml (or its environment) and reload.",
                code="config_key_read_only",
            )
        key = await self._get(key_id)
        if key.revoked_at is not None and not revoked_ok:
            raise _revoked(key_id)
        return key

    async def _written(self, key_id: str, key: StoredKey | None) -> StoredKey:
        """The row a conditional write returned; None: it was revoked (or deleted) between
        the read and the write, by another process."""
        if key is None:
            await self._get(key_id)
            raise _revoked(key_id)
        return key

    async def _changed(self, action: Action, key: StoredKey, admin: str, **extra: Any) -> None:
        """Audit (never the secret), then put the change in force in this process."""
        telemetry.emit(
            "admin.key",
            action=action,
            admin=admin,
            key_id=key.id,
            tenant=key.tenant,
            key_mask=key.mask,
            **extra,
        )
        await self.sync()


def _revoked(key_id: str) -> BadRequest:
    return BadRequest(f"Key '{key_id}' is revoked.", param="id", code="key_revoked")
