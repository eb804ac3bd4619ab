"""Run-time API keys in the domain: the checks on what an admin sends, the in-memory table
(rotation's two secrets, the grace, revocation), the key table's lookups (a config key wins
a clash), a key's own concurrency slots, and :class:`KeyManager` over an in-memory store
(changes in force at once here; a change by another process picked up by the refresh).

Pure tests, plus the refresh loop on trio's ``MockClock`` (``autojump_clock``).
"""

from __future__ import annotations

from typing import Any

import attrs
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from runestone_proxy.config import AuthConfig, AuthKeyConfig, Config
from runestone_proxy.errors import (
    AuthenticationFailed,
    BadRequest,
    InvalidParam,
    NotFound,
    PermissionDenied,
    RateLimited,
)
from runestone_proxy.gateway.api_key_values import (
    DEFAULT_GRACE_S,
    KeySettings,
    StoredKey,
    apply_settings,
    check_grace,
    check_id,
    check_tenant,
)
from runestone_proxy.gateway.api_keys import KeyManager, records_from
from runestone_proxy.gateway.auth import (
    KeyRejected,
    KeySlots,
    KeyStore,
    Principal,
    RuntimeKeys,
    digest,
)
from runestone_proxy.gateway.budget import NO_BUDGETS, Budgets

T0 = 1_800_000_000.0
CONFIG_KEY = "sk-config-0123456789"


@attrs.define
class Clock:
    now: float = T0

    def __call__(self) -> float:
        return self.now


@attrs.define
class MemoryKeys:
    """An in-memory :class:`KeyAdminStore` (the SQLite one is tested in tests/server)."""

    rows: dict[str, StoredKey] = attrs.Factory(dict)
    version: int = 0
    loads: int = 0

    async def insert_key(self, key: StoredKey) -> None:
        self.rows[key.id] = key
        self.version += 1

    async def list_keys(self, tenant: str | None) -> list[StoredKey]:
        return [k for k in self.rows.values() if tenant is None or k.tenant == tenant]

    async def get_key(self, key_id: str) -> StoredKey | None:
        return self.rows.get(key_id)

    def _change(self, key_id: str, **changes: Any) -> StoredKey | None:
        key = self.rows.get(key_id)
        if key is None or key.revoked_at is not None:
            return None
        self.rows[key_id] = key = attrs.evolve(key, **changes)
        self.version += 1
        return key

    async def update_key(self, key_id: str, settings: KeySettings, now: float) -> StoredKey | None:
        return self._change(key_id, settings=settings, updated_at=now)

    async def revoke_key(self, key_id: str, now: float) -> StoredKey | None:
        return self._change(key_id, revoked_at=now, updated_at=now)

    async def rotate_key(
        self, key_id: str, sha256: str, mask: str, grace_end: float, now: float
    ) -> StoredKey | None:
        old = self.rows.get(key_id)
        if old is None:
            return None
        return self._change(
            key_id,
            sha256=sha256,
            mask=mask,
            previous_sha256=old.sha256,
            previous_mask=old.mask,
            previous_expires_at=grace_end,
            updated_at=now,
        )

    async def keys_version(self) -> int:
        return self.version

    async def load_keys(self) -> tuple[int, list[StoredKey]]:
        self.loads += 1
        return self.version, [k for k in self.rows.values() if k.revoked_at is None]


def config_with_key(**fields: Any) -> Config:
    return Config(auth=AuthConfig(keys=(AuthKeyConfig(key_env="K", tenant="ops", **fields),)))


def manager(clock: Clock | None = None, **key_fields: Any) -> tuple[KeyManager, MemoryKeys]:
    clock = clock or Clock()
    keys = KeyStore.build(config_with_key(**key_fields), {"K": CONFIG_KEY})
    keys.runtime.clock = clock
    store = MemoryKeys()
    return KeyManager(store, keys.runtime, lambda: keys, clock), store


def auth(m: KeyManager, key: str) -> Principal:
    return m.keys().authenticate(f"Bearer {key}".encode(), None)


# --- checks -------------------------------------------------------------------------------------


