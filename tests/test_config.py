"""Loading the configuration: strict, every bad key named with its file, exit status 2.

Test rules: most cases call :func:`runestone_proxy.__main__.main` in-process with
``--check-config`` (fast; stderr through ``capsys``; the environment through ``monkeypatch``);
two run the real ``python -m runestone_proxy`` to prove the exit status a shell sees.
"""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest
from helpers import cli

from runestone_proxy import config
from runestone_proxy.__main__ import main
from runestone_proxy.config import Config, ConfigError, LimitsConfig, ServerConfig

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No override from the developer's shell, and no ./config.toml to stumble on."""
    for name in [*config.ENV_OVERRIDES, "RUNESTONE_CONFIG"]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


def write(tmp_path: Path, text: str, name: str = "config.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def check(capsys: pytest.CaptureFixture[str], path: Path | None) -> tuple[int, list[str]]:
    """``--check-config`` in-process: the exit status and the stderr lines."""
    args = ["--check-config"] if path is None else ["--check-config", "--config", str(path)]
    status = main(args)
    return status, capsys.readouterr().err.splitlines()


# --- the real command line ------------------------------------------------------------------


def test_unknown_key_exits_2_naming_the_key_and_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nprot = 8080\n")
    result = cli("--check-config", "--config", str(path))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"runestone-proxy: config error in {path}: unknown key (did you mean 'port'?)"
        " @ $.server.prot"
    ]


def test_check_config_on_a_valid_file_exits_0(tmp_path: Path) -> None:
    path = write(tmp_path, '[server]\nport = 8080\n[logging]\nlevel = "debug"\n')
    result = cli("--check-config", "--config", str(path))
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == f"runestone-proxy: {path}: configuration is valid\n"


# --- strictness, in-process -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[server]\nport = 70000\n", "must be between 0 and 65535, got 70000) @ $.server.port"),
        ("[server]\nport = -1\n", "must be between 0 and 65535, got -1) @ $.server.port"),
        ('[server]\nport = "8080"\n', "expected an integer, got str '8080') @ $.server.port"),
        ("[server]\nport = 80.5\n", "expected an integer, got float 80.5) @ $.server.port"),
        ("[server]\nhost = 1\n", "expected a string, got int 1) @ $.server.host"),
        (
            '[logging]\naccess_log = "false"\n',
            "expected a boolean, got str 'false') @ $.logging.access_log",
        ),
        (
            "[limits]\nheader_timeout_s = true\n",
            "expected a number, got bool True) @ $.limits.header_timeout_s",
        ),
        ("[limits]\nmax_body_bytes = 0\n", "must be > 0, got 0) @ $.limits.max_body_bytes"),
        (
            '[logging]\nlevel = "loud"\n',
            "must be one of 'debug', 'info', 'warning', 'error') @ $.logging.level",
        ),
        ("server = 3\n", "expected ServerConfig @ $.server"),
        ("[serve]\n", "unknown key (did you mean 'server'?) @ $.serve"),
    ],
    ids=[
        "port-high",
        "port-negative",
        "port-quoted",
        "port-float",
        "host-int",
        "bool-quoted",
        "float-bool",
        "zero-limit",
        "literal",
        "table-scalar",
        "unknown-section",
    ],
)
def test_invalid_values_exit_2_naming_the_key(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, text: str, message: str
) -> None:
    path = write(tmp_path, text)
    status, lines = check(capsys, path)
    assert status == 2
    assert len(lines) == 1
    assert lines[0].startswith(f"runestone-proxy: config error in {path}: ")
    assert lines[0].endswith(message)


