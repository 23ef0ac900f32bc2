"""``forgeline serve --base NAME`` as an operator runs it: a real process, a real port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from forgeline.cli import app
from tests.conftest import TINY_BASE

pytestmark = pytest.mark.integration

MARKER = "{# forgeline-serve-base-test #}"


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args), terminal_width=200)
    return result.exit_code, result.output


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_needs_something_to_serve_and_a_known_base() -> None:
    code, out = run("serve", "--no-auth")
    assert code != 0 and "--model" in out and "--base" in out
    code, out = run("serve", "--base", "nope", "--no-auth")
    assert code != 0 and "nope" in out


def test_serve_base_builds_the_operator_base_once_and_serves_it(isolated_home: Path, tmp_path: Path) -> None:
    template = tmp_path / "chat.jinja"
    template.write_text(MARKER + (TINY_BASE / "chat_template.jinja").read_text())
    code, out = run("models", "add-base", "tiny", str(TINY_BASE), "--chat-template", str(template))
    assert code == 0, out

    port = _free_port()
    cmd = [
        sys.executable,
        "-m",
        "forgeline",
        "serve",
        "--base",
        "tiny",
        "--no-auth",
        "--device",
        "cpu",
        "--port",
        str(port),
    ]
    proc = subprocess.Popen(
        cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the gateway did not become ready"
            time.sleep(0.5)
        assert [m["id"] for m in httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"]] == ["tiny"]
        reply = httpx.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            json={"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
            timeout=60,
        )
        assert reply.status_code == 200, reply.text
        assert reply.headers["x-forgeline-model-version"] == "tiny/base"
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    artifact = isolated_home / "engines" / "bases" / "tiny" / "torch"
    assert reply.headers["x-forgeline-engine-artifact"] == str(artifact)
    # The operator's chat template went into the artifact.
    assert any(MARKER in p.read_text(errors="ignore") for p in artifact.iterdir() if p.suffix in (".json", ".jinja"))
