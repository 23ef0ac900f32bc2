"""Governance commands: ``approve``, ``control serve``, ``models reconcile``.

Control-plane keys are made with ``forgeline keys create NAME --role approver``
(:mod:`forgeline.cli_keys`, shared with the gateway); a key's name is the actor.

``forgeline approve`` acts as one of:

- ``--server URL`` (or ``FORGELINE_CONTROL_URL``) with ``--api-key`` (or
  ``FORGELINE_API_KEY``): through the control plane, as the key's owner — how teams work;
- ``--api-key`` alone: against the local control database, as the key's owner and roles;
- neither: as the OS user with the ``approver`` role. Whoever can write the local
  database is trusted with it anyway; the no-self-approval rule still applies, since
  versions record the OS user who trained them.
"""

from __future__ import annotations

import getpass
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from forgeline.cli import _registry, app, console, handles_errors, models_app
from forgeline.cli_limits import BodyTimeout, GracefulShutdown, HeaderTimeout, KeepAlive, MaxConnections, server_limits
from registry.errors import ErrorCode, ForgelineError

control_app = typer.Typer(no_args_is_help=True, help="The control-plane HTTP API (approvals, promotions, history).")
app.add_typer(control_app, name="control")

ServerOpt = Annotated[
    str | None,
    typer.Option("--server", envvar="FORGELINE_CONTROL_URL", help="Control-plane URL, e.g. http://cp:8100."),
]
KeyOpt = Annotated[
    str | None,
    typer.Option("--api-key", envvar="FORGELINE_API_KEY", help="Your API key (fl-...).", show_default=False),
]


def _http_error(response: Any) -> ForgelineError:
    try:
        info = response.json()["error"]
        return ForgelineError(info["message"], code=info.get("code") or ErrorCode.INTERNAL, param=info.get("param"))
    except (ValueError, KeyError, TypeError):
        return ForgelineError(
            f"control plane answered HTTP {response.status_code}: {response.text[:200]}", code=ErrorCode.UNAVAILABLE
        )


@app.command()
@handles_errors
def approve(
    name: str,
    version: int,
    comment: Annotated[str, typer.Option("--comment", "-m", help="Why (required; kept with the decision).")],
    reject: Annotated[bool, typer.Option("--reject", help="Reject instead: blocks every promotion of the version.")] = False,
    server: ServerOpt = None,
    api_key: KeyOpt = None,
) -> None:
    """Approve (or --reject) a version; the trainer of a version cannot approve it."""
    decision: Literal["approve", "reject"] = "reject" if reject else "approve"
    if server:
        import httpx

        if not api_key:
            raise ForgelineError(
                "--server needs --api-key (or FORGELINE_API_KEY)", code=ErrorCode.UNAUTHENTICATED, param="api_key"
            )
        try:
            response = httpx.post(
                f"{server.rstrip('/')}/v1/models/{name}/versions/{version}/approvals",
                json={"decision": decision, "comment": comment},
                headers={"Authorization": f"Bearer {api_key}"},
                timeout=60,
            )
        except httpx.HTTPError as exc:
            raise ForgelineError(f"cannot reach the control plane at {server}: {exc}", code=ErrorCode.UNAVAILABLE) from exc
        if response.status_code != 201:
            raise _http_error(response)
        recorded = response.json()
        approver, role = recorded["approver"], recorded["role"]
    else:
        from registry.keys import KeyStore
        from registry.promotion import decide

        if api_key:
            store = KeyStore()
            key = store.verify(api_key)
            store.dispose()
            actor, roles = key.name, key.roles
        else:
            actor, roles = getpass.getuser(), ("approver",)
        entry = decide(_registry(), name, version, actor=actor, roles=roles, decision=decision, comment=comment)
        approver, role = entry.approver, entry.role
    verb = "[red]rejected[/]" if reject else "[green]approved[/]"
    console.print(f"{verb} {name} v{version} as {approver} ({role}): {comment}")


@control_app.command("serve")
@handles_errors
def control_serve(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8100,
    policy: Annotated[
        Path | None,
        typer.Option(help="Policy book YAML (`default:` and `models: {name: policy}`); default: one approval per promotion, none for `candidate`."),
    ] = None,
    fine_tuning: Annotated[
        Path | None,
        typer.Option(
            "--fine-tuning",
            help="YAML of the fine-tuning jobs' settings (cluster, distributed, poll_interval_s, evaluate, build, "
            "candidate_alias); default: jobs run on this machine.",
        ),
    ] = None,
    supervise: Annotated[
        bool, typer.Option(help="Submit and follow fine-tuning jobs from this process (one per control database).")
    ] = True,
    header_timeout: HeaderTimeout = None,
    body_timeout: BodyTimeout = None,
    keep_alive: KeepAlive = None,
    max_connections: MaxConnections = None,
    graceful_shutdown: GracefulShutdown = None,
) -> None:
    """Serve the control-plane API (state from MLFLOW_TRACKING_URI and FORGELINE_DB_URL)."""
    from forgeline.control import create_control_app
    from forgeline.finetune.service import load_settings
    from registry.policy import PolicyBook
    from serving.gateway.server import run_server

    book = PolicyBook.load(policy) if policy else None
    settings = load_settings(fine_tuning) if fine_tuning else None
    control = create_control_app(policies=book, fine_tuning=settings, supervise=supervise)
    console.print(f"control plane on http://{host}:{port} (docs at /docs)")
    limits = server_limits(header_timeout=header_timeout, body_timeout=body_timeout, keep_alive=keep_alive,
                           max_connections=max_connections, graceful_shutdown=graceful_shutdown)
    run_server(control, host, port, limits=limits)


@models_app.command("reconcile")
@handles_errors
def models_reconcile(
    name: str,
    reason: Annotated[str, typer.Option(help="Why (kept in the audit log).")] = "",
) -> None:
    """Write MLflow's aliases into the audit log where they drifted (moved outside forgeline)."""
    entries = _registry().reconcile(name, actor=getpass.getuser(), reason=reason)
    for entry in entries:
        console.print(f"{name}@{entry.alias}: audit log now says {entry.to_version} (was {entry.from_version})")
    if not entries:
        console.print(f"{name}: MLflow and the audit log agree")
