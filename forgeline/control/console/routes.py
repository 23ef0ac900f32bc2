"""The console's pages and form actions (``/console``), on the control plane's own objects.

Pages are GETs that never change anything; every change is a POST carrying the session's CSRF
token, and goes through a confirmation page that says what will change before it is made.
Decisions call the same registry functions as the JSON API (``decide``, ``promote``,
``rollback``), so roles, self-approval, gates and the audit log behave the same in both.
"""

from __future__ import annotations

import logging
from datetime import datetime
from pathlib import Path
from typing import Any, cast
from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from forgeline.control.console import views
from forgeline.control.console.charts import bar_chart, line_chart
from forgeline.control.console.session import COOKIE, Session, Sessions
from forgeline.finetune.service import FineTuning
from registry.authz import Kind, Operation
from registry.client import Registry
from registry.decisions import decide
from registry.errors import ErrorCode, ForgelineError, PermissionDeniedError
from registry.keys import KeyStore
from registry.policy import PolicyBook, check_alias
from registry.promotion import previous_holder, promote, rollback
from registry.refs import VersionNumber

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/console", include_in_schema=False)
templates = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))
templates.env.globals.update(bar_chart=bar_chart, line_chart=line_chart)
templates.env.filters["when"] = lambda value: value.strftime("%Y-%m-%d %H:%M:%S UTC") if value else "—"
templates.env.filters["ms_when"] = lambda ms: datetime.utcfromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M UTC")
templates.env.filters["num"] = lambda v: "—" if v is None else f"{v:.4g}"


class LoginRequired(Exception):
    """Raised by pages without a valid session: the app answers with a redirect to the login page."""


def sessions_of(request: Request) -> Sessions:
    app = request.app
    if not hasattr(app.state, "console_sessions"):
        app.state.console_sessions = Sessions(cast(KeyStore, app.state.keys))
    return cast(Sessions, app.state.console_sessions)


def _registry(request: Request) -> Registry:
    return cast(Registry, request.app.state.registry)


def _policies(request: Request) -> PolicyBook:
    return cast(PolicyBook, request.app.state.policies)


def _session(request: Request) -> Session:
    session = sessions_of(request).read(request.cookies.get(COOKIE))
    if session is None:
        raise LoginRequired()
    return session


async def _form_session(request: Request) -> tuple[Session, dict[str, str]]:
    """The session of a form POST whose CSRF token matches; the form's fields."""
    session = _session(request)
    form = {k: v for k, v in (await request.form()).items() if isinstance(v, str)}
    if not sessions_of(request).csrf_ok(session, form.get("csrf")):
        raise PermissionDeniedError("this form has no valid CSRF token: reload the page and submit it again", param="csrf")
    return session, form


def _page(request: Request, template: str, session: Session | None, status_code: int = 200, **context: Any) -> HTMLResponse:
    return templates.TemplateResponse(
        request, template, {"session": session, "key": session.key if session else None, **context}, status_code=status_code
    )


def _error(request: Request, session: Session | None, exc: ForgelineError) -> HTMLResponse:
    return _page(request, "error.html", session, status_code=exc.http_status, message=str(exc), code=exc.code)


def _back(url: str, notice: str) -> RedirectResponse:
    return RedirectResponse(f"{url}?notice={quote(notice)}", status_code=303)


async def on_login_required(request: Request, exc: Exception) -> Response:
    if request.method == "GET":
        return RedirectResponse(f"/console/login?next={quote(request.url.path)}", status_code=303)
    return _page(request, "login.html", None, status_code=401, problem="Your session has ended: log in again.")


# ------------------------------------------------------------------- session


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request, next: str = "/console") -> HTMLResponse:
    return _page(request, "login.html", None, next=next)


