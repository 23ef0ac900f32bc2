"""One authorization decision for the control plane and the gateway.

Both servers declare, per route, an :class:`Operation` and the :class:`Kind` of resource it
touches (:class:`Rule`, kept in one table per app); :func:`decide` turns a key, a rule and
the resource's owner into allow / forbidden / hidden, and :func:`enforce` raises the
matching error. Neither server decides anything else about who may do what.

The rules, in the order they are applied:

1. **Authentication** happens before this module: no key, a malformed, unknown, revoked or
   expired key is 401 (``registry.keys.KeyStore.verify``).
2. **Role.** Each action needs one of :data:`ROLES_FOR` (``admin`` passes every check).
   Missing role: 403. It is decided from the key alone, so it says nothing about whether
   a resource exists.
3. **Model pattern.** A key's ``models`` glob must cover the model the caller *named*:
   403, decided from the name alone (no lookup, so again nothing leaks). On the gateway,
   every registered model whose weights run for the request must be covered too: a LoRA
   adapter named as ``base:adapter`` is checked like the base, and a miss is answered like
   an unknown model (404), because it is decided after the lookup.
4. **Organisation.** A resource owned by another organisation does not exist for the key:
   404 with exactly the message a missing resource gets. Owners come from the org tag
   (``registry.lineage.ORG``) on versions, and the ``org`` column of files and jobs.

**Untagged models** (registered by the operator, e.g. ``quickstart``, or a base served with
``--base``) are decided by :func:`owner_org`, the one place for that rule: for governance
(every control-plane model route: list, versions, gates, policy, history, approve, reject,
promote, rollback) they belong to the operator's :data:`OPERATOR_ORG` (``default``); on
the gateway (:data:`Scope.SERVING`) they are shared, so every organisation's keys may call
an operator base (still subject to role and pattern).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from registry.errors import ForgelineError, PermissionDeniedError
from registry.keys import KeyRecord

OPERATOR_ORG = "default"
"""The organisation that owns every untagged model for governance."""

LOCAL_ADMIN_PREFIX = "local-admin:"
"""Actor prefix of CLI commands run against the local databases, without a key."""


class Operation(enum.StrEnum):
    """What a route does."""

    PUBLIC = "public"
    """No key needed (health, readiness, metrics, the API docs)."""
    READ = "read"
    """Read models, versions, gates, history, files, jobs: any valid key."""
    TRAIN = "train"
    """Upload or delete fine-tuning files; create, cancel, pause, resume jobs."""
    PROMOTE = "promote"
    """Move an alias through the gates."""
    DECIDE = "decide"
    """Approve or reject a version."""
    ROLLBACK = "rollback"
    """Move an alias back, ungated."""
    INFER = "infer"
    """Call a served model on the gateway (list, retrieve, chat, completions)."""
    CONSOLE = "console"
    """A page or form of the control plane's web console: authenticated by its session cookie,
    not a bearer key; the console applies :func:`decide` to every page and action with the
    session's key (``forgeline.control.console``)."""


class Kind(enum.StrEnum):
    """The resource a route touches, and so where its owner comes from."""

    NONE = "none"
    """No resource (public routes)."""
    MODELS = "models"
    """A collection of registered models, filtered to the key's org and pattern."""
    MODEL = "model"
    """A registered model named in the path (``{name}``)."""
    VERSION = "version"
    """One version (``{name}`` and ``{version}`` in the path)."""
    FILES = "files"
    """Fine-tuning files: the org's own (the store filters by org)."""
    JOBS = "jobs"
    """Fine-tuning jobs: the org's own (the store filters by org)."""
    SERVED = "served"
    """A served model named by the request (gateway): path or body ``model``."""


class Scope(enum.Enum):
    """Which server decides: it sets the untagged-model rule (:func:`owner_org`)."""

    GOVERNANCE = "governance"
    SERVING = "serving"


ROLES_FOR: dict[Operation, tuple[str, ...]] = {
    Operation.PUBLIC: (),
    Operation.READ: ("trainer", "approver", "user"),
    Operation.TRAIN: ("trainer",),
    Operation.PROMOTE: ("trainer", "approver"),
    Operation.DECIDE: ("approver",),
    Operation.ROLLBACK: ("approver",),
    Operation.INFER: ("user",),
    Operation.CONSOLE: (),
}
"""Roles that may take each action; ``admin`` may take every one."""


@dataclass(frozen=True)
class Rule:
    """A route's declared decision: what it does to which kind of resource."""

    operation: Operation
    kind: Kind

    @property
    def roles(self) -> tuple[str, ...]:
        """Roles admitted (``admin`` always is, except on public routes where no key is needed)."""
        return ROLES_FOR[self.operation]


class Outcome(enum.Enum):
    """The outcome of :func:`decide`."""

    ALLOW = "allow"
    FORBIDDEN = "forbidden"
    """403: the key lacks the role, or its pattern does not cover the named model."""
    HIDDEN = "hidden"
    """404: the resource belongs to another organisation (or the pattern misses a model
    found only by looking it up); answered exactly like a missing one."""