def test_settings_are_applied_and_cleared() -> None:
    base = KeySettings(name="a", rpm=5, budget_usd_day=2.0)
    changed = apply_settings(base, {"rpm": None, "tpm": 100, "budget_usd_month": 3})
    assert changed == KeySettings(name="a", tpm=100, budget_usd_day=2.0, budget_usd_month=3.0)
    assert apply_settings(base, {"name": None}).name == ""
    assert apply_settings(base, {}) == base


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"rpm": 0}, "rpm"),
        ({"rpm": -3}, "rpm"),
        ({"rpm": True}, "rpm"),
        ({"rpm": 1.0}, "rpm"),
        ({"rph": "5"}, "rph"),
        ({"max_concurrent": 10**13}, "max_concurrent"),
        ({"budget_usd_day": 0}, "budget_usd_day"),
        ({"budget_usd_month": float("nan")}, "budget_usd_month"),
        ({"budget_tokens_day": 2.5}, "budget_tokens_day"),
        ({"name": "x" * 201}, "name"),
        ({"name": "line\nbreak"}, "name"),
        ({"tenant": "b"}, "tenant"),
        ({"key": "sk-mine"}, "key"),
    ],
)
def test_bad_settings_name_their_param(body: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidParam) as caught:
        apply_settings(KeySettings(), body)
    assert caught.value.param == param


@given(st.integers(min_value=-(10**13), max_value=10**13))
def test_integer_limits_accept_exactly_1_to_10_to_the_12(value: int) -> None:
    if 0 < value <= 10**12:
        assert apply_settings(KeySettings(), {"tpm": value}).tpm == value
    else:
        with pytest.raises(InvalidParam):
            apply_settings(KeySettings(), {"tpm": value})


def test_tenant_grace_and_id_checks() -> None:
    assert check_tenant("acme-prod.eu") == "acme-prod.eu"
    for bad in ("", " a", "a b", "-a", "x" * 129, 5, None):
        with pytest.raises(InvalidParam):
            check_tenant(bad)
    assert check_grace(None) == DEFAULT_GRACE_S
    assert check_grace(0) == 0.0
    for bad_grace in (-1, 10**9, True, "60", float("inf")):
        with pytest.raises(InvalidParam):
            check_grace(bad_grace)
    assert check_id("key_0123456789abcdef")
    assert check_id("0123456789ab")
    for bad_id in ("key_0123", "KEY_0123456789ABCDEF", "../etc", ""):
        with pytest.raises(NotFound):
            check_id(bad_id)


# --- the table ----------------------------------------------------------------------------------


def stored(n: int = 1, **fields: Any) -> StoredKey:
    return StoredKey(f"key_{n:016x}", "acme", digest(f"secret-{n}"), "sk-...", T0, T0, **fields)


def test_records_hold_a_rotated_keys_old_secret_until_its_grace() -> None:
    rotated = attrs.evolve(
        stored(1),
        sha256=digest("new"),
        previous_sha256=digest("secret-1"),
        previous_mask="sk-...old1",
        previous_expires_at=T0 + 60,
    )
    records = records_from([rotated, attrs.evolve(stored(2), revoked_at=T0)])
    assert set(records) == {digest("new"), digest("secret-1")}
    assert records[digest("new")].expires_at is None
    old = records[digest("secret-1")]
    assert (old.expires_at, old.key_id, old.mask) == (T0 + 60, rotated.id, "sk-...old1")


def test_config_keys_win_a_clash_and_runtime_keys_survive_a_reload() -> None:
    config = config_with_key(max_concurrent=3)
    runtime = RuntimeKeys()
    keys = KeyStore.build(config, {"K": CONFIG_KEY}, runtime)
    clash = attrs.evolve(stored(1), sha256=digest(CONFIG_KEY))
    runtime.install(records_from([clash, stored(2)]), 1)
    principal = keys.authenticate(f"Bearer {CONFIG_KEY}".encode(), None)
    assert (principal.tenant, principal.key_id) == ("ops", digest(CONFIG_KEY)[:12])
    assert principal.max_concurrent == 3
    reloaded = KeyStore.build(config, {"K": CONFIG_KEY}, keys.runtime)
    principal = reloaded.authenticate(None, b"secret-2")
    assert (principal.tenant, principal.key_id) == ("acme", stored(2).id)


def test_the_first_runtime_key_closes_an_open_gateway() -> None:
    keys = KeyStore.build(Config(), {})
    assert keys.open
    keys.runtime.install(records_from([stored(1)]), 1)
    assert not keys.open
    with pytest.raises(AuthenticationFailed):
        keys.authenticate(None, None)


def test_an_expired_old_secret_is_rejected_naming_its_tenant() -> None:
    clock = Clock()
    keys = KeyStore.build(Config(), {}, RuntimeKeys(clock=clock))
    record = records_from([stored(1)])[digest("secret-1")]
    keys.runtime.install({record.sha256: attrs.evolve(record, expires_at=T0 + 1)}, 1)
    assert keys.authenticate(None, b"secret-1").tenant == "acme"
    clock.now = T0 + 1
    with pytest.raises(KeyRejected) as caught:
        keys.authenticate(None, b"secret-1")
    assert caught.value.tenant == "acme"