@router.post("/login")
async def login(request: Request) -> Response:
    form = await request.form()
    secret, target = str(form.get("api_key") or "").strip(), str(form.get("next") or "/console")
    if not target.startswith("/console"):  # never an open redirect
        target = "/console"
    try:
        key = cast(KeyStore, request.app.state.keys).verify(secret)
    except ForgelineError:
        return _page(request, "login.html", None, status_code=401, next=target, problem="That API key is not valid here.")
    sessions = sessions_of(request)
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(
        COOKIE,
        sessions.issue(key),
        max_age=sessions.ttl_s,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/console",
    )
    logger.info("console login: %s (%s, org %s)", key.name, ",".join(key.roles), key.org)
    return response


@router.post("/logout")
async def logout(request: Request) -> Response:
    session, _ = await _form_session(request)
    sessions_of(request).end(session)
    response = RedirectResponse("/console/login", status_code=303)
    response.delete_cookie(COOKIE, path="/console")
    return response


# --------------------------------------------------------------------- pages


@router.get("", response_class=HTMLResponse)
def home(request: Request, notice: str | None = None) -> HTMLResponse:
    session = _session(request)
    models = views.visible_models(_registry(request), _policies(request), session.key)
    return _page(request, "home.html", session, models=models, inbox=views.inbox(models, session.key), notice=notice)


@router.get("/models/{name}", response_class=HTMLResponse)
def model_page(request: Request, name: str, notice: str | None = None) -> HTMLResponse:
    session = _session(request)
    try:
        state = views.load_model(_registry(request), _policies(request), session.key, name)
    except ForgelineError as exc:
        return _error(request, session, exc)
    return _page(request, "model.html", session, m=state, notice=notice, can_roll_back=views.can_roll_back(session.key, name))


@router.get("/models/{name}/versions/{version}", response_class=HTMLResponse)
def version_page(request: Request, name: str, version: VersionNumber, notice: str | None = None) -> HTMLResponse:
    session = _session(request)
    registry = _registry(request)
    try:
        state = views.load_model(registry, _policies(request), session.key, name)
        info = state.version(version)
    except ForgelineError as exc:
        return _error(request, session, exc)
    production = state.holder("production")
    return _page(
        request,
        "version.html",
        session,
        m=state,
        v=info,
        notice=notice,
        state=state.state(info),
        rows=views.metric_rows(info, production),
        production=production,
        report=views.eval_report(info),
        lineage=views.lineage_chain(registry, state, info),
        curves=views.training_curves(registry, info),
        gates={alias: state.gates(info, alias) for alias in state.target_aliases()},
        decisions=state.decisions_on(version),
        can_decide=views.can_decide(session.key, state.policy, info),
        can_promote=views.can_promote(session.key, name),
    )


@router.get("/models/{name}/history", response_class=HTMLResponse)
def history_page(request: Request, name: str) -> HTMLResponse:
    session = _session(request)
    registry = _registry(request)
    try:
        state = views.load_model(registry, _policies(request), session.key, name)
    except ForgelineError as exc:
        return _error(request, session, exc)
    timelines: dict[str, list[Any]] = {}
    for entry in registry.alias_history(name, owner=state.owner):
        timelines.setdefault(entry.alias, []).append(entry)
    return _page(request, "history.html", session, m=state, timelines=timelines)


def _parse_day(raw: str | None, field: str, problems: list[str]) -> datetime | None:
    if not raw:
        return None
    try:
        return datetime.fromisoformat(raw)
    except ValueError:
        problems.append(f"{field}: {raw!r} is not a date; use YYYY-MM-DD")
        return None


@router.get("/audit", response_class=HTMLResponse)
def audit_page(
    request: Request, model: str | None = None, actor: str | None = None, since: str | None = None, until: str | None = None
) -> HTMLResponse:
    session = _session(request)
    models = views.visible_models(_registry(request), _policies(request), session.key)
    query = views.AuditQuery(model=model or None, actor=actor or None)
    query.since = _parse_day(since, "since", query.problems)
    query.until = _parse_day(until, "until", query.problems)
    if query.until and len(until or "") == 10:
        query.until = query.until.replace(hour=23, minute=59, second=59)
    entries = views.search_audit(_registry(request), models, query)
    raw = {"model": model or "", "actor": actor or "", "since": since or "", "until": until or ""}
    return _page(request, "audit.html", session, models=models, entries=entries, query=query, raw=raw)


