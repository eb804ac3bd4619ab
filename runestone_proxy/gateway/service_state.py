"""The request service's state: its current view of the config, swapped whole on reload.

Each table (keys, routing, providers) is replaced whole, so a request in flight keeps the
resolution, providers and keys it started with; the live objects (deployments with their
breakers, capacity, rate windows) are reconfigured in place. The aliases file is the
server's to read and watch (``server/aliases.py``): it hands the service the table it read.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Self

import attrs

from runestone_proxy.config import Config
from runestone_proxy.config.aliases import AliasError
from runestone_proxy.config.aliases import validate as validate_aliases
from runestone_proxy.gateway.auth import KeySlots, KeyStore
from runestone_proxy.gateway.budget_book import LocalBudgetBook
from runestone_proxy.gateway.budget_hold import BudgetBook
from runestone_proxy.gateway.capacity import Capacity
from runestone_proxy.gateway.deployments import Deployments
from runestone_proxy.gateway.failover import Failover
from runestone_proxy.gateway.ledger import UsageLedger
from runestone_proxy.gateway.pipeline import Providers
from runestone_proxy.gateway.queue import JobQueue
from runestone_proxy.gateway.ratelimit import RateLimiter
from runestone_proxy.gateway.responses_store import ResponseStore
from runestone_proxy.gateway.routing import RoutingTable
from runestone_proxy.gateway.shared_state import Limits, LocalLimits
from runestone_proxy.gateway.transport import Transport


@attrs.define(eq=False)
class ServiceState:
    keys: KeyStore
    routing: RoutingTable
    providers: Providers
    policy: str
    env: Mapping[str, str]
    deployments: Deployments
    failover: Failover
    default_output_tokens: int
    config: Config
    #: The aliases the aliases file gave at its last valid read (they win over config's).
    file_aliases: dict[str, str] = attrs.field(kw_only=True, factory=dict)
    capacity: Capacity = attrs.field(kw_only=True)
    ratelimiter: RateLimiter = attrs.field(kw_only=True, factory=RateLimiter)
    #: What admission calls: ``ratelimiter`` and ``capacity`` in this process, or the shared
    #: backend the server installs (``[state] backend = "redis"``).
    limits: Limits = attrs.field(
        kw_only=True,
        default=attrs.Factory(lambda s: LocalLimits(s.ratelimiter, s.capacity), takes_self=True),
    )
    #: Requests in flight per key, for keys with their own ``max_concurrent`` (this process's:
    #: not shared on Redis, see KeySlots).
    key_slots: KeySlots = attrs.field(kw_only=True, factory=KeySlots)
    #: Parks requests durably (202) when their tenant is full and they asked for async.
    store: JobQueue | None = attrs.field(kw_only=True, default=None)
    #: The Responses dialect's stored turns (``previous_response_id``, ``store``).
    responses: ResponseStore | None = attrs.field(kw_only=True, default=None)
    #: Where each request's usage record goes (the durable store; None: nowhere).
    ledger: UsageLedger | None = attrs.field(kw_only=True, default=None)
    #: Per-key and per-tenant budgets (in this process until the app gives it the ledger).
    budgets: BudgetBook = attrs.field(kw_only=True, factory=LocalBudgetBook)

    @classmethod
    def build(
        cls,
        config: Config,
        env: Mapping[str, str],
        transport: Transport,
        file_aliases: dict[str, str] | None = None,
    ) -> Self:
        """``file_aliases``: the aliases file's table, already validated against ``config``."""
        deployments = Deployments.from_config(config)
        return cls(
            KeyStore.build(config, env),
            RoutingTable.build(config, env, file_aliases),
            Providers.build(config, env, transport),
            config.routing.policy,
            env,
            deployments,
            Failover(deployments),
            config.routing.default_output_tokens,
            config,
            file_aliases=file_aliases or {},
            capacity=Capacity.from_config(config),
            budgets=LocalBudgetBook.from_config(config),
        )

    def use_aliases(self, file_aliases: dict[str, str]) -> None:
        """Install a new aliases-file table (validated against the current config)."""
        self.file_aliases = file_aliases
        self.routing = RoutingTable.build(self.config, self.env, file_aliases)

    def reload(self, config: Config, file_aliases: dict[str, str] | None = None) -> str | None:
        """Swap in a validated config, with the aliases file's table read against it (None:
        no file, or it did not validate: the table held so far stays if it still fits the new
        config). Returns why the held table was dropped, if it was."""
        self.config = config
        self.keys = KeyStore.build(config, self.env, self.keys.runtime)  # run-time keys stay
        dropped = None
        if file_aliases is not None:
            self.use_aliases(file_aliases)
        else:
            try:
                validate_aliases(
                    {**config.aliases, **self.file_aliases},
                    [p.name for p in config.providers],
                    [m.id for m in config.models],
                )
            except AliasError as exc:
                dropped = str(exc)
                self.file_aliases = {}
            self.routing = RoutingTable.build(config, self.env, self.file_aliases)
        self.providers = Providers.build(config, self.env, self.providers.pool)
        self.policy = config.routing.policy
        self.default_output_tokens = config.routing.default_output_tokens
        self.deployments.reconfigure(config)
        self.capacity.reconfigure(config)
        self.budgets.reconfigure(config)
        return dropped
