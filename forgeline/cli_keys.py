"""``forgeline keys``: create, list and revoke gateway API keys.

Keys live hashed in the control database (`registry.keys.KeyStore`); ``create`` prints
the secret once. Self-contained (no import of ``forgeline.cli``) so ``cli`` can register
it with one ``add_typer`` line.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import typer
from rich.table import Table

from forgeline.cli_shared import console, handles_errors
from registry.errors import ErrorCode, ForgelineError

keys_app = typer.Typer(no_args_is_help=True, help="Gateway API keys: create (shown once), list, revoke.")


_DURATION = re.compile(r"^(\d+)([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_expiry(value: str, *, now: datetime | None = None) -> datetime:
    """``30d``, ``12h``, ``2w`` (from now) or an ISO 8601 date/time (UTC when no zone is given)."""
    now = now or datetime.now(UTC)
    match = _DURATION.match(value.strip())
    if match:
        return now + timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
    try:
        when = datetime.fromisoformat(value.strip())
    except ValueError:
        raise ForgelineError(
            f"--expires: cannot read {value!r}; fix: give a duration like 30d, 12h, 2w or a date like 2026-12-31",
            code=ErrorCode.INVALID_REQUEST,
            param="expires",
        ) from None
    when = when if when.tzinfo else when.replace(tzinfo=UTC)
    if when <= now:
        raise ForgelineError(
            f"--expires: {when.isoformat()} is in the past; fix: give a future date",
            code=ErrorCode.INVALID_REQUEST,
            param="expires",
        )
    return when


def _store() -> Any:
    from registry.keys import KeyStore

    return KeyStore()


@keys_app.command("create")
@handles_errors
def create(
    name_arg: Annotated[str | None, typer.Argument(metavar="NAME", help="Who or what the key is for (or --name).")] = None,
    name: Annotated[str | None, typer.Option("--name", help="Who or what the key is for, e.g. support-bot.")] = None,
    models: Annotated[str, typer.Option("--models", help="Glob of model names it may call, e.g. 'support-*' ('*': all).")] = "*",
    rpm: Annotated[int | None, typer.Option("--rpm", help="Requests per minute (default: unlimited).")] = None,
    tpm: Annotated[int | None, typer.Option("--tpm", help="Prompt + completion tokens per minute (default: unlimited).")] = None,
    expires: Annotated[str | None, typer.Option("--expires", help="30d, 12h, 2w or an ISO date (default: never).")] = None,
    role: Annotated[list[str] | None, typer.Option("--role", help="Role (repeatable): user, trainer, approver, admin.")] = None,
    org: Annotated[str, typer.Option("--org", help="Organisation the key bills to.")] = "default",
    as_json: Annotated[bool, typer.Option("--json", help="Print the key and its record as JSON.")] = False,
) -> None:
    """Create a key and print its secret once (it is stored hashed and cannot be shown again)."""
    if (name_arg is None) == (name is None):
        raise ForgelineError(
            "name the key once: `forgeline keys create NAME` or `--name NAME`", code=ErrorCode.INVALID_REQUEST, param="name"
        )
    name = name or name_arg
    assert name is not None
    expires_at = parse_expiry(expires) if expires else None
    secret, record = _store().create(
        name, roles=tuple(role or ("user",)), org=org, models=models, rpm=rpm, tpm=tpm, expires_at=expires_at
    )
    if as_json:
        typer.echo(json.dumps({"key": secret, **record.to_dict()}))
        return
    console.print(
        f"created key [bold]{record.id}[/] ({record.name}) of org '{record.org}' for models '{record.models}'",
        highlight=False,
    )
    console.print("the secret is shown only now; store it safely:")
    typer.echo(secret)


@keys_app.command("list")
@handles_errors
def list_keys(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Every key (never the secrets), with its org, roles, pattern and status."""
    records = _store().list()
    if as_json:
        typer.echo(json.dumps([r.to_dict() for r in records]))
        return
    table = Table("id", "name", "prefix", "org", "roles", "models", "rpm", "tpm", "expires", "status")
    for r in records:
        status = "revoked" if r.revoked_at else ("expired" if not r.active() else "active")
        table.add_row(
            r.id, r.name, r.prefix + "…", r.org, ",".join(r.roles), r.models,
            str(r.rpm or "-"), str(r.tpm or "-"), r.expires_at.isoformat() if r.expires_at else "never", status,
        )
    console.print(table)


@keys_app.command("revoke")
@handles_errors
def revoke(key_id: Annotated[str, typer.Argument(help="The key's id (from `forgeline keys list`).")]) -> None:
    """Revoke a key; gateways refuse it within their key cache time (default 2 s)."""
    record = _store().revoke(key_id)
    console.print(f"revoked {record.id} ({record.name}) at {record.revoked_at.isoformat() if record.revoked_at else '?'}")