# ------------------------------------------------------------------ decisions


def _decision_summary(state: views.ModelState, version: VersionNumber, form: dict[str, str]) -> tuple[str, str, dict[str, str]]:
    """(title, what will change, fields to carry) for the confirmation page."""
    action = form.get("action", "")
    info = state.version(version)
    if action in ("approve", "reject"):
        comment = form.get("comment", "").strip()
        return (
            f"{action.capitalize()} {info.ref}",
            f"Your decision '{action}' on {info.ref} is recorded with your comment and counts in its gates.",
            {"decision": action, "comment": comment},
        )
    if action == "promote":
        alias = check_alias(form.get("alias") or state.policy.to)
        holder = state.aliases.get(alias)
        result = state.gates(info, alias)
        verdict = "every gate passes" if result.passed else f"the gates refuse it now: {result.reason()}"
        now = f"version {holder}" if holder else "unset"
        return (
            f"Promote {info.ref} to @{alias}",
            f"{state.name}@{alias} moves from {now} to version {version}; {verdict}.",
            {"alias": alias, "reason": form.get("reason", "").strip()},
        )
    raise ForgelineError(f"action: unknown action {action!r}; use approve, reject or promote", code=ErrorCode.INVALID_REQUEST, param="action")


@router.post("/models/{name}/versions/{version}/confirm", response_class=HTMLResponse)
async def confirm_version_action(request: Request, name: str, version: VersionNumber) -> HTMLResponse:
    session, form = await _form_session(request)
    try:
        operation = Operation.DECIDE if form.get("action") in ("approve", "reject") else Operation.PROMOTE
        views.require(session.key, operation, Kind.VERSION, name)
        state = views.load_model(_registry(request), _policies(request), session.key, name)
        title, change, fields = _decision_summary(state, version, form)
    except ForgelineError as exc:
        return _error(request, session, exc)
    target = "decide" if form.get("action") in ("approve", "reject") else "promote"
    action_url = f"/console/models/{quote(name)}/versions/{version}/{target}"
    back = f"/console/models/{quote(name)}/versions/{version}"
    return _page(request, "confirm.html", session, title=title, change=change, fields=fields, action_url=action_url, back=back)


@router.post("/models/{name}/versions/{version}/decide")
async def decide_version(request: Request, name: str, version: VersionNumber) -> Response:
    session, form = await _form_session(request)
    registry = _registry(request)
    try:
        views.require(session.key, Operation.DECIDE, Kind.VERSION, name)
        views.load_model(registry, _policies(request), session.key, name)
        decision = form.get("decision", "")
        if decision not in ("approve", "reject"):
            raise ForgelineError(f"decision: {decision!r} is not approve or reject", code=ErrorCode.INVALID_REQUEST, param="decision")
        decide(
            registry,
            name,
            version,
            actor=session.key.name,
            roles=session.key.roles,
            decision=decision,  # type: ignore[arg-type]
            comment=form.get("comment", ""),
        )
    except ForgelineError as exc:
        return _error(request, session, exc)
    return _back(f"/console/models/{quote(name)}/versions/{version}", f"recorded: {decision} by {session.key.name}")


@router.post("/models/{name}/versions/{version}/promote")
async def promote_version(request: Request, name: str, version: VersionNumber) -> Response:
    session, form = await _form_session(request)
    registry = _registry(request)
    try:
        views.require(session.key, Operation.PROMOTE, Kind.VERSION, name)
        state = views.load_model(registry, _policies(request), session.key, name)
        alias = check_alias(form.get("alias") or state.policy.to)
        promote(registry, name, version, policy=state.policy, alias=alias, actor=session.key.name, reason=form.get("reason", ""))
    except ForgelineError as exc:
        return _error(request, session, exc)
    return _back(f"/console/models/{quote(name)}/versions/{version}", f"{name}@{alias} is now version {version}")


