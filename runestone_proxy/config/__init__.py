"""Configuration: one ``config.toml`` becomes one frozen :class:`Config`, loaded strictly.

A leaf: nothing here imports any layer of the package (protocol, providers, gateway, api,
server), so every layer may import it. It may use the standard library, attrs and cattrs.

* :mod:`.tree`: the attrs classes, their cross-field rules; :mod:`.stores` (overflow,
  ledger, shared state) and :mod:`.admin` (the admin API) hold the tables of their own;
  :mod:`.fields`: the validators;
* :mod:`.load`: reading the file, environment overrides, the strict cattrs converter and
  its error messages (:class:`ConfigError` names each bad key);
* :mod:`.aliases`: what makes an alias table valid (also used when the aliases file changes);
* :mod:`.base_url`: a provider's ``base_url`` as its SDK documents it -> the API root.

The public names are re-exported here: ``from runestone_proxy.config import Config``,
``config.load(path, env)``.
"""

from runestone_proxy.config.admin import AdminConfig, AdminKeyConfig
from runestone_proxy.config.fields import FieldError
from runestone_proxy.config.load import (
    BASE_URL_PROVIDERS,
    DEFAULT_CONFIG_PATHS,
    ENV_ALSO_PINS,
    ENV_OVERRIDES,
    ConfigError,
    apply_env,
    find_path,
    load,
    structure,
)
from runestone_proxy.config.stores import LedgerConfig, OverflowConfig, StateConfig
from runestone_proxy.config.tree import (
    AuthConfig,
    AuthKeyConfig,
    BreakerConfig,
    Config,
    Flavor,
    LimitsConfig,
    LoggingConfig,
    ModelConfig,
    ProviderConfig,
    ProviderKind,
    RoutingConfig,
    ServerConfig,
    TenancyConfig,
    TenantConfig,
    UpstreamConfig,
)

__all__ = [
    "BASE_URL_PROVIDERS",
    "DEFAULT_CONFIG_PATHS",
    "ENV_ALSO_PINS",
    "ENV_OVERRIDES",
    "AdminConfig",
    "AdminKeyConfig",
    "AuthConfig",
    "AuthKeyConfig",
    "BreakerConfig",
    "Config",
    "ConfigError",
    "FieldError",
    "Flavor",
    "LedgerConfig",
    "LimitsConfig",
    "LoggingConfig",
    "ModelConfig",
    "OverflowConfig",
    "ProviderConfig",
    "ProviderKind",
    "RoutingConfig",
    "ServerConfig",
    "StateConfig",
    "TenancyConfig",
    "TenantConfig",
    "UpstreamConfig",
    "apply_env",
    "find_path",
    "load",
    "structure",
]
