"""Field validators shared by the config tables, and the error they raise.

Each validator raises :class:`FieldError` naming the field; the loader (:mod:`.load`) turns
it into a message with the key's whole path (``$.server.port``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs


class FieldError(ValueError):
    """A validator's complaint about one field; the loader appends the field to the path."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def _port(_inst: object, attribute: attrs.Attribute[Any], value: int | None) -> None:
    if value is not None and not 0 <= value <= 65535:
        raise FieldError(attribute.name, f"must be between 0 and 65535, got {value}")


def _positive(_inst: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if value <= 0:
        raise FieldError(attribute.name, f"must be > 0, got {value}")


def _non_negative(_inst: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if value < 0:
        raise FieldError(attribute.name, f"must be >= 0, got {value}")


def _patterns(_inst: object, attribute: attrs.Attribute[Any], value: tuple[str, ...]) -> None:
    for index, pattern in enumerate(value):
        if not pattern or pattern.isspace():
            raise FieldError(attribute.name, f"entry {index} must be a non-empty pattern")


def _existing_file(_inst: object, attribute: attrs.Attribute[Any], value: str | None) -> None:
    if value is not None and not Path(value).is_file():
        raise FieldError(attribute.name, f"no such file: {value}")


def _optional_positive(_inst: object, attribute: attrs.Attribute[Any], value: float | None) -> None:
    if value is not None and value <= 0:
        raise FieldError(attribute.name, f"must be > 0, got {value}")
