"""``forgeline evaluate|build --cluster FILE``: the plain command, run as a job that ``forgeline jobs`` sees."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from forgeline.cli import app

pytestmark = pytest.mark.integration
runner = CliRunner()


def test_a_bad_cluster_file_names_the_field_and_exits_2(tmp_path: Path) -> None:
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text("kind: nomad\n")
    result = runner.invoke(app, ["evaluate", "m", "1", "--cluster", str(cluster)])
    assert result.exit_code == 2, result.output
    assert "kind" in result.output and "nomad" in result.output and "Traceback" not in result.output
    missing = runner.invoke(app, ["build", "m@1", "--cluster", str(tmp_path / "nope.yaml")])
    assert missing.exit_code == 2 and "nope.yaml" in missing.output, missing.output


def test_evaluate_on_a_cluster_runs_the_plain_command_as_a_job(tmp_path: Path) -> None:
    cluster = tmp_path / "local.yaml"
    cluster.write_text("cluster:\n  kind: local\n")
    submitted = runner.invoke(app, ["evaluate", "ghost", "3", "--max-samples", "5", "--cluster", str(cluster), "--detach"])
    assert submitted.exit_code == 0, submitted.output
    match = re.search(r"submitted (fl-\S+) \(evaluate: local job \d+\)", submitted.output)
    assert match, submitted.output
    job_id = match.group(1)
    waited = runner.invoke(app, ["jobs", "wait", job_id, "--timeout", "120"])
    assert waited.exit_code == 1, waited.output  # the job ran `forgeline evaluate ghost 3`: there is no such model
    log = runner.invoke(app, ["jobs", "logs", job_id]).output
    assert "ghost" in log and "Traceback" not in log, log
    listing = runner.invoke(app, ["jobs", "list", "--stage", "evaluate"])
    assert job_id in listing.output and "failed" in listing.output, listing.output
    assert job_id not in runner.invoke(app, ["jobs", "list", "--stage", "build"]).output
