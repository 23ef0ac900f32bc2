"""The audited alias-move protocol: the only way forgeline moves an alias.

MLflow keeps no alias history and has no transaction forgeline can join, so every move
is a compare-and-set serialised by the audit database's writer lock and written to the
append-only audit log (see ``AuditedAliases._move``). ``audit_drift`` and ``reconcile``
find and record the moves made outside forgeline or cut short by a killed process.

``AuditedAliases`` is mixed into the facade (`registry.client.Registry`), which supplies
the MLflow client, the audit log, the event dispatcher and the version reads below.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from registry.audit import Action, AuditEntry, AuditLog
from registry.errors import ConflictError, ErrorCode, ForgelineError, NotFoundError
from registry.events import WebhookDispatcher
from registry.mlflow_errors import translate
from registry.owner import Owner

logger = logging.getLogger(__name__)

NO_HOLDER = 0
"""``expected_from`` value meaning "the alias must not be set yet" (versions start at 1)."""


class _Holder(Protocol):
    version: int


class AuditedAliases:
    """Alias moves, deletions, drift and reconciliation, each one audited.

    The facade that mixes this in provides ``client``, ``audit``, ``events`` and the
    reads annotated below (``get_version`` checks a version exists; ``governance_owner``
    names the org and registration every audit row of the model is written and read for).
    """

    client: MlflowClient
    audit: AuditLog
    events: WebhookDispatcher
    get_version: Callable[[str, int], Any]
    governance_owner: Callable[[str], Owner]
    aliases: Callable[[str], dict[str, int]]
    alias_holder: Callable[[str, str], _Holder | None]

    def alias_history(self, name: str, alias: str | None = None, *, owner: Owner | None = None) -> list[AuditEntry]:
        """Every audited move of ``name``'s aliases (or one ``alias``) by its owner now, oldest first.

        Args:
            owner: the owner when the caller already read it; default
                ``governance_owner(name)``. Rows of an earlier model of the name (deleted
                and registered again, by any org) are not shown.
        """
        return self.audit.history(name, alias, owner=owner or self.governance_owner(name))

    def move_alias(
        self,
        name: str,
        alias: str,
        version: int,
        *,
        actor: str,
        reason: str,
        policy_result: dict[str, Any] | None = None,
        action: Action = "promote",
        expected_from: int | None = None,
        guard: Callable[[int | None], None] | None = None,
    ) -> AuditEntry:
        """Point ``alias`` at ``version`` and audit it; the only way forgeline moves aliases.

        All or nothing: either MLflow's alias moved *and* the audit row is committed, or
        neither happened.

        Args:
            name: registered model name.
            alias: alias to move (e.g. ``production``).
            version: the version it should point to.
            actor: who moves it (a user or a service); required.
            reason: why, for the audit log.
            policy_result: the promotion gates' outcome, stored with the row.
            action: ``promote`` or ``rollback`` (``delete`` is :meth:`delete_alias`).
            expected_from: compare-and-set: the version the caller saw holding the alias
                (:data:`NO_HOLDER` for "not set"); ``None`` skips the check.
            guard: called with the current holder while the writer lock is held, before
                anything is written; raising aborts the move (promotion re-checks
                approvals here so a rejection recorded meanwhile still blocks it).

        Raises:
            NotFoundError: the version does not exist.
            ConflictError: the alias holder is not ``expected_from`` any more.
        """
        if action not in ("promote", "rollback"):
            raise ValueError(f"move_alias records promote or rollback, not {action!r} (see delete_alias, reconcile)")
        return self._move(
            name,
            alias,
            version,
            actor=actor,
            reason=reason,
            policy_result=policy_result,
            action=action,
            expected_from=expected_from,
            guard=guard,
        )

    def delete_alias(
        self, name: str, alias: str, *, actor: str, reason: str, expected_from: int | None = None
    ) -> AuditEntry:
        """Remove ``alias`` from ``name`` and audit it (action ``delete``).

        Raises:
            NotFoundError: the alias is not set.
            ConflictError: the alias holder is not ``expected_from`` any more.
        """
        return self._move(
            name,
            alias,
            None,
            actor=actor,
            reason=reason,
            policy_result=None,
            action="delete",
            expected_from=expected_from,
            guard=None,
        )

    def _move(
        self,
        name: str,
        alias: str,
        version: int | None,
        *,
        actor: str,
        reason: str,
        policy_result: dict[str, Any] | None,
        action: Action,
        expected_from: int | None,
        guard: Callable[[int | None], None] | None,
    ) -> AuditEntry:
        if not actor or not actor.strip():
            raise ForgelineError(
                "an alias move needs an actor (who is moving it)", code=ErrorCode.INVALID_REQUEST, param="actor"
            )
        if version is not None:
            self.get_version(name, version)  # fail fast, before taking the writer lock
        owner = self.governance_owner(name)

        # Order matters. MLflow keeps no alias history and has no transaction we can join,
        # so the audit DB transaction is the serialisation point: take its writer lock,
        # read the holder from MLflow under it, insert the row, move the alias in MLflow,
        # then commit. If the MLflow call or the commit fails, the rollback drops the row
        # and we put the alias back. Only a process killed between the MLflow call and the
        # commit can leave them apart; `audit_drift` finds that and `reconcile` records it.
        moved = False
        previous: int | None = None
        try:
            with self.audit.transaction(name, owner=owner) as tx:
                holder = self.alias_holder(name, alias)
                previous = holder.version if holder else None
                if expected_from is not None and (previous or NO_HOLDER) != expected_from:
                    seen = "unset" if expected_from == NO_HOLDER else f"version {expected_from}"
                    now = "unset" if previous is None else f"version {previous}"
                    raise ConflictError(
                        f"{name}@{alias} changed meanwhile: expected {seen}, found {now}; re-check and retry",
                        param="alias",
                    )
                if version is None and previous is None:
                    raise NotFoundError(f"{name!r} has no alias {alias!r} to delete", param="alias")
                if guard is not None:
                    guard(previous)
                entry = tx.append(
                    alias=alias,
                    from_version=previous,
                    to_version=version,
                    actor=actor,
                    reason=reason,
                    action=action,
                    policy_result=policy_result,
                )
                # From here MLflow may have moved even if the call raises (a timeout after
                # the server applied it), so a failure undoes the move either way.
                moved = True
                self._set_alias(name, alias, version)
        except BaseException:
            if moved:
                self._undo_move(name, alias, previous, version)
            raise
        logger.info("%s: %s@%s %s -> %s by %s (%s)", action, name, alias, previous, version, actor, reason)
        if action in ("promote", "rollback"):
            self.events.publish(
                "promoted" if action == "promote" else "rolled_back",
                model=name,
                version=version,
                alias=alias,
                actor=actor,
                data={"from_version": previous, "reason": reason, "audit_id": entry.id, "policy_result": policy_result},
            )
        return entry

    def _set_alias(self, name: str, alias: str, version: int | None) -> None:
        try:
            if version is None:
                self.client.delete_registered_model_alias(name, alias)
            else:
                self.client.set_registered_model_alias(name, alias, str(version))
        except MlflowException as exc:
            raise translate(exc, f"MLflow refused to move {name}@{alias}", param="alias") from exc

    def _undo_move(self, name: str, alias: str, previous: int | None, attempted: int | None) -> None:
        try:
            if self.aliases(name).get(alias) == previous:
                logger.error("alias move of %s@%s failed; MLflow still has %s", name, alias, previous)
                return
            self._set_alias(name, alias, previous)
            logger.error("alias move or audit commit failed; moved %s@%s back to %s", name, alias, previous)
        except Exception:
            logger.critical(
                "audit commit failed and %s@%s could not be moved back: MLflow says %s, the audit log says %s",
                name,
                alias,
                attempted,
                previous,
                exc_info=True,
            )

    def audit_drift(self, name: str, *, owner: Owner | None = None) -> dict[str, tuple[int | None, int | None]]:
        """Aliases where MLflow and the audit log (the current owner's rows) disagree.

        Returns:
            ``{alias: (version in MLflow, version per the last audit row)}`` for every alias
            that differs: moved outside forgeline, or a process died mid-move. Empty when
            they agree.
        """
        in_mlflow = {alias: int(version) for alias, version in (self.aliases(name)).items()}
        audited: dict[str, int | None] = {}
        for entry in self.alias_history(name, owner=owner):
            audited[entry.alias] = entry.to_version
        drift: dict[str, tuple[int | None, int | None]] = {}
        for alias in sorted(set(in_mlflow) | set(audited)):
            if in_mlflow.get(alias) != audited.get(alias):
                drift[alias] = (in_mlflow.get(alias), audited.get(alias))
        return drift

    def reconcile(self, name: str, *, actor: str, reason: str = "") -> list[AuditEntry]:
        """Record MLflow's alias state in the audit log wherever the two disagree.

        Drift happens when an alias is moved outside forgeline (MLflow UI, raw client) or
        a process is killed between the MLflow call and the audit commit. MLflow is what
        serving follows, so its state is taken as the truth and written down as one
        ``reconcile`` row per drifted alias; history and rollback work again afterwards.

        Returns:
            The rows appended (empty when nothing drifted).
        """
        if not actor or not actor.strip():
            raise ForgelineError("reconcile needs an actor", code=ErrorCode.INVALID_REQUEST, param="actor")
        entries: list[AuditEntry] = []
        owner = self.governance_owner(name)
        with self.audit.transaction(name, owner=owner) as tx:
            for alias, (in_mlflow, audited) in self.audit_drift(name, owner=owner).items():
                entries.append(
                    tx.append(
                        alias=alias,
                        from_version=audited,
                        to_version=in_mlflow,
                        actor=actor,
                        reason=reason or "recorded MLflow's alias after a move outside forgeline or an interrupted one",
                        action="reconcile",
                    )
                )
        for entry in entries:
            logger.warning("reconciled %s@%s: audit log now says %s", name, entry.alias, entry.to_version)
        return entries
