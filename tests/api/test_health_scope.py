"""``tenant_view``: what a tenant's key sees of ``/health``'s components."""

from __future__ import annotations

from typing import Any

from runestone_proxy.api.health import tenant_view

ROW = {"in_flight": 1, "waiting": 0, "max_concurrent": 3, "on_limit": "wait"}
COMPONENTS: dict[str, dict[str, Any]] = {
    "capacity": {"status": "ok", "in_flight": 2, "tenants": {"acme": ROW, "globex": ROW}},
    "upstream": {"status": "ok", "open_connections": 4},
}


def test_only_the_callers_row_is_kept() -> None:
    view = tenant_view(COMPONENTS, "acme")
    assert view["capacity"] == {"status": "ok", "in_flight": 2, "tenants": {"acme": ROW}}
    assert view["upstream"] == COMPONENTS["upstream"]
    assert set(COMPONENTS["capacity"]["tenants"]) == {"acme", "globex"}  # not mutated


def test_a_tenant_without_a_row_sees_none() -> None:
    assert tenant_view(COMPONENTS, "initech")["capacity"]["tenants"] == {}
