"""Base models an operator offers for fine-tuning, kept in the control database (``base_models``).

A customer names a *public* base model (``client.fine_tuning.jobs.create(model="qwen2.5-7b-instruct")``);
the operator maps that name to a local folder or hub id, a chat template and training defaults
with ``forgeline models add-base``. Defaults are validated against the recipe's ``adapter`` and
``train`` sections when added, so a broken default is refused at once, not when a job starts.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from sqlalchemy import JSON, Column, String, Table, Text, delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from registry.db import READ_ONLY, ControlStore, UTCDateTime, metadata, now
from registry.errors import ConflictError, ErrorCode, ForgelineError, NotFoundError
from training.config import AdapterSpec, ModelSpec, TrainSpec

logger = logging.getLogger(__name__)

# No `:` or `@`: the gateway reads `name:adapter` and `name@alias`.
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
# A Hugging Face hub id: `owner/name` (letters, digits, `.`, `_`, `-`).
HUB_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")

base_models = Table(
    "base_models",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("source", Text, nullable=False),
    Column("chat_template", Text, nullable=True),
    Column("description", Text, nullable=False, default=""),
    Column("adapter", JSON, nullable=False),
    Column("train", JSON, nullable=False),
    Column("added_by", String(256), nullable=False),
    Column("added_at", UTCDateTime(), nullable=False),
)


@dataclass(frozen=True)
class BaseModelRecord:
    """One base model offered for fine-tuning.

    Attributes:
        name: public name customers use, e.g. ``qwen2.5-7b-instruct``.
        source: absolute local folder or hub id (``Qwen/Qwen2.5-7B-Instruct``).
        chat_template: Jinja template text, or ``None`` for the tokenizer's own.
        description: free text shown in listings.
        adapter: defaults for the recipe's ``adapter`` section (only the keys the operator set).
        train: defaults for the recipe's ``train`` section (only the keys the operator set).
        added_by: who added it.
        added_at: when (timezone-aware UTC).
    """

    name: str
    source: str
    chat_template: str | None
    description: str
    adapter: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    added_by: str = ""
    added_at: datetime = field(default_factory=now)

    def model_spec(self) -> ModelSpec:
        """The recipe's ``model`` section for this base."""
        return ModelSpec(base=self.source, chat_template=self.chat_template)

    def to_openai(self) -> dict[str, Any]:
        """An OpenAI ``model`` object (``GET /v1/models`` shape)."""
        return {"id": self.name, "object": "model", "created": int(self.added_at.timestamp()), "owned_by": "forgeline"}


def _record(row: Any) -> BaseModelRecord:
    return BaseModelRecord(
        name=row.name,
        source=row.source,
        chat_template=row.chat_template,
        description=row.description or "",
        adapter=dict(row.adapter or {}),
        train=dict(row.train or {}),
        added_by=row.added_by,
        added_at=row.added_at,
    )


def _invalid(field_name: str, value: object, fix: str) -> ForgelineError:
    return ForgelineError(
        f"{field_name}: invalid value {value!r}; fix: {fix}", code=ErrorCode.INVALID_REQUEST, param=field_name
    )


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise _invalid(
            "name",
            name,
            "use 1-64 lowercase letters, digits, `.`, `_` or `-`, starting with a letter or digit "
            "(no `:` or `@`: the gateway uses them for adapters and aliases), e.g. `qwen2.5-7b-instruct`",
        )
    return name


def _looks_like_path(source: str) -> bool:
    return source.startswith(("/", ".", "~")) or Path(source).expanduser().exists()


