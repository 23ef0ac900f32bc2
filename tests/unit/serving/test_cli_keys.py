"""``forgeline keys``: create (secret shown once), list, revoke; expiry parsing."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from typer.testing import CliRunner

from forgeline import cli_keys
from forgeline.cli import app
from forgeline.cli_keys import parse_expiry
from registry.errors import AuthenticationError, ForgelineError
from registry.keys import KeyStore


def test_create_list_revoke_round_trip(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli_keys.console, "width", 250)  # no column truncated
    runner = CliRunner()
    created = runner.invoke(app, ["keys", "create", "--name", "bot", "--models", "support-*", "--rpm", "60", "--tpm", "9000", "--expires", "30d", "--json"])
    assert created.exit_code == 0, created.output
    out = json.loads(created.output)
    assert out["key"].startswith("fl-") and out["models"] == "support-*" and (out["rpm"], out["tpm"]) == (60, 9000)
    record = KeyStore().verify(out["key"])
    assert record.allows_model("support-bot") and not record.allows_model("other")
    assert record.expires_at is not None and record.expires_at > datetime.now(UTC) + timedelta(days=29)

    positional = runner.invoke(app, ["keys", "create", "ana", "--role", "approver"])
    assert positional.exit_code == 0, positional.output
    listed = json.loads(runner.invoke(app, ["keys", "list", "--json"]).output)
    assert [k["name"] for k in listed] == ["bot", "ana"] and "key" not in listed[0]

    # The table names each key's org: a key of another org sees other models.
    runner.invoke(app, ["keys", "create", "acme-bot", "--org", "acme"])
    table = runner.invoke(app, ["keys", "list"]).output
    header = next(line for line in table.splitlines() if "┃ id" in line)
    column = [cell.strip() for cell in header.split("┃")].index("org")
    orgs = [line.split("│")[column].strip() for line in table.splitlines() if line.startswith("│")]
    assert orgs == ["default", "default", "acme"], table

    revoked = runner.invoke(app, ["keys", "revoke", out["id"]])
    assert revoked.exit_code == 0, revoked.output
    with pytest.raises(AuthenticationError, match="revoked"):
        KeyStore().verify(out["key"])


def test_bad_input_is_one_line_and_exit_2() -> None:
    runner = CliRunner()
    for args in (["keys", "create", "--name", "x", "--expires", "soon"], ["keys", "create"], ["keys", "create", "--name", "x", "--rpm", "0"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert "Traceback" not in result.output
    assert runner.invoke(app, ["keys", "revoke", "nope"]).exit_code == 1


def test_parse_expiry() -> None:
    now = datetime(2030, 1, 1, tzinfo=UTC)
    assert parse_expiry("12h", now=now) == now + timedelta(hours=12)
    assert parse_expiry("2w", now=now) == now + timedelta(weeks=2)
    assert parse_expiry("2030-06-01", now=now) == datetime(2030, 6, 1, tzinfo=UTC)
    with pytest.raises(ForgelineError, match="in the past"):
        parse_expiry("2029-01-01", now=now)