def test_key_slots_cap_and_release() -> None:
    slots = KeySlots()
    capped = Principal("t", "sk-...", "k1", max_concurrent=2)
    assert slots.acquire(Principal("t", "sk-...", "free")) is False  # no cap: not counted
    assert slots.acquire(capped)
    assert slots.acquire(capped)
    with pytest.raises(RateLimited) as caught:
        slots.acquire(capped)
    assert caught.value.code == "rate_limit_exceeded"
    assert caught.value.status == 429
    slots.release("k1")
    assert slots.acquire(capped)
    slots.release("k1")
    slots.release("k1")
    assert slots.in_flight == {}


# --- the manager --------------------------------------------------------------------------------


async def test_changes_are_in_force_at_once() -> None:
    clock = Clock()
    m, _store = manager(clock)
    created = await m.create("acme", KeySettings(rpm=3, max_concurrent=2), admin="ops")
    principal = auth(m, created.secret)
    assert principal.key_id == created.key.id
    assert principal.limits.rpm == 3
    assert principal.max_concurrent == 2
    # No budget: the very NO_BUDGETS object, so the budget book passes the key by (applies).
    assert principal.budgets is NO_BUDGETS

    await m.update(created.key.id, {"rpm": None, "budget_tokens_day": 10}, admin="ops")
    assert auth(m, created.secret).limits.rpm is None
    # Budgets reach the principal as a config key's do (the budget book reads them there).
    assert auth(m, created.secret).budgets == Budgets(tokens_day=10)
    await m.update(created.key.id, {"budget_usd_day": 0.5, "budget_usd_month": 9}, admin="ops")
    assert auth(m, created.secret).budgets == Budgets(0.5, 9.0, 10)

    rotated = await m.rotate(created.key.id, 30, admin="ops")
    assert auth(m, rotated.secret).key_id == auth(m, created.secret).key_id == created.key.id
    clock.now += 30
    with pytest.raises(KeyRejected):
        auth(m, created.secret)

    await m.revoke(created.key.id, admin="ops")
    with pytest.raises(KeyRejected):
        auth(m, rotated.secret)
    assert (await m.revoke(created.key.id, admin="ops")).revoked_at == T0 + 30
    with pytest.raises(BadRequest) as caught:
        await m.rotate(created.key.id, 30, admin="ops")
    assert caught.value.code == "key_revoked"


async def test_config_keys_are_listed_and_read_only() -> None:
    m, _ = manager(rpm=7)
    await m.create("acme", KeySettings(), admin="ops")
    views = await m.list()
    assert [(v["source"], v["tenant"]) for v in views] == [("config", "ops"), ("store", "acme")]
    config_id = views[0]["id"]
    assert views[0]["limits"]["rpm"] == 7
    assert views[0]["mask"] == "sk-...6789"
    assert (await m.show(config_id))["source"] == "config"
    assert [v["tenant"] for v in await m.list("acme")] == ["acme"]
    for change in (
        m.update(config_id, {"rpm": 1}, admin="ops"),
        m.revoke(config_id, admin="ops"),
        m.rotate(config_id, 0, admin="ops"),
    ):
        with pytest.raises(PermissionDenied):
            await change
    with pytest.raises(NotFound):
        await m.show("key_0123456789abcdef")


async def test_sync_reloads_only_when_the_version_moved() -> None:
    m, store = manager()
    assert await m.sync()
    assert store.loads == 1
    assert not await m.sync()
    assert store.loads == 1
    await store.insert_key(stored(5))  # another process
    assert await m.sync()
    assert store.loads == 2
    assert auth(m, "secret-5").key_id == stored(5).id


async def test_refresh_picks_up_another_process_change(autojump_clock: trio.abc.Clock) -> None:
    m, store = manager()
    async with trio.open_nursery() as nursery:
        await nursery.start(m.refresh)
        assert m.runtime.version == 0
        await store.insert_key(stored(9))  # written elsewhere: nothing here is told
        started = trio.current_time()
        while m.runtime.version != store.version:
            await trio.sleep(0.01)
        assert trio.current_time() - started <= 0.5 + 0.01
        nursery.cancel_scope.cancel()
    assert auth(m, "secret-9").key_id == stored(9).id