def _check_source(source: str) -> str:
    if not isinstance(source, str) or not source.strip():
        raise _invalid("source", source, "give a local model folder or a hub id such as `Qwen/Qwen2.5-7B-Instruct`")
    source = source.strip()
    if _looks_like_path(source):
        folder = Path(source).expanduser().resolve()
        if not folder.is_dir():
            raise _invalid(
                "source", source, f"{folder} is not a folder; point at a model folder containing config.json"
            )
        if not (folder / "config.json").is_file():
            raise _invalid("source", source, f"{folder} has no config.json; point at a Hugging Face checkpoint folder")
        return str(folder)
    if not HUB_ID_PATTERN.fullmatch(source):
        raise _invalid(
            "source",
            source,
            "give a hub id as `owner/name` (e.g. `Qwen/Qwen2.5-7B-Instruct`) or an existing local folder "
            "(start relative paths with `./`)",
        )
    return source


def _check_chat_template(template: str | None) -> str | None:
    if template is None:
        return None
    if not isinstance(template, str) or not template.strip():
        raise _invalid(
            "chat_template", template, "give the Jinja template text, or leave it unset for the tokenizer's own"
        )
    import jinja2  # lazily: only needed when a template is given
    from jinja2.ext import Extension

    class _GenerationTag(Extension):
        # transformers' templates may mark assistant spans with {% generation %}…{% endgeneration %}
        # (its AssistantTracker); accept that tag here, we only check syntax.
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    # The extensions transformers compiles chat templates with (loop controls: {% break %}).
    env = jinja2.Environment(extensions=[_GenerationTag, "jinja2.ext.loopcontrols"])
    try:
        env.parse(template)
    except jinja2.TemplateSyntaxError as exc:
        raise _invalid(
            "chat_template",
            f"{template[:40]}…" if len(template) > 40 else template,
            f"fix the Jinja syntax error on line {exc.lineno}: {exc.message}",
        ) from None
    return template


