"""``forgeline approve``, ``promote`` (gates printed, nothing moved on refusal) and
``control serve`` as users run them."""

from __future__ import annotations

import getpass
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from forgeline.cli import app
from registry.client import Registry
from registry.keys import KeyStore
from tests.support.backends import Backend, free_port, trained_version, unique_name

pytestmark = pytest.mark.integration

POLICY = """\
approvals: {count: 1}
requires:
  production: {engine: torch}
"""


def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    # Local governance needs an explicit identity: a key, or --local-admin (never $USER).
    env = {"FORGELINE_API_KEY": "", "FORGELINE_LOCAL_ADMIN": "", **(env or {})}
    result = CliRunner().invoke(app, list(args), terminal_width=200, env=env)
    return result.exit_code, result.output


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_approve_and_promote_from_the_cli(backend: Backend, tmp_path: Path) -> None:
    registry = Registry()
    name = unique_name()
    me = getpass.getuser()
    trained_version(registry, name, trained_by=me)  # trained by whoever runs the CLI
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)

    # No key and no --local-admin: nothing is done, whoever $USER is.
    for command in (("promote", name, "1", "--policy", str(policy)), ("approve", name, "1", "-m", "looks good"),
                    ("rollback", name), ("models", "reconcile", name)):
        code, out = run(*command)
        assert code == 1 and "--local-admin NAME" in out, (command, out)
    assert registry.decisions(name, 1) == [] and registry.alias_history(name) == []

    code, out = run("promote", name, "1", "--policy", str(policy), "--local-admin", "ops")
    assert code == 1 and "FAIL approvals: 0 of 1" in out and "FAIL requires:production:engine" in out
    assert registry.alias_holder(name, "production") is None and registry.alias_history(name) == []

    # The local admin is still the person named: the trainer cannot approve as one.
    code, out = run("approve", name, "1", "--comment", "looks good", "--local-admin", me)
    assert code == 1 and "no self-approval" in out

    # A key of another org: the operator's model does not exist for it, locally as over HTTP.
    other, _ = KeyStore().create("bob", roles=("approver",), org="beta")
    code, out = run("approve", name, "1", "-m", "from beta", env={"FORGELINE_API_KEY": other})
    assert code == 1 and f"no registered model named '{name}'" in out
    assert registry.decisions(name, 1) == []

    secret, _ = KeyStore().create("reviewer-rita", roles=("approver",))
    code, out = run("approve", name, "1", "-m", "reviewed", env={"FORGELINE_API_KEY": secret})
    assert code == 0 and "approved" in out and "reviewer-rita (approver)" in out

    code, out = run("promote", name, "1", "--policy", str(policy), env={"FORGELINE_LOCAL_ADMIN": "ops"})
    assert code == 1 and "pass approvals: 1 of 1" in out and "FAIL requires:production:engine" in out
    registry.set_tags(name, 1, {"forgeline.engine.torch": "file:///engines/torch"})
    code, out = run("promote", name, "1", "--policy", str(policy), "--reason", "release 1", "--local-admin", "ops")
    assert code == 0, out
    entry = registry.alias_history(name)[0]
    assert registry.resolve(name).version == 1 and entry.reason == "release 1" and entry.actor == "local-admin:ops"

    key_file = tmp_path / "key"
    key_file.write_text(secret + "\n")
    code, out = run("approve", name, "1", "--reject", "-m", "regression found", "--api-key-file", str(key_file))
    assert code == 0 and "rejected" in out
    code, out = run("promote", name, "1", "--to", "staging", "--policy", str(policy), "--local-admin", "ops")
    assert code == 1 and "rejected by reviewer-rita" in out

    # A key on the command line still works, with a warning (ps shows it to everyone).
    code, out = run("approve", name, "1", "-m", "fixed", "--api-key", secret)
    assert code == 0 and "--api-key puts your key on the command line" in out

    # An explicit local admin approves as `local-admin:NAME`, never as the OS user.
    code, out = run("approve", name, "1", "-m", "signed off", "--local-admin", "lee")
    assert code == 0 and "local-admin:lee (admin)" in out
    assert [d.approver for d in registry.decisions(name, 1)][-1] == "local-admin:lee"
    registry.close()


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_control_serve_process_and_approve_over_http(backend: Backend, tmp_path: Path) -> None:
    registry = Registry()
    name = unique_name()
    trained_version(registry, name)
    keys = KeyStore()
    secret, _ = keys.create("ana", roles=("approver",))
    policy = tmp_path / "book.yaml"
    policy.write_text("default:\n  approvals: {count: 1}\n")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "forgeline", "control", "serve", "--port", str(port), "--policy", str(policy)],
        env={**os.environ},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "control plane did not start"
            time.sleep(0.2)
        code, out = run("approve", name, "1", "-m", "reviewed", "--server", url, env={"FORGELINE_API_KEY": secret})
        assert code == 0 and "ana (approver)" in out
        code, out = run("approve", name, "1", "-m", "x", "--server", url, env={"FORGELINE_API_KEY": "fl-not-a-real-key-000000"})
        assert code == 1 and "invalid API key" in out
        gates = httpx.get(
            f"{url}/v1/models/{name}/versions/1/gates", headers={"Authorization": f"Bearer {secret}"}, timeout=30
        ).json()
        assert gates["passed"] and gates["gates"][0]["detail"].startswith("1 of 1 approval")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        registry.close()
        keys.dispose()
