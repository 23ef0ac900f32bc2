"""What the parts of a model reference may be: version numbers and alias names.

Checked at every edge (HTTP path and body fields, ``name@selector`` refs) so that nothing
reaches MLflow or SQL that would fail there: ``str.isdigit`` is true for ``²`` (``int``
then raises) and for ``١`` (Arabic-Indic one, which ``int`` silently reads as 1), and a
version past SQLite's 64-bit INTEGER makes the database driver raise.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, Field

MAX_VERSION = 2**63 - 1
"""Largest version number any store can hold (SQLite and PostgreSQL ``BIGINT``)."""

_ASCII_NUMBER = re.compile(r"[0-9]+")
_ALIAS = re.compile(r"[A-Za-z0-9_-]+")
MAX_ALIAS_CHARS = 256
"""MLflow's limit on alias names."""

VersionNumber = Annotated[
    int, Field(ge=1, le=MAX_VERSION, description=f"A model version: a whole number from 1 to {MAX_VERSION}.")
]
"""A version number as an HTTP path or body field: out-of-range values are a 400, not a database error."""


def is_version_number(text: str) -> bool:
    """True when ``text`` is an ASCII decimal version number from 1 to `MAX_VERSION`."""
    return _ASCII_NUMBER.fullmatch(text) is not None and 1 <= int(text) <= MAX_VERSION


def version_in_range(version: int) -> bool:
    """True when a store can hold ``version`` (so looking it up cannot fail in the database)."""
    return 1 <= version <= MAX_VERSION


def check_alias(value: str) -> str:
    """Validate an alias name (``production``, ``canary-1``); raises ``ValueError`` otherwise."""
    if len(value) > MAX_ALIAS_CHARS or not _ALIAS.fullmatch(value) or value.isdigit():
        raise ValueError(
            f"alias {value[:80]!r} must be ASCII letters, digits, '-' or '_' (at most {MAX_ALIAS_CHARS}) and not a "
            "plain number; fix: use a name such as `production` or `canary-1`"
        )
    return value


AliasName = Annotated[
    str,
    AfterValidator(check_alias),  # the check (and its message) is ours; the schema below documents it
    Field(
        description=f"An alias name, e.g. `production`: ASCII letters, digits, `-` and `_`, at most {MAX_ALIAS_CHARS}, "
        "not a plain number.",
        json_schema_extra={"pattern": "^[A-Za-z0-9_-]+$", "maxLength": MAX_ALIAS_CHARS},
    ),
]
"""An alias as an HTTP path, query or body field: a bad one is a 400 naming the field."""
