"""``Registry``: a thin, typed facade over ``MlflowClient`` plus forgeline's audit log.

MLflow stays the source of truth for experiments, runs, model versions, tags and
aliases; this class turns its loosely typed entities into :class:`VersionInfo`, its
exceptions into the ``ForgelineError`` family (`registry.mlflow_errors`), and inherits
the audited alias moves (`registry.aliases`), so :meth:`Registry.move_alias` is the one
way an alias moves, and the run, metric and artifact verbs (`registry.runs`), so nothing
above ``registry/`` needs the raw client.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion, RegisteredModel
from mlflow.exceptions import MlflowException
from sqlalchemy.engine import make_url

from registry import lineage, settings
from registry.aliases import AuditedAliases
from registry.approvals import Approval, ApprovalStore
from registry.audit import AuditLog
from registry.authz import model_owner
from registry.errors import ConflictError, ErrorCode, ForgelineError, ModelNotFoundError, NotFoundError
from registry.events import WebhookDispatcher
from registry.mlflow_errors import error_code, is_missing, translate
from registry.owner import Owner
from registry.refs import is_version_number, version_in_range
from registry.runs import RunRecords

logger = logging.getLogger(__name__)

DEFAULT_ALIAS = "production"
"""Alias a bare model name (``"my-model"``) resolves to."""

_READY = "READY"
_FAILED = "FAILED_REGISTRATION"
# How many names to list in a "not found" message before cutting it short.
_LIST_LIMIT = 20


@dataclass(frozen=True)
class VersionInfo:
    """What callers need of an MLflow ``ModelVersion``."""

    name: str
    version: int
    run_id: str | None
    source: str
    tags: dict[str, str] = field(hash=False)
    aliases: tuple[str, ...]
    created_ms: int
    description: str = ""

    @property
    def ref(self) -> str:
        """The pinned reference ``name@<version>`` (what :meth:`Registry.resolve` accepts)."""
        return f"{self.name}@{self.version}"

    def metrics(self) -> dict[str, float]:
        """The version's evaluation results (``forgeline.eval.*`` tags)."""
        return _parse_metrics(self.tags, lineage.EVAL_PREFIX)

    def base_metrics(self) -> dict[str, float]:
        """The base model's results on the same evaluation (``forgeline.base_eval.*`` tags)."""
        return _parse_metrics(self.tags, lineage.BASE_EVAL_PREFIX)

    @classmethod
    def from_mlflow(cls, mv: ModelVersion, aliases: list[str] | tuple[str, ...] | None = None) -> VersionInfo:
        """Convert an MLflow ``ModelVersion``; ``aliases`` overrides its (sometimes unpopulated) list."""
        return cls(
            name=mv.name,
            version=int(mv.version),
            run_id=mv.run_id or None,
            source=mv.source or "",
            tags=dict(mv.tags or {}),
            aliases=tuple(sorted(aliases if aliases is not None else (mv.aliases or []))),
            created_ms=int(mv.creation_timestamp or 0),
            description=mv.description or "",
        )


def _parse_metrics(tags: dict[str, str], prefix: str) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for key, value in tags.items():
        if not key.startswith(prefix):
            continue
        try:
            metrics[key[len(prefix) :]] = float(value)
        except ValueError:
            logger.warning("ignoring non-numeric evaluation tag %s=%r", key, value)
    return metrics


def _short_list(items: list[str]) -> str:
    if not items:
        return "none"
    shown = ", ".join(items[:_LIST_LIMIT])
    return shown + (f", … ({len(items) - _LIST_LIMIT} more)" if len(items) > _LIST_LIMIT else "")


def missing_model_message(name: str) -> str:
    """What a caller asking for an unknown model ``name`` is told: only the name asked for.

    The control plane answers another organisation's model with exactly this message, so
    the two cannot be told apart; never list other models here.
    """
    return f"no registered model named {name!r}; list the models you can see with `GET /v1/models` or `forgeline models list`"


def _filter_value(value: str) -> str:
    # MLflow's search grammar takes single- or double-quoted strings; pick the one the
    # value does not contain (model names rarely contain either).
    quote = '"' if "'" in value else "'"
    return f"{quote}{value}{quote}"


