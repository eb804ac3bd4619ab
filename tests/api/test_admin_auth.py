"""``AdminAuth``: admin keys apart from client keys, 404 while none is configured."""

from __future__ import annotations

import hashlib

import pytest

from runestone_proxy import config
from runestone_proxy.api.admin_auth import AdminAuth, admin_digests
from runestone_proxy.api.http import Request
from runestone_proxy.errors import AuthenticationFailed, NotFound


class _NoBody:
    async def receive(self) -> bytes:
        return b""


def _request(*headers: tuple[bytes, bytes]) -> Request:
    return Request("GET", "/admin/keys", "", list(headers), "1.1", _NoBody())


def _config(**admin: object) -> config.Config:
    return config.structure({"admin": admin}, "test")


def test_keys_come_from_the_file_by_env_or_digest_and_from_the_comma_list() -> None:
    sha = hashlib.sha256(b"from-digest").hexdigest()
    cfg = _config(keys=[{"key_env": "OPS_KEY", "name": "ops"}, {"key_sha256": sha.upper()}])
    env = {"OPS_KEY": "ops-secret", "RUNESTONE_ADMIN_KEY": " a1 , ,a2"}
    digests = admin_digests(cfg, env)
    assert digests == {
        hashlib.sha256(b"ops-secret").hexdigest(): "ops",
        sha: "admin",
        hashlib.sha256(b"a1").hexdigest(): "env",
        hashlib.sha256(b"a2").hexdigest(): "env",
    }


def test_without_admin_keys_the_admin_api_does_not_exist() -> None:
    auth = AdminAuth.build(_config(), {})
    assert not auth.enabled
    with pytest.raises(NotFound) as caught:
        auth.authorize(_request((b"authorization", b"Bearer anything")))
    assert caught.value.code == "unknown_url"


@pytest.mark.parametrize(
    "headers",
    [(), ((b"authorization", b"Bearer client-key"),), ((b"authorization", b"Basic a1"),)],
)
def test_anything_but_an_admin_key_is_401(headers: tuple[tuple[bytes, bytes], ...]) -> None:
    auth = AdminAuth.build(_config(), {"RUNESTONE_ADMIN_KEY": "a1"})
    with pytest.raises(AuthenticationFailed):
        auth.authorize(_request(*headers))


def test_an_admin_key_by_bearer_or_x_api_key_names_its_holder() -> None:
    cfg = _config(keys=[{"key_env": "OPS_KEY", "name": "ops"}])
    auth = AdminAuth.build(cfg, {"OPS_KEY": "k1"})
    assert auth.authorize(_request((b"authorization", b"Bearer k1"))) == "ops"
    assert auth.authorize(_request((b"x-api-key", b"k1"))) == "ops"


def test_a_reload_adds_and_drops_admin_keys() -> None:
    env = {"OPS_KEY": "k1"}
    auth = AdminAuth.build(_config(), env)
    auth.apply_config(_config(keys=[{"key_env": "OPS_KEY"}]))
    assert auth.authorize(_request((b"x-api-key", b"k1"))) == "admin"
    auth.apply_config(_config())
    with pytest.raises(NotFound):
        auth.authorize(_request((b"x-api-key", b"k1")))