@router.post("/models/{name}/aliases/{alias}/confirm-rollback", response_class=HTMLResponse)
async def confirm_rollback(request: Request, name: str, alias: str) -> HTMLResponse:
    session, form = await _form_session(request)
    registry = _registry(request)
    try:
        views.require(session.key, Operation.ROLLBACK, Kind.MODEL, name)
        state = views.load_model(registry, _policies(request), session.key, name)
        alias = check_alias(alias)
        holder = state.aliases.get(alias)
        _, previous = previous_holder(registry.alias_history(name, alias, owner=state.owner))
        target = form.get("to_version") or (str(previous) if previous else "")
    except ForgelineError as exc:
        return _error(request, session, exc)
    change = f"{name}@{alias} moves back from version {holder} to version {target or '(none recorded)'}, without gates."
    return _page(
        request,
        "confirm.html",
        session,
        title=f"Roll back {name}@{alias}",
        change=change,
        fields={"to_version": target, "reason": form.get("reason", "").strip()},
        action_url=f"/console/models/{quote(name)}/aliases/{quote(alias)}/rollback",
        back=f"/console/models/{quote(name)}",
    )


@router.post("/models/{name}/aliases/{alias}/rollback")
async def rollback_alias(request: Request, name: str, alias: str) -> Response:
    session, form = await _form_session(request)
    registry = _registry(request)
    try:
        views.require(session.key, Operation.ROLLBACK, Kind.MODEL, name)
        views.load_model(registry, _policies(request), session.key, name)
        raw = form.get("to_version", "").strip()
        if raw and not (raw.isascii() and raw.isdigit()):
            raise ForgelineError(f"to_version: {raw!r} is not a version number", code=ErrorCode.INVALID_REQUEST, param="to_version")
        entry = rollback(
            registry, name, alias=check_alias(alias), to_version=int(raw) if raw else None,
            actor=session.key.name, reason=form.get("reason", ""),
        )
    except ForgelineError as exc:
        return _error(request, session, exc)
    return _back(f"/console/models/{quote(name)}", f"{name}@{alias} rolled back to version {entry.to_version}")


# ----------------------------------------------------------------------- jobs


def _fine_tuning(request: Request) -> FineTuning:
    return cast(FineTuning, request.app.state.fine_tuning)


@router.get("/jobs", response_class=HTMLResponse)
def jobs_page(request: Request, notice: str | None = None) -> HTMLResponse:
    session = _session(request)
    jobs, _ = _fine_tuning(request).list(session.key, after=None, limit=100)
    return _page(request, "jobs.html", session, jobs=jobs, notice=notice)


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(request: Request, job_id: str, notice: str | None = None) -> HTMLResponse:
    session = _session(request)
    ft = _fine_tuning(request)
    try:
        job = ft.get(job_id, session.key)
        events, _ = ft.events(job_id, session.key, after=None, limit=100)
    except ForgelineError as exc:
        return _error(request, session, exc)
    curves: dict[str, list[tuple[float, float]]] = {}
    if job.run_id:
        try:
            history = _registry(request).metric_history(job.run_id)
            curves = {k: [(float(s), v) for s, v in pts] for k, pts in history.items() if "loss" in k}
        except ForgelineError:
            curves = {}
    return _page(
        request, "job.html", session, job=job, events=events, curves=curves, notice=notice,
        can_manage=views.allowed(session.key, Operation.TRAIN, Kind.JOBS),
    )


@router.post("/jobs/{job_id}/{action}")
async def job_action(request: Request, job_id: str, action: str) -> Response:
    session, _ = await _form_session(request)
    ft = _fine_tuning(request)
    try:
        if action not in ("cancel", "pause", "resume"):
            raise ForgelineError(f"action: {action!r} is not cancel, pause or resume", code=ErrorCode.INVALID_REQUEST, param="action")
        views.require(session.key, Operation.TRAIN, Kind.JOBS)
        getattr(ft, action)(job_id, session.key)
    except ForgelineError as exc:
        return _error(request, session, exc)
    return _back(f"/console/jobs/{quote(job_id)}", f"{action} requested")
