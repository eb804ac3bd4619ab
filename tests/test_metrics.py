"""``Registry.render``: the whole exposition, or one tenant's view of it."""

from __future__ import annotations

from runestone_proxy.metrics import Registry


def registry() -> Registry:
    reg = Registry()
    blocks = reg.counter("blocks_total", "Blocks.")
    blocks.inc((("tenant", "acme"),))
    blocks.inc((("provider", "p"), ("tenant", "globex")), 2)
    reg.counter("requests_total", "Requests.").inc((("status", "200"),), 5)
    reg.gauge(
        "queued",
        "Queued.",
        lambda: [((("tenant", "acme"),), 1.0), ((("tenant", "globex"),), 4.0), ((), 7.0)],
    )
    return reg


def test_render_everything_by_default() -> None:
    text = registry().render().decode()
    assert 'blocks_total{tenant="acme"} 1' in text
    assert 'blocks_total{provider="p",tenant="globex"} 2' in text
    assert 'queued{tenant="globex"} 4' in text


def test_a_tenant_sees_no_other_tenants_series() -> None:
    text = registry().render(tenant="acme").decode()
    assert 'blocks_total{tenant="acme"} 1' in text
    assert 'queued{tenant="acme"} 1' in text
    assert "globex" not in text
    # Series that name no tenant stay, and so do every metric's HELP and TYPE lines.
    assert 'requests_total{status="200"} 5' in text
    assert "\nqueued 7\n" in text
    assert "# TYPE blocks_total counter" in text
