"""``api_root``: the base_url as each provider's SDK documents it -> the URL the translators'
paths are appended to. A table of the forms users write, then properties over open input."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runestone_proxy.config.base_url import ROOT_SUFFIX, api_root

CASES = [
    # openai: the value is the root (OpenAI SDK); a bare origin gets /v1.
    ("openai", "https://api.openai.com/v1", "https://api.openai.com/v1"),
    ("openai", "https://api.openai.com/v1/", "https://api.openai.com/v1"),
    ("openai", "https://api.openai.com", "https://api.openai.com/v1"),
    ("openai", "http://127.0.0.1:8080/", "http://127.0.0.1:8080/v1"),
    ("openai", "https://proxy.corp/openai/v1", "https://proxy.corp/openai/v1"),
    (
        "openai",
        "https://generativelanguage.googleapis.com/v1beta/openai",
        "https://generativelanguage.googleapis.com/v1beta/openai",
    ),
    # anthropic: ANTHROPIC_BASE_URL has no /v1 (the SDK appends /v1/messages).
    ("anthropic", "https://api.anthropic.com", "https://api.anthropic.com/v1"),
    ("anthropic", "https://api.anthropic.com/", "https://api.anthropic.com/v1"),
    ("anthropic", "https://api.anthropic.com/v1", "https://api.anthropic.com/v1"),
    ("anthropic", "https://api.anthropic.com/v1//", "https://api.anthropic.com/v1"),
    ("anthropic", "http://127.0.0.1:8080", "http://127.0.0.1:8080/v1"),
    ("anthropic", "https://proxy.corp/anthropic", "https://proxy.corp/anthropic/v1"),
    ("anthropic", "https://proxy.corp/anthropic/", "https://proxy.corp/anthropic/v1"),
    ("anthropic", "https://proxy.corp/anthropic/v1", "https://proxy.corp/anthropic/v1"),
    # groq: GROQ_BASE_URL is the origin (the SDK appends /openai/v1/...); the OpenAI-SDK
    # form with /openai/v1 is what many users write.
    ("groq", "https://api.groq.com", "https://api.groq.com/openai/v1"),
    ("groq", "https://api.groq.com/", "https://api.groq.com/openai/v1"),
    ("groq", "https://api.groq.com/openai/v1", "https://api.groq.com/openai/v1"),
    ("groq", "https://api.groq.com/openai/v1/", "https://api.groq.com/openai/v1"),
    ("groq", "https://api.groq.com/openai", "https://api.groq.com/openai/v1"),
    ("groq", "https://proxy.corp/groq", "https://proxy.corp/groq/openai/v1"),
    ("groq", "http://127.0.0.1:9000/v1", "http://127.0.0.1:9000/v1"),
    # openrouter: documented as https://openrouter.ai/api/v1.
    ("openrouter", "https://openrouter.ai/api/v1", "https://openrouter.ai/api/v1"),
    ("openrouter", "https://openrouter.ai/api/v1/", "https://openrouter.ai/api/v1"),
    ("openrouter", "https://openrouter.ai/api", "https://openrouter.ai/api/v1"),
    ("openrouter", "https://openrouter.ai", "https://openrouter.ai/api/v1"),
    ("openrouter", "https://proxy.corp/openrouter", "https://proxy.corp/openrouter/api/v1"),
    # generic OpenAI-compatible servers: as written (vLLM, Perplexity at the root).
    ("generic", "http://gpu-1:8000/v1", "http://gpu-1:8000/v1"),
    ("generic", "http://gpu-1:8000/v1/", "http://gpu-1:8000/v1"),
    ("generic", "https://api.perplexity.ai", "https://api.perplexity.ai"),
    ("generic", "https://host/v1beta/openai/", "https://host/v1beta/openai"),
]


@pytest.mark.parametrize(("dialect", "written", "root"), CASES)
def test_the_forms_users_write(dialect: str, written: str, root: str) -> None:
    assert api_root(written, dialect) == root


@pytest.mark.parametrize(
    ("written", "complaint"),
    [
        ("api.anthropic.com", "http:// or https://"),
        ("ftp://api.anthropic.com", "http:// or https://"),
        ("https://", "http:// or https://"),
        ("https://api.anthropic.com/v1?beta=true", "query string"),
        ("https://api.anthropic.com/v1#x", "fragment"),
        ("https://api.anthropic.com/v1/messages", "drop '/messages'"),
        ("https://api.openai.com/v1/chat/completions/", "drop '/chat/completions'"),
    ],
)
def test_a_url_that_can_only_404_is_refused(written: str, complaint: str) -> None:
    for dialect in ROOT_SUFFIX:
        with pytest.raises(ValueError, match=complaint):
            api_root(written, dialect)


segment = st.sampled_from(["v1", "v2", "api", "openai", "anthropic", "proxy", "x-y", "v1beta"])
urls = st.builds(
    lambda scheme, host, path, slashes: f"{scheme}://{host}{path}{slashes}",
    st.sampled_from(["http", "https"]),
    st.sampled_from(["127.0.0.1:8080", "api.example.com", "[::1]:9"]),
    st.lists(segment, max_size=4).map(lambda parts: "".join("/" + p for p in parts)),
    st.sampled_from(["", "/", "//"]),
)


@settings(derandomize=True, max_examples=300)
@given(urls, st.sampled_from(sorted(ROOT_SUFFIX)))
def test_idempotent_and_never_doubled_or_dropped(url: str, dialect: str) -> None:
    root = api_root(url, dialect)
    assert api_root(root, dialect) == root  # config.toml's value and its own root agree
    assert api_root(root + "/", dialect) == root
    assert not root.endswith("/")
    written = url.rstrip("/")
    # Nothing written is dropped: the root extends what was written ...
    assert root.startswith(written)
    # ... by nothing, or by the tail of the dialect's root suffix (never twice).
    suffix = ROOT_SUFFIX[dialect]
    tails = {"", *(suffix[i:] for i, c in enumerate(suffix) if c == "/")}
    assert root[len(written) :] in tails
    # A version segment the user wrote is never followed by a second one.
    if written.rsplit("/", 1)[-1] in ("v1", "v2"):
        assert root == written