@dataclass(frozen=True)
class Verdict:
    outcome: Outcome
    reason: str = ""

    @property
    def allowed(self) -> bool:
        return self.outcome is Outcome.ALLOW


ALLOW = Verdict(Outcome.ALLOW)


def owner_org(tagged: str | None, scope: Scope) -> str | None:
    """The organisation owning a resource whose org tag is ``tagged``.

    The untagged-model rule lives here and only here: untagged models belong to
    :data:`OPERATOR_ORG` for governance, and to nobody (shared) when served.

    Returns:
        The owning org, or None when every organisation may see the resource.
    """
    if tagged:
        return tagged
    return OPERATOR_ORG if scope is Scope.GOVERNANCE else None


def model_owner(version_orgs: Iterable[str | None]) -> str:
    """The organisation owning a model for governance, given its versions' org tags oldest first.

    The oldest version's tag wins (a later version cannot move a model to another org);
    untagged throughout, the operator's org (:func:`owner_org`).
    """
    tagged = next((org for org in version_orgs if org), None)
    return owner_org(tagged, Scope.GOVERNANCE) or OPERATOR_ORG  # governance always names an owner


# Each operation's roles with ``admin``, as sets: one C call per check (the gateway checks
# every request's key several times).
_ADMITTED: dict[Operation, frozenset[str]] = {op: frozenset((*roles, "admin")) for op, roles in ROLES_FOR.items()}


def has_role(key: KeyRecord, operation: Operation) -> bool:
    """Whether ``key`` may take ``operation`` by its roles (``admin`` may take any)."""
    return operation is Operation.PUBLIC or not _ADMITTED[operation].isdisjoint(key.roles)


def decide(
    key: KeyRecord | None,
    rule: Rule,
    *,
    model: str | None = None,
    owner: str | None = None,
    looked_up: Iterable[str] = (),
) -> Verdict:
    """Whether ``key`` may apply ``rule`` to a resource.

    Args:
        key: the verified key; None only where auth is off (a gateway run without keys),
            which allows everything.
        rule: the route's declared action and resource kind.
        model: the model name the caller sent (its pattern check is a 403).
        owner: the resource's owning org, as :func:`owner_org` gives it (None: shared).
        looked_up: further registered models whose weights the request would run (a LoRA
            adapter's model); a pattern miss there is hidden (404).
    """
    if key is None or rule.operation is Operation.PUBLIC:
        return ALLOW
    if not has_role(key, rule.operation):
        return Verdict(
            Outcome.FORBIDDEN,
            f"API key {key.prefix}… ({key.name}) has roles {', '.join(key.roles)}; "
            f"this needs one of: {', '.join(rule.roles)} (or admin)",
        )
    if model is not None and not key.allows_model(model):
        return Verdict(
            Outcome.FORBIDDEN, f"API key {key.prefix}… ({key.name}) may only act on models matching {key.models!r}, not {model!r}"
        )
    if owner is not None and owner != key.org:
        return Verdict(Outcome.HIDDEN, "owned by another organisation")
    if looked_up and any(not key.allows_model(name) for name in looked_up):
        return Verdict(Outcome.HIDDEN, "a model it runs is outside the key's pattern")
    return ALLOW


def enforce(verdict: Verdict, *, missing: Callable[[], ForgelineError], param: str = "api_key") -> None:
    """Raise for a verdict that does not allow.

    Args:
        verdict: from :func:`decide`.
        missing: builds the error the caller would get for a resource that does not exist;
            a hidden resource gets exactly that.
        param: the wire ``param`` of a 403.

    Raises:
        PermissionDeniedError: forbidden (403).
        ForgelineError: whatever ``missing`` builds (404), for hidden resources.
    """
    if verdict.outcome is Outcome.FORBIDDEN:
        raise PermissionDeniedError(verdict.reason, param=param)
    if verdict.outcome is Outcome.HIDDEN:
        raise missing()


def local_admin(name: str) -> str:
    """The actor recorded for a CLI command run as the explicit local admin ``name``."""
    return LOCAL_ADMIN_PREFIX + name


def person(actor: str) -> str:
    """The person behind an actor (``local-admin:ana`` is ``ana``), for the no-self-approval rule."""
    return actor.removeprefix(LOCAL_ADMIN_PREFIX)


def route_keys(routes: Iterable[object]) -> list[tuple[str, str]]:
    """``(method, path)`` of every HTTP route of a web app (HEAD, which is served with GET, aside).

    Duck-typed on ``path`` and ``methods`` (what Starlette and FastAPI routes carry) so this
    module stays free of web frameworks.
    """
    keys: list[tuple[str, str]] = []
    for route in routes:
        path, methods = getattr(route, "path", None), getattr(route, "methods", None)
        if isinstance(path, str) and methods:
            keys += [(method, path) for method in sorted(methods) if method != "HEAD"]
    return keys


def undeclared(routes: Iterable[tuple[str, str]], table: dict[tuple[str, str], Rule]) -> list[tuple[str, str]]:
    """The ``(method, path)`` pairs of ``routes`` that ``table`` declares no rule for."""
    return sorted({route for route in routes if route not in table})