def test_every_bad_key_is_reported_at_once(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    text = '[server]\nport = 70000\n[limits]\nbogus = 1\n[logging]\nlevel = "loud"\n'
    path = write(tmp_path, text)
    status, lines = check(capsys, path)
    assert status == 2
    assert sorted(line.rpartition(" @ ")[2] for line in lines) == [
        "$.limits.bogus",
        "$.logging.level",
        "$.server.port",
    ]


def test_missing_certificate_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    key = write(tmp_path, "key", "server.key")
    missing = tmp_path / "missing.pem"
    path = write(tmp_path, f'[server]\ntls_cert = "{missing}"\ntls_key = "{key}"\n')
    status, lines = check(capsys, path)
    assert status == 2
    assert lines == [
        f"runestone-proxy: config error in {path}: invalid value (no such file: {missing})"
        " @ $.server.tls_cert"
    ]


def test_tls_cert_without_tls_key(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    cert = write(tmp_path, "cert", "server.pem")
    path = write(tmp_path, f'[server]\ntls_cert = "{cert}"\n')
    status, lines = check(capsys, path)
    assert status == 2
    assert lines == [
        f"runestone-proxy: config error in {path}: invalid value (tls_cert and tls_key must be"
        " set together) @ $.server.tls_key"
    ]


def test_invalid_toml_and_unreadable_files(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    broken = write(tmp_path, "[server\n")
    status, lines = check(capsys, broken)
    assert status == 2
    assert lines[0].startswith(f"runestone-proxy: config error in {broken}: not valid TOML:")
    missing = tmp_path / "nope.toml"
    status, lines = check(capsys, missing)
    assert status == 2
    assert lines == [
        f"runestone-proxy: config error in {missing}: cannot read: No such file or directory"
    ]


def test_the_shipped_config_is_valid() -> None:
    loaded = config.load(REPO / "config.toml", {})
    assert isinstance(loaded, Config)


# --- environment overrides ------------------------------------------------------------------


def test_env_overrides_beat_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nport = 8080\nhealth_port = 8081\n")
    loaded = config.load(path, {"PORT": "9000", "HEALTH_PORT": "9001"})
    assert (loaded.server.port, loaded.server.health_port) == (9000, 9001)
    assert config.load(path, {"PORT": ""}).server.port == 8080  # empty means unset


def test_a_bad_env_override_is_named_like_the_key(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    with pytest.raises(ConfigError) as caught:
        config.load(path, {"PORT": "eighty"})
    assert caught.value.source == str(path)
    assert caught.value.messages == [
        "invalid value (expected an integer, got str 'eighty') @ $.server.port"
    ]
    with pytest.raises(ConfigError, match=r"\$\.server\.health_port"):
        config.load(path, {"HEALTH_PORT": "70000"})


def test_runestone_config_names_the_file(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = write(tmp_path, "[server]\nport = 8123\n", "elsewhere.toml")
    monkeypatch.setenv("RUNESTONE_CONFIG", str(path))
    assert config.find_path(None, {"RUNESTONE_CONFIG": str(path)}) == path
    assert config.find_path("explicit.toml", {"RUNESTONE_CONFIG": str(path)}) == Path(
        "explicit.toml"
    )
    assert main(["--check-config"]) == 0
    assert capsys.readouterr().out == f"runestone-proxy: {path}: configuration is valid\n"
    write(tmp_path, "[server]\nprot = 1\n", "elsewhere.toml")
    status, lines = check(capsys, None)
    assert status == 2
    assert lines[0].startswith(f"runestone-proxy: config error in {path}: ")


def test_without_a_file_the_embedded_defaults_run(capsys: pytest.CaptureFixture[str]) -> None:
    assert config.find_path(None, {}) is None  # cwd is an empty tmp_path
    assert config.load(None, {}) == Config()
    assert main(["--check-config"]) == 0
    assert (
        capsys.readouterr().out == "runestone-proxy: <embedded defaults>: configuration is valid\n"
    )


# --- defaults -------------------------------------------------------------------------------


def test_defaults() -> None:
    cfg = Config()
    assert cfg.server == ServerConfig()
    assert (cfg.server.host, cfg.server.port, cfg.server.health_port) == ("127.0.0.1", 4003, None)
    assert (cfg.server.tls_cert, cfg.server.tls_key) == (None, None)
    assert cfg.server.shutdown_grace_s == 10.0
    assert cfg.limits == LimitsConfig()
    assert cfg.limits.max_body_bytes == 8 * 1024 * 1024
    assert cfg.limits.max_request_line_bytes == 8192
    assert cfg.limits.max_header_bytes == 32768
    assert (cfg.logging.level, cfg.logging.format, cfg.logging.access_log) == ("info", "auto", True)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        cfg.server.port = 1  # type: ignore[misc]


def test_max_concurrent_per_tenant_wins_over_the_default_tenant_only(tmp_path: Path) -> None:
    """The variable sets the per-tenant default and the ``default`` tenant's pinned value;
    another tenant's explicit ``max_concurrent`` is that tenant's own and stays."""
    path = write(
        tmp_path,
        "[tenancy]\ndefault_max_concurrent = 10\n"
        "[tenants.default]\nmax_concurrent = 10\n"
        "[tenants.acme]\nmax_concurrent = 5\n"
        "[tenants.globex]\non_limit = 'reject'\n",
    )
    loaded = config.load(path, {"MAX_CONCURRENT_PER_TENANT": "3"})
    assert loaded.tenancy.default_max_concurrent == 3
    assert loaded.tenants["default"].max_concurrent == 3
    assert loaded.tenants["acme"].max_concurrent == 5
    assert loaded.tenants["globex"].max_concurrent is None  # takes the default: 3
    assert config.load(path, {}).tenants["default"].max_concurrent == 10
    shipped = config.load(REPO / "config.toml", {"MAX_CONCURRENT_PER_TENANT": "2"})
    assert shipped.tenants["default"].max_concurrent == 2


def test_a_bad_max_concurrent_per_tenant_is_named_once(tmp_path: Path) -> None:
    path = write(tmp_path, "[tenants.default]\nmax_concurrent = 10\n")
    with pytest.raises(ConfigError) as caught:
        config.load(path, {"MAX_CONCURRENT_PER_TENANT": "lots"})
    assert caught.value.messages == [
        "invalid value (expected an integer, got str 'lots') @ $.tenancy.default_max_concurrent"
    ]


def test_base_url_from_the_file_and_the_env_follow_one_rule(tmp_path: Path) -> None:
    """The shipped file writes the API roots; the SDK forms of the variables reach the same
    roots, and the file may use the SDK forms too."""
    roots = {
        "openai": "https://api.openai.com/v1",
        "anthropic": "https://api.anthropic.com/v1",
        "groq": "https://api.groq.com/openai/v1",
        "openrouter": "https://openrouter.ai/api/v1",
    }
    sdk_forms = {
        "OPENAI_BASE_URL": "https://api.openai.com/v1",
        "ANTHROPIC_BASE_URL": "https://api.anthropic.com",
        "GROQ_BASE_URL": "https://api.groq.com",
        "OPENROUTER_BASE_URL": "https://openrouter.ai/api/v1/",
    }
    for env in ({}, sdk_forms):
        shipped = config.load(REPO / "config.toml", env)
        assert {p.name: p.api_root for p in shipped.providers if p.base_url} == roots
    path = write(
        tmp_path,
        'models = []\n[[providers]]\nname = "anthropic"\nkind = "anthropic"\n'
        'base_url = "http://127.0.0.1:8080/"\n'
        '[[providers]]\nname = "vllm"\nkind = "openai"\nbase_url = "http://gpu:8000/v1/"\n',
    )
    loaded = config.load(path, {})
    assert [p.api_root for p in loaded.providers] == [
        "http://127.0.0.1:8080/v1",
        "http://gpu:8000/v1",
    ]


def test_a_base_url_that_can_only_404_is_named(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'models = []\n[[providers]]\nname = "anthropic"\nkind = "anthropic"\n'
        'base_url = "https://api.anthropic.com"\n',
    )
    with pytest.raises(ConfigError) as caught:
        config.load(path, {"ANTHROPIC_BASE_URL": "https://api.anthropic.com/v1/messages"})
    assert caught.value.messages == [
        "invalid value (is the API's base URL, not an endpoint: drop '/messages' from "
        "https://api.anthropic.com/v1/messages) @ $.providers[0].base_url"
    ]
