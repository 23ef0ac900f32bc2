"""Governance commands: ``approve``, ``control serve``, ``models reconcile``.

Control-plane keys are made with ``forgeline keys create NAME --role approver``
(:mod:`forgeline.cli_keys`, shared with the gateway); a key's name is the actor.

``forgeline approve`` acts as one of (:mod:`forgeline.cli_identity`):

- ``--server URL`` (or ``FORGELINE_CONTROL_URL``) with a key (``FORGELINE_API_KEY`` or
  ``--api-key-file``): through the control plane, as the key's owner — how teams work;
- a key alone: against the local control database, as the key's owner and roles;
- neither: only as the explicit local admin ``--local-admin NAME`` (``local-admin:NAME``
  in the approvals; never the OS user). The no-self-approval rule compares NAME with the
  version's trainer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from forgeline.cli_identity import KeyFileOpt, KeyOpt, LocalAdminOpt, api_key, local_actor
from forgeline.cli_limits import BodyTimeout, GracefulShutdown, HeaderTimeout, KeepAlive, MaxConnections, server_limits
from forgeline.cli_shared import console, handles_errors, open_registry
from registry.errors import ErrorCode, ForgelineError

control_app = typer.Typer(no_args_is_help=True, help="The control-plane HTTP API (approvals, promotions, history).")
approve_app = typer.Typer()  # `forgeline approve`, added to the top level by forgeline.cli
reconcile_app = typer.Typer()  # `forgeline models reconcile`, added to `models`

ServerOpt = Annotated[
    str | None,
    typer.Option("--server", envvar="FORGELINE_CONTROL_URL", help="Control-plane URL, e.g. http://cp:8100."),
]


def _http_error(response: Any) -> ForgelineError:
    try:
        info = response.json()["error"]
        return ForgelineError(info["message"], code=info.get("code") or ErrorCode.INTERNAL, param=info.get("param"))
    except (ValueError, KeyError, TypeError):
        return ForgelineError(
            f"control plane answered HTTP {response.status_code}: {response.text[:200]}", code=ErrorCode.UNAVAILABLE
        )


@approve_app.command()
@handles_errors
def approve(
    name: str,
    version: int,
    comment: Annotated[str, typer.Option("--comment", "-m", help="Why (required; kept with the decision).")],
    reject: Annotated[bool, typer.Option("--reject", help="Reject instead: blocks every promotion of the version.")] = False,
    server: ServerOpt = None,
    key_flag: KeyOpt = None,
    key_file: KeyFileOpt = None,
    local_admin: LocalAdminOpt = None,
) -> None:
    """Approve (or --reject) a version; the trainer of a version cannot approve it.

    Acts as your key's owner (FORGELINE_API_KEY or --api-key-file; with --server, through
    the control plane), or without a key only as the explicit local admin --local-admin NAME,
    recorded as `local-admin:NAME`. The OS user is never taken as an identity.
    """
    decision: Literal["approve", "reject"] = "reject" if reject else "approve"
    secret = api_key(key_flag, key_file)
    if server:
        import httpx

        if not secret:
            raise ForgelineError(
                "--server needs your key: set FORGELINE_API_KEY or pass --api-key-file PATH",
                code=ErrorCode.UNAUTHENTICATED,
                param="api_key",
            )
        try:
            response = httpx.post(
                f"{server.rstrip('/')}/v1/models/{name}/versions/{version}/approvals",
                json={"decision": decision, "comment": comment},
                headers={"Authorization": f"Bearer {secret}"},
                timeout=60,
            )
        except httpx.HTTPError as exc:
            raise ForgelineError(f"cannot reach the control plane at {server}: {exc}", code=ErrorCode.UNAVAILABLE) from exc
        if response.status_code != 201:
            raise _http_error(response)
        recorded = response.json()
        approver, role = recorded["approver"], recorded["role"]
    else:
        from registry.decisions import decide
        from registry.keys import KeyStore

        registry = open_registry()
        if secret:
            from forgeline.control.auth import check_access
            from registry.authz import Kind, Operation, Rule

            store = KeyStore()
            try:
                key = store.verify(secret)
            finally:
                store.dispose()
            # The same org wall as the control plane: another org's model does not exist for this key.
            check_access(registry, key, Rule(Operation.DECIDE, Kind.VERSION), name, str(version))
            actor, roles = key.name, key.roles
        else:
            actor, roles = local_actor(local_admin, "approve"), ("admin",)
        entry = decide(registry, name, version, actor=actor, roles=roles, decision=decision, comment=comment)
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
    console.print(f"control plane on http://{host}:{port} (docs at /docs; approver's console at http://{host}:{port}/console)")
    limits = server_limits(header_timeout=header_timeout, body_timeout=body_timeout, keep_alive=keep_alive,
                           max_connections=max_connections, graceful_shutdown=graceful_shutdown)
    run_server(control, host, port, limits=limits)


@reconcile_app.command("reconcile")
@handles_errors
def models_reconcile(
    name: str,
    reason: Annotated[str, typer.Option(help="Why (kept in the audit log).")] = "",
    local_admin: LocalAdminOpt = None,
) -> None:
    """Write MLflow's aliases into the audit log where they drifted (moved outside forgeline).

    Acts on the local databases as the explicit local admin --local-admin NAME.
    """
    entries = open_registry().reconcile(name, actor=local_actor(local_admin, "models reconcile"), reason=reason)
    for entry in entries:
        console.print(f"{name}@{entry.alias}: audit log now says {entry.to_version} (was {entry.from_version})")
    if not entries:
        console.print(f"{name}: MLflow and the audit log agree")
