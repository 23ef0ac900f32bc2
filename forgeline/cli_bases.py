"""Operator commands for the base models offered to fine-tuning: ``models add-base``, ``bases``, ``remove-base``.

A customer's ``client.fine_tuning.jobs.create(model="NAME", ...)`` names one of these
(:mod:`forgeline.finetune.base_models`).
"""

from __future__ import annotations

import dataclasses
import getpass
import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Column, Table

from forgeline.cli_shared import console, handles_errors
from registry.errors import ErrorCode, ForgelineError

bases_app = typer.Typer()  # `forgeline models add-base | bases | remove-base`, added to `models`

_SECTIONS = ("adapter", "train")


def _parse_sets(pairs: list[str]) -> dict[str, dict[str, Any]]:
    """``["train.max_length=2048", "adapter.r=8"]`` → ``{"train": {"max_length": 2048}, "adapter": {"r": 8}}``."""
    out: dict[str, dict[str, Any]] = {section: {} for section in _SECTIONS}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        section, dot, field = key.strip().partition(".")
        if not sep or not dot or section not in _SECTIONS or not field:
            raise ForgelineError(
                f"--set: invalid value {pair!r}; fix: write adapter.KEY=VALUE or train.KEY=VALUE, "
                "e.g. --set train.max_length=2048",
                code=ErrorCode.INVALID_REQUEST,
                param="set",
            )
        # JSON when it parses (numbers, booleans, lists), else the plain string.
        try:
            value: Any = json.loads(raw)
        except ValueError:
            value = raw
        out[section][field] = value
    return out


def _read_template(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ForgelineError(
            f"--chat-template: file {str(path)!r} not found; fix: give the path of a Jinja chat template file",
            code=ErrorCode.INVALID_REQUEST,
            param="chat_template",
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ForgelineError(
            f"--chat-template: cannot read {str(path)!r} ({exc}); fix: give a readable UTF-8 text file",
            code=ErrorCode.INVALID_REQUEST,
            param="chat_template",
        ) from None


def _kv(values: dict[str, Any]) -> str:
    return ", ".join(f"{key}={json.dumps(value)}" for key, value in values.items()) or "-"


@bases_app.command("add-base")
@handles_errors
def add_base(
    name: Annotated[str, typer.Argument(help="Public name customers fine-tune, e.g. qwen2.5-7b-instruct.")],
    source: Annotated[str, typer.Argument(help="Local model folder (with config.json) or hub id owner/name.")],
    chat_template: Annotated[
        Path | None, typer.Option("--chat-template", help="Jinja chat template file (default: the tokenizer's own).")
    ] = None,
    description: Annotated[str, typer.Option("--description", help="Shown in listings.")] = "",
    adapter: Annotated[str | None, typer.Option("--adapter", help="Default adapter kind: lora, qlora or none.")] = None,
    lora_r: Annotated[int | None, typer.Option("--lora-r", help="Default LoRA rank.")] = None,
    sets: Annotated[
        list[str] | None,
        typer.Option("--set", help="A default as train.KEY=VALUE or adapter.KEY=VALUE (repeatable; JSON values)."),
    ] = None,
    replace: Annotated[bool, typer.Option("--replace", help="Overwrite an existing base model of that name.")] = False,
) -> None:
    """Offer a base model for fine-tuning under a public name."""
    from forgeline.finetune.base_models import BaseModelStore

    defaults = _parse_sets(sets or [])
    if adapter is not None:
        defaults["adapter"]["kind"] = adapter
    if lora_r is not None:
        defaults["adapter"]["r"] = lora_r
    store = BaseModelStore()
    try:
        record = store.add(
            name,
            source,
            actor=getpass.getuser(),
            chat_template=_read_template(chat_template),
            description=description,
            adapter=defaults["adapter"],
            train=defaults["train"],
            replace=replace,
        )
    finally:
        store.dispose()
    template = (
        "tokenizer's own" if record.chat_template is None else f"{chat_template} ({len(record.chat_template)} chars)"
    )
    console.print(f"added base model [bold]{record.name}[/] → {record.source}", highlight=False, soft_wrap=True)
    console.print(f"  chat template: {template}", highlight=False, soft_wrap=True)
    console.print(f"  adapter: {_kv(record.adapter)}  train: {_kv(record.train)}", highlight=False, soft_wrap=True)


@bases_app.command("bases")
@handles_errors
def bases(
    as_json: Annotated[
        bool, typer.Option("--json", help="Print JSON (chat templates included) instead of a table.")
    ] = False,
) -> None:
    """Base models offered for fine-tuning, with their defaults."""
    from forgeline.finetune.base_models import BaseModelStore

    store = BaseModelStore()
    try:
        records = store.list()
    finally:
        store.dispose()
    if as_json:
        rows = [dataclasses.asdict(r) | {"added_at": r.added_at.isoformat()} for r in records]
        console.print_json(json.dumps(rows))
        return
    if not records:
        console.print("no base models yet; add one with `forgeline models add-base NAME SOURCE`")
        return
    # Names stay whole in narrow terminals; long paths and defaults fold instead of being cut.
    table = Table(
        Column("name", no_wrap=True),
        Column("source", overflow="fold"),
        Column("template", no_wrap=True),
        Column("defaults", overflow="fold"),
        Column("added (UTC)", overflow="fold"),
    )
    for r in records:
        defaults = f"adapter: {_kv(r.adapter)}\ntrain: {_kv(r.train)}"
        table.add_row(
            r.name,
            r.source,
            "custom" if r.chat_template else "tokenizer",
            defaults,
            f"{r.added_by} {r.added_at:%Y-%m-%d %H:%M}",
        )
    console.print(table)


@bases_app.command("remove-base")
@handles_errors
def remove_base(name: Annotated[str, typer.Argument(help="Public name of the base model.")]) -> None:
    """Stop offering a base model for new fine-tuning jobs (its files and past jobs are not touched)."""
    from forgeline.finetune.base_models import BaseModelStore

    store = BaseModelStore()
    try:
        record = store.remove(name)
    finally:
        store.dispose()
    console.print(f"removed base model [bold]{record.name}[/] ({record.source})", highlight=False, soft_wrap=True)
