"""The README's "Use with the OpenAI Agents SDK" section states what the Responses translator
does: its fates table is :data:`~runestone_proxy.providers.responses_request.FIELD_FATES`, row
for row, and its status table covers
:data:`~runestone_proxy.providers.responses_response.INCOMPLETE_REASONS`."""

from __future__ import annotations

from pathlib import Path

from runestone_proxy.providers.responses_request import FIELD_FATES
from runestone_proxy.providers.responses_response import INCOMPLETE_REASONS

README = Path(__file__).resolve().parents[2] / "README.md"
SECTION = "## Use with the OpenAI Agents SDK"


def section() -> str:
    """The section's text, up to the next ``## `` heading."""
    text = README.read_text(encoding="utf-8")
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    return text[start : end if end != -1 else len(text)]


def test_readme_lists_every_fate() -> None:
    """Every FIELD_FATES row appears, verbatim, in the section's table."""
    text = section()
    for field, fate in FIELD_FATES.items():
        assert f"| `{field}` | {fate} |" in text, field


def test_readme_lists_no_stale_fate() -> None:
    """The section's fates table has no row the translator does not have."""
    rows = [
        line for line in section().splitlines() if line.startswith("| `") and line.count(" | ") == 1
    ]
    expected = {f"| `{field}` | {fate} |" for field, fate in FIELD_FATES.items()}
    assert set(rows) == expected


def test_readme_maps_every_incomplete_reason() -> None:
    text = section()
    for finish, reason in INCOMPLETE_REASONS.items():
        assert f"| `{finish}` | `incomplete`" in text, finish
        assert f'{{"reason": "{reason}"}}' in text, reason
