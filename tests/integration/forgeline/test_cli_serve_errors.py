"""``forgeline serve`` that cannot start says why in one line and exits 2 (no uvicorn traceback).

The CLI runs in a real subprocess, as an operator runs it: the failures happen inside
uvicorn's lifespan (model resolution, artifact checks), while building a base's engine,
or when binding the port.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from forgeline.cli import app
from registry import lineage
from registry.client import Registry
from tests.conftest import REPO, TINY_BASE

pytestmark = pytest.mark.integration


@pytest.fixture
def registry(isolated_home: Path) -> Iterator[Registry]:
    reg = Registry()  # the same store under $FORGELINE_HOME the subprocess opens
    yield reg
    reg.close()


def _serve(*args: str, port: int | None = None) -> tuple[int, list[str]]:
    if port is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "forgeline", "serve", "--no-auth", "--device", "cpu", "--port", str(port), *args]
    done = subprocess.run(
        cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=240
    )
    return done.returncode, (done.stdout + done.stderr).splitlines()


def _one_error_line(lines: list[str]) -> str:
    assert not any("Traceback" in line or "│" in line for line in lines), "\n".join(lines)
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, "\n".join(lines)
    return errors[0]


def _add_base(name: str, source: Path) -> None:
    result = CliRunner().invoke(app, ["models", "add-base", name, str(source)])
    assert result.exit_code == 0, result.output


def _register(registry: Registry, name: str, tags: dict[str, str]) -> None:
    tags = {lineage.ADAPTER: "none", lineage.BASE_MODEL: str(TINY_BASE), **tags}
    version = registry.create_version(name, source=str(TINY_BASE), run_id=None, tags=tags).version
    registry.move_alias(name, "production", version, actor="test", reason="serve test")


def test_an_unknown_model_is_one_line_and_exit_2(registry: Registry) -> None:
    code, lines = _serve("--model", "no-such-model")
    assert code == 2
    assert _one_error_line(lines) == (
        "error: cannot serve: no model 'no-such-model': no registered model named 'no-such-model'; "
        "list the models you can see with `GET /v1/models` or `forgeline models list`"
    )


@pytest.mark.slow  # two CLI processes
def test_missing_artifacts_are_one_line_and_exit_2(registry: Registry, tmp_path: Path) -> None:
    _register(registry, "unbuilt", {})
    code, lines = _serve("--model", "unbuilt")
    assert code == 2
    assert "has no torch engine artifact; fix: run `forgeline build unbuilt@1`" in _one_error_line(lines)

    _register(registry, "deleted", {lineage.engine_tag("torch"): str(tmp_path / "gone")})
    code, lines = _serve("--model", "deleted")
    assert code == 2
    assert "is not an engine artifact: forgeline-engine.json is missing" in _one_error_line(lines)


def test_a_base_whose_weights_are_gone_is_one_line_and_exit_2(isolated_home: Path, tmp_path: Path) -> None:
    source = tmp_path / "base"
    shutil.copytree(TINY_BASE, source)
    _add_base("tiny", source)
    for weights in source.glob("*.safetensors"):
        weights.unlink()
    code, lines = _serve("--base", "tiny")
    assert code == 2
    line = _one_error_line(lines)
    assert line.startswith(f"error: cannot serve: base `tiny` cannot be loaded from {source}: ") and "fix:" in line


def test_a_taken_port_is_one_line_and_exit_2(isolated_home: Path) -> None:
    _add_base("tiny", TINY_BASE)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        code, lines = _serve("--base", "tiny", port=taken.getsockname()[1])
    assert code == 2
    line = _one_error_line(lines)
    assert line.startswith("error: cannot serve: the server could not start: ") and "address" in line.lower()


def test_a_recipe_adapter_that_is_no_adapter_is_one_line_and_exit_2(isolated_home: Path, tmp_path: Path) -> None:
    import yaml

    _add_base("tiny", TINY_BASE)
    recipe = yaml.safe_load((REPO / "recipes" / "quickstart.yaml").read_text())
    recipe["model"]["base"] = str(TINY_BASE)
    recipe["data"] = {k: str(REPO / "recipes" / v) for k, v in recipe["data"].items()}
    recipe["serve"] = {"adapters": {"support": str(tmp_path)}}  # a folder, but no adapter in it
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    code, lines = _serve("--base", "tiny", "--recipe", str(path))
    assert code == 2
    assert _one_error_line(lines) == (
        f"error: cannot serve: serve.adapters.support: {tmp_path} is not a PEFT adapter folder "
        "(adapter_config.json is missing); fix: point it at the adapter a training run saved, or remove it"
    )