def _sqlite_path(url: str) -> Path | None:
    try:
        parsed = make_url(url)
    except Exception:  # not an SQLAlchemy URL (http://, databricks, file store): not SQLite
        return None
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    return Path(parsed.database).expanduser().resolve()


def _safe_dirname(name: str) -> str:
    # Experiment names may contain '/', spaces or anything else; the folder only needs to
    # be unique enough, since MLflow nests every run under its own run id.
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "experiment"


def owning_org(versions: list[VersionInfo]) -> str:
    """The org owning a model for governance, given its versions oldest first (:func:`registry.authz.model_owner`)."""
    return model_owner(info.tags.get(lineage.ORG) for info in versions)


class Registry(AuditedAliases, RunRecords):
    """Typed access to MLflow's tracking store and model registry, with audited aliases.

    Args:
        tracking_uri: MLflow tracking URI; defaults to ``registry.settings.tracking_uri()``
            (SQLite under ``$FORGELINE_HOME`` unless ``MLFLOW_TRACKING_URI`` is set).
        registry_uri: MLflow registry URI; follows ``tracking_uri`` unless given
            (or, when neither is given, unless ``MLFLOW_REGISTRY_URI`` is set).
        audit: the audit log; defaults to ``AuditLog()`` on ``settings.control_db_url()``.
        approvals: recorded approve/reject decisions; defaults to the audit log's database.
        events: where lifecycle events go; defaults to ``WebhookDispatcher.from_settings()``
            (``FORGELINE_WEBHOOK_URLS``; nothing is sent when unset) with its outbox in
            the audit log's database.

    Attributes:
        client: the underlying ``MlflowClient``; only ``registry/`` uses it (runs, metrics
            and artifacts are the verbs of `registry.runs.RunRecords`).
        audit: the :class:`~registry.audit.AuditLog` every alias move is written to.
        approvals: the :class:`~registry.approvals.ApprovalStore`.
        events: the :class:`~registry.events.WebhookDispatcher`.
    """

    def __init__(
        self,
        tracking_uri: str | None = None,
        registry_uri: str | None = None,
        audit: AuditLog | None = None,
        approvals: ApprovalStore | None = None,
        events: WebhookDispatcher | None = None,
    ) -> None:
        self.tracking_uri = tracking_uri or settings.tracking_uri()
        if registry_uri is None:
            registry_uri = settings.registry_uri() if tracking_uri is None else tracking_uri
        self.registry_uri = registry_uri
        self.audit = audit or AuditLog()
        self.approvals = approvals or ApprovalStore(self.audit.url)
        self.events = events if events is not None else WebhookDispatcher.from_settings(self.audit.url)
        registry_db = _sqlite_path(self.registry_uri)
        if registry_db is not None and registry_db == _sqlite_path(self.audit.url):
            # move_alias writes MLflow while holding the audit DB's write lock; on one
            # SQLite file MLflow would wait for that lock and every move would time out.
            raise ForgelineError(
                f"the audit log and the MLflow registry share one SQLite file ({registry_db}); "
                "set FORGELINE_DB_URL to another database",
                code=ErrorCode.INVALID_CONFIG,
                param="FORGELINE_DB_URL",
            )
        self.client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.registry_uri)

    # ----------------------------------------------------------------- experiments

    def ensure_experiment(self, name: str) -> str:
        """Return the id of experiment ``name``, creating it if needed.

        On the embedded SQLite store the experiment's artifacts go to
        ``settings.artifact_root()/<name>``; a tracking server picks its own location.

        Raises:
            ConflictError: the experiment exists but was deleted.
        """
        existing = self.client.get_experiment_by_name(name)
        if existing is not None:
            return self._live_experiment_id(existing)
        artifact_location = None
        if self.tracking_uri.startswith("sqlite:"):
            artifact_location = f"{settings.artifact_root()}/{_safe_dirname(name)}"
        try:
            experiment_id = self.client.create_experiment(name, artifact_location=artifact_location)
        except MlflowException as exc:
            if error_code(exc) != "RESOURCE_ALREADY_EXISTS":
                raise translate(exc, f"could not create experiment {name!r}", param="experiment") from exc
            # Another process created it between our lookup and create.
            raced = self.client.get_experiment_by_name(name)
            if raced is None:
                raise translate(exc, f"could not create experiment {name!r}", param="experiment") from exc
            return self._live_experiment_id(raced)
        logger.info(
            "created experiment %s (id %s, artifacts %s)", name, experiment_id, artifact_location or "server default"
        )
        return str(experiment_id)

    @staticmethod
    def _live_experiment_id(experiment: Any) -> str:
        if experiment.lifecycle_stage == "deleted":
            raise ConflictError(
                f"experiment {experiment.name!r} was deleted; restore it with "
                f"`mlflow experiments restore --experiment-id {experiment.experiment_id}` or use another name",
                param="experiment",
            )
        return str(experiment.experiment_id)

    # ------------------------------------------------------------------- versions

    def create_version(
        self,
        name: str,
        *,
        source: str,
        run_id: str | None,
        tags: dict[str, str],
        description: str = "",
        wait_s: int = 300,
    ) -> VersionInfo:
        """Register a new version of ``name`` (creating the registered model if missing).

        Args:
            name: registered model name.
            source: artifact URI of the model (``runs:/<run_id>/<path>``, ``s3://…``, …).
            run_id: the MLflow run that produced it, if any.
            tags: lineage tags (keys from :mod:`registry.lineage`).
            description: free text shown in the MLflow UI.
            wait_s: how long to wait for the version to become ``READY``.

        Returns:
            The new version, ``READY``.
        """
        self._ensure_registered_model(name)
        try:
            mv = self.client.create_model_version(
                name=name,
                source=source,
                run_id=run_id,
                tags={key: str(value) for key, value in tags.items()},
                description=description or None,
                await_creation_for=wait_s,
            )
        except MlflowException as exc:
            raise translate(exc, f"could not register a version of {name!r} from {source}", param="source") from exc
        if mv.status != _READY:
            # create_model_version returns the entity as first stored; MLflow already
            # waited for READY (and raised on failure or timeout), so fetch it again.
            mv = self.client.get_model_version(name, str(mv.version))
            if mv.status != _READY:
                raise ForgelineError(
                    f"version {mv.version} of {name!r} is {mv.status}: {mv.status_message or 'no message'}",
                    code=ErrorCode.UNAVAILABLE if mv.status != _FAILED else ErrorCode.INTERNAL,
                )
        info = VersionInfo.from_mlflow(mv, aliases=())
        logger.info("registered %s from %s", info.ref, source)
        self.events.publish(
            "registered",
            model=name,
            version=info.version,
            actor=info.tags.get(lineage.TRAINED_BY, "unknown"),
            data={"source": source, "run_id": run_id, "tags": info.tags},
        )
        return info

    def _ensure_registered_model(self, name: str) -> None:
        try:
            self.client.get_registered_model(name)
            return
        except MlflowException as exc:
            if not is_missing(exc):
                raise translate(exc, f"could not look up model {name!r}", param="name") from exc
        try:
            self.client.create_registered_model(name)
            logger.info("created registered model %s", name)
        except MlflowException as exc:
            # Losing a creation race to another process is fine: the model exists.
            if error_code(exc) != "RESOURCE_ALREADY_EXISTS":
                raise translate(exc, f"could not create model {name!r}", param="name") from exc

    def _registered_model(self, name: str) -> RegisteredModel:
        try:
            return self.client.get_registered_model(name)
        except MlflowException as exc:
            if is_missing(exc):
                raise ModelNotFoundError(missing_model_message(name), param="model") from exc
            raise translate(exc, f"could not look up model {name!r}", param="model") from exc

    def get_version(self, name: str, version: int) -> VersionInfo:
        """Fetch one version.

        Raises:
            NotFoundError: the model or the version does not exist (the message lists
                what does).
        """
        if not version_in_range(version):  # the store's driver would raise (and leak its message)
            raise NotFoundError(self._missing_version_message(name, version), param="version")
        try:
            mv = self.client.get_model_version(name, str(version))
        except MlflowException as exc:
            if not is_missing(exc):
                raise translate(exc, f"could not fetch version {version} of {name!r}", param="version") from exc
            raise NotFoundError(self._missing_version_message(name, version), param="version") from exc
        return VersionInfo.from_mlflow(mv)

    def _missing_version_message(self, name: str, version: int) -> str:
        try:
            versions = [str(v.version) for v in self.list_versions(name)]
        except ModelNotFoundError as exc:
            return exc.message
        return f"model {name!r} has no version {version} (versions: {_short_list(versions)})"

    def resolve(self, ref: str) -> VersionInfo:
        """Resolve a model reference to a version.

        ``"name"`` means ``name@production``; ``"name@alias"`` follows an alias;
        ``"name@3"`` pins version 3; ``"name@latest"`` is the highest version (MLflow
        reserves ``latest``, so no alias can shadow it).

        Raises:
            ModelNotFoundError: nothing matches; the message names the ref and what exists.
        """
        name, sep, selector = ref.rpartition("@")
        if not sep:
            name, selector = ref, DEFAULT_ALIAS
        if not name or not selector:
            raise ModelNotFoundError(
                f"invalid model reference {ref!r}: use `name`, `name@alias` or `name@<version>`", param="model"
            )
        try:
            model = self._registered_model(name)
        except ModelNotFoundError as exc:
            raise ModelNotFoundError(f"no model {ref!r}: {exc.message}", param="model") from exc

        if is_version_number(selector):
            try:
                return self.get_version(name, int(selector))
            except NotFoundError as exc:
                raise ModelNotFoundError(f"no model {ref!r}: {exc.message}", param="model") from exc
        if selector.lower() == "latest":
            versions = self.list_versions(name)
            if not versions:
                raise ModelNotFoundError(f"no model {ref!r}: {name!r} has no versions yet", param="model")
            return versions[-1]
        aliases = {alias: int(version) for alias, version in (model.aliases or {}).items()}
        if selector not in aliases:
            known = [f"{alias}→{version}" for alias, version in sorted(aliases.items())]
            hint = f"aliases: {_short_list(known)}" if known else "no alias is set yet; promote a version first"
            raise ModelNotFoundError(f"no model {ref!r}: {name!r} has no alias {selector!r} ({hint})", param="model")
        return self.get_version(name, aliases[selector])

    def aliases(self, name: str) -> dict[str, int]:
        """Every alias of ``name`` and the version it points to, per MLflow.

        Raises:
            ModelNotFoundError: there is no registered model ``name``.
        """
        return {alias: int(version) for alias, version in sorted((self._registered_model(name).aliases or {}).items())}

    def alias_holder(self, name: str, alias: str) -> VersionInfo | None:
        """The version ``alias`` points to, or ``None`` when the alias is not set.

        Raises:
            ModelNotFoundError: there is no registered model ``name``.
        """
        version = (self._registered_model(name).aliases or {}).get(alias)
        return None if version is None else self.get_version(name, int(version))

    def set_tags(self, name: str, version: int, tags: dict[str, str]) -> None:
        """Set (overwrite) tags on one version.

        Raises:
            NotFoundError: the version does not exist.
        """
        for key, value in tags.items():
            try:
                self.client.set_model_version_tag(name, str(version), key, str(value))
            except MlflowException as exc:
                if is_missing(exc):
                    raise NotFoundError(self._missing_version_message(name, version), param="version") from exc
                raise translate(exc, f"could not tag {name}@{version} with {key!r}", param="tags") from exc

    def record_evaluation(
        self,
        name: str,
        version: int,
        metrics: dict[str, float],
        *,
        base_metrics: dict[str, float] | None = None,
        actor: str = "forgeline",
    ) -> None:
        """Store evaluation results on a version (``forgeline.eval.*`` / ``forgeline.base_eval.*`` tags).

        Args:
            name: registered model name.
            version: version number.
            metrics: the version's scores.
            base_metrics: the base model's scores on the same evaluation, for
                ``better_than_base`` gates.
            actor: who evaluated (carried by the ``evaluated`` event).

        Raises:
            ForgelineError: a metric is not a finite number (``invalid_request``).
        """
        tags: dict[str, str] = {}
        for prefix, values in ((lineage.EVAL_PREFIX, metrics), (lineage.BASE_EVAL_PREFIX, base_metrics or {})):
            for metric, value in values.items():
                number = float(value)
                if not metric or not math.isfinite(number):
                    raise ForgelineError(
                        f"metric {metric!r} must be named and finite, got {value!r}",
                        code=ErrorCode.INVALID_REQUEST,
                        param="metrics",
                    )
                # repr() round-trips a float exactly; gates compare the parsed value.
                tags[prefix + metric] = repr(number)
        self.set_tags(name, version, tags)
        logger.info("recorded evaluation of %s@%s: %s", name, version, metrics)
        self.events.publish(
            "evaluated",
            model=name,
            version=version,
            actor=actor,
            data={"metrics": dict(metrics), "base_metrics": dict(base_metrics or {})},
        )

    def list_versions(self, name: str) -> list[VersionInfo]:
        """Every version of ``name``, oldest first, with aliases filled in.

        Raises:
            ModelNotFoundError: there is no registered model ``name``.
        """
        return self._versions_of(self._registered_model(name))

    def _versions_of(self, model: RegisteredModel) -> list[VersionInfo]:
        name = model.name
        aliases_of: dict[int, list[str]] = {}
        for alias, version in (model.aliases or {}).items():
            aliases_of.setdefault(int(version), []).append(alias)
        found: list[ModelVersion] = []
        token: str | None = None
        while True:
            page = self.client.search_model_versions(f"name = {_filter_value(name)}", page_token=token)
            found.extend(page)
            token = page.token
            if not token:
                break
        # Search results may lack aliases (MLflow docs), so take them from the model.
        infos = [VersionInfo.from_mlflow(mv, aliases=aliases_of.get(int(mv.version), [])) for mv in found]
        return sorted(infos, key=lambda info: info.version)

    def version_orgs(self, name: str) -> dict[int, str | None]:
        """Each version of ``name`` -> its owning org tag (``lineage.ORG``; None when untagged).

        Raises:
            ModelNotFoundError: there is no registered model ``name``.
        """
        return {info.version: info.tags.get(lineage.ORG) or None for info in self.list_versions(name)}

    def versions_and_owner(self, name: str) -> tuple[list[VersionInfo], Owner]:
        """:meth:`list_versions` and :meth:`governance_owner` from one read of the model."""
        model = self._registered_model(name)
        versions = self._versions_of(model)
        return versions, Owner(owning_org(versions), int(model.creation_timestamp))

    def governance_owner(self, name: str) -> Owner:
        """Whose governance rows ``name`` has now: its owning org and MLflow's registration of it.

        The org is the tag of its oldest tagged version, or the operator's org for an
        untagged model (``registry.authz.owner_org``); the registration is the registered
        model's ``creation_timestamp``. Every approval and audit row is written and read for
        this owner, so a model deleted in MLflow and registered again (by another
        organisation or the same one) inherits none of the first one's decisions or history.

        Raises:
            ModelNotFoundError: there is no registered model ``name``.
        """
        return self.versions_and_owner(name)[1]

    def decisions(self, name: str, version: int | None = None, *, owner: Owner | None = None) -> list[Approval]:
        """The approvals and rejections of ``name`` (or of one version) by its owner now, oldest first.

        Args:
            owner: the owner when the caller already read it (:meth:`governance_owner`).
        """
        owner = owner or self.governance_owner(name)
        if version is None:
            return self.approvals.for_model(name, owner=owner)
        return self.approvals.for_version(name, version, owner=owner)

    def model_orgs(self) -> dict[str, str | None]:
        """Every registered model -> the org tag of its oldest tagged version (None: untagged)."""
        orgs: dict[str, str | None] = dict.fromkeys(self.list_models())
        found: list[ModelVersion] = []
        token: str | None = None
        while True:
            page = self.client.search_model_versions(page_token=token)
            found.extend(page)
            token = page.token
            if not token:
                break
        for mv in sorted(found, key=lambda mv: int(mv.version)):
            org = (mv.tags or {}).get(lineage.ORG)
            if org and orgs.get(mv.name) is None:
                orgs[mv.name] = org
        return orgs

    def list_models(self) -> list[str]:
        """Names of every registered model, sorted."""
        names: list[str] = []
        token: str | None = None
        while True:
            page = self.client.search_registered_models(page_token=token)
            names.extend(model.name for model in page)
            token = page.token
            if not token:
                break
        return sorted(names)

    def close(self) -> None:
        """Deliver queued events and release database connections."""
        self.events.close()
        self.audit.dispose()
        self.approvals.dispose()
