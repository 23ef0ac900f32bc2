"""Version numbers and alias names: only what every store can hold gets through."""

from __future__ import annotations

import pytest

from registry.refs import MAX_VERSION, check_alias, is_version_number, version_in_range


@pytest.mark.parametrize("text", ["1", "42", str(MAX_VERSION)])
def test_ascii_version_numbers_in_range_are_versions(text: str) -> None:
    assert is_version_number(text)


@pytest.mark.parametrize(
    "text",
    ["0", "", "²", "١", "١٢", "٣", "1²", "-1", "+1", " 1", "1_0", "1e3", str(MAX_VERSION + 1), "9" * 40],
)
def test_non_ascii_digits_zero_and_huge_numbers_are_not_versions(text: str) -> None:
    # str.isdigit() is True for "²" (int() then raises) and "١" (int() reads 1): both were bugs.
    assert not is_version_number(text)


def test_version_range_is_what_sqlite_and_postgres_hold() -> None:
    assert version_in_range(1) and version_in_range(MAX_VERSION)
    assert not version_in_range(0) and not version_in_range(MAX_VERSION + 1) and not version_in_range(-5)


@pytest.mark.parametrize("alias", ["production", "canary-1", "staging_2", "v2"])
def test_good_aliases_pass(alias: str) -> None:
    assert check_alias(alias) == alias


@pytest.mark.parametrize("alias", ["", "0", "12", "prod uction", "prød", "١", "a/b", "a" * 300, "\ud800"])
def test_bad_aliases_name_the_value_and_the_fix(alias: str) -> None:
    with pytest.raises(ValueError, match="fix: use a name such as `production`"):
        check_alias(alias)