def _section_problems(section: str, spec: type[BaseModel], values: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Validate ``values`` as defaults for a recipe section: (normalised values, problems as `field: …` lines)."""
    try:
        parsed = spec(**values)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            where = f"{section}." + ".".join(str(part) for part in error["loc"])
            if error["type"] == "extra_forbidden":
                problems.append(f"{where}: unknown field; fix: use one of {', '.join(spec.model_fields)}")
            else:
                info = spec.model_fields.get(str(error["loc"][0])) if error["loc"] else None
                about = f" — {info.description.rstrip('.')}" if info is not None and info.description else ""
                problems.append(
                    f"{where}: invalid value {error.get('input')!r} ({error['msg']}); fix: set a valid {where}{about}"
                )
        return {}, problems
    # Keep only what the operator set, coerced to the field types ("8" → 8), so later
    # changes to the recipe's own defaults still reach this base.
    return parsed.model_dump(mode="json", include=set(values)), []


def _check_defaults(
    adapter: dict[str, Any] | None, train: dict[str, Any] | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Validate the adapter and train defaults together, reporting every problem in one error."""
    out: dict[str, dict[str, Any]] = {}
    problems: list[str] = []
    for section, spec, values in (("adapter", AdapterSpec, adapter), ("train", TrainSpec, train)):
        if values is None:
            out[section] = {}
        elif not isinstance(values, dict):
            raise _invalid(
                section, values, f"give a dict of {section} fields to values (CLI: --set {section}.KEY=VALUE)"
            )
        else:
            out[section], found = _section_problems(section, spec, values)
            problems += found
    if problems:
        raise ForgelineError("; ".join(problems), code=ErrorCode.INVALID_REQUEST, param=problems[0].split(":", 1)[0])
    return out["adapter"], out["train"]


class BaseModelStore(ControlStore):
    """Add, look up, list and remove base models in the control database.

    Args:
        url: SQLAlchemy URL; defaults to ``registry.settings.control_db_url()``. The
            ``base_models`` table is created on first use.
    """

    def add(
        self,
        name: str,
        source: str,
        *,
        actor: str,
        chat_template: str | None = None,
        description: str = "",
        adapter: dict[str, Any] | None = None,
        train: dict[str, Any] | None = None,
        replace: bool = False,
    ) -> BaseModelRecord:
        """Offer a base model for fine-tuning under a public name.

        Args:
            name: public name, e.g. ``qwen2.5-7b-instruct`` (no ``:`` or ``@``).
            source: a local folder with ``config.json`` (stored absolute) or a hub id ``owner/name``.
            actor: who adds it (kept in ``added_by``).
            chat_template: Jinja template text, or ``None`` for the tokenizer's own.
            description: free text shown in listings.
            adapter: defaults for the recipe's ``adapter`` section, e.g. ``{"kind": "lora", "r": 16}``.
            train: defaults for the recipe's ``train`` section, e.g. ``{"max_length": 2048}``.
            replace: overwrite an existing base model of that name.

        Raises:
            ForgelineError: (``invalid_request``) an argument is invalid; the message names it.
            ConflictError: ``name`` exists and ``replace`` is false.
        """
        name = _check_name(name)
        if not actor or not actor.strip():
            raise _invalid("actor", actor, "name who adds the base model")
        adapter_defaults, train_defaults = _check_defaults(adapter, train)
        record = BaseModelRecord(
            name=name,
            source=_check_source(source),
            chat_template=_check_chat_template(chat_template),
            description=(description or "").strip(),
            adapter=adapter_defaults,
            train=train_defaults,
            added_by=actor.strip(),
            added_at=now(),
        )
        values = {
            "name": record.name,
            "source": record.source,
            "chat_template": record.chat_template,
            "description": record.description,
            "adapter": record.adapter,
            "train": record.train,
            "added_by": record.added_by,
            "added_at": record.added_at,
        }
        try:
            with self.engine.begin() as conn:
                exists = conn.execute(select(base_models.c.name).where(base_models.c.name == name)).first() is not None
                if exists and not replace:
                    raise self._conflict(name)
                if exists:
                    conn.execute(update(base_models).where(base_models.c.name == name).values(**values))
                else:
                    conn.execute(insert(base_models).values(**values))
        except IntegrityError:
            # PostgreSQL: another writer inserted the same name between our check and insert.
            raise self._conflict(name) from None
        logger.info(
            "%s base model %s → %s (by %s)", "replaced" if exists else "added", name, record.source, record.added_by
        )
        return record

    @staticmethod
    def _conflict(name: str) -> ConflictError:
        return ConflictError(
            f"base model {name!r} already exists; fix: pass --replace (replace=True) to overwrite it, "
            "or choose another name",
            param="name",
        )

    def get(self, name: str) -> BaseModelRecord:
        """One base model by its public name.

        Raises:
            NotFoundError: (param ``model``) no base model has that name; the message lists the known ones.
        """
        with self.engine.connect().execution_options(**{READ_ONLY: True}) as conn:
            row = conn.execute(select(base_models).where(base_models.c.name == name)).one_or_none()
            if row is None:
                known = [r.name for r in conn.execute(select(base_models.c.name).order_by(base_models.c.name))]
        if row is None:
            offered = ", ".join(known) if known else "none yet"
            raise NotFoundError(
                f"no base model {name!r} (known base models: {offered}); "
                f"fix: use one of them, or ask an operator to run `forgeline models add-base {name} SOURCE`",
                param="model",
            )
        return _record(row)

    def list(self) -> list[BaseModelRecord]:
        """Every base model, by name."""
        with self.engine.connect().execution_options(**{READ_ONLY: True}) as conn:
            rows = conn.execute(select(base_models).order_by(base_models.c.name)).all()
        return [_record(row) for row in rows]

    def remove(self, name: str) -> BaseModelRecord:
        """Stop offering a base model; returns what was removed.

        Raises:
            NotFoundError: no base model has that name.
        """
        record = self.get(name)
        with self.engine.begin() as conn:
            deleted = conn.execute(delete(base_models).where(base_models.c.name == name)).rowcount
        if not deleted:  # removed by someone else between get and delete
            raise NotFoundError(f"no base model {name!r}; fix: see `forgeline models bases`", param="model")
        logger.info("removed base model %s", name)
        return record
