"""Fixtures shared by the whole suite. Helpers that are not fixtures live in ``helpers.py``.

Test rules (as trio-websocket states its own): real sockets bind 127.0.0.1 on port 0; every
test body runs under ``trio.fail_after``; nothing sleeps to wait for something that can be
awaited; time-dependent tests take pytest-trio's ``autojump_clock`` fixture
(``MockClock(autojump_threshold=0)``) when everything runs in-process.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pg_server
import pytest
import trustme
from helpers import TLSFiles


@pytest.fixture(autouse=True)
def _private_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test runs in its own directory, so a gateway started on default settings keeps
    its SQLite store (``runestone.sqlite3``, relative) out of the checkout and away from
    other tests."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def pg() -> Iterator[pg_server.PgServer]:
    """One PostgreSQL server for the session (started on first use); each test that needs
    a database makes its own (``pg.create_database()``: unique names)."""
    if pg_server.pg_bin_dir() is None:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql; .ci/run does)")
    with pg_server.running() as server:
        yield server


@pytest.fixture(scope="session")
def tls_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_files(tls_ca: trustme.CA, tmp_path: Path) -> TLSFiles:
    issued = tls_ca.issue_cert("localhost", "127.0.0.1")
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    issued.private_key_pem.write_to_path(str(key))
    cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    return TLSFiles(tls_ca, cert, key)
