"""FineTuningSettings: the operator's settings are checked before the control plane serves."""

from __future__ import annotations

from pathlib import Path

import pytest

from forgeline.finetune.service import FineTuningSettings, load_settings
from jobs.config import ClusterSpec
from registry.errors import ConfigError


def slurm(shared: Path) -> FineTuningSettings:
    return FineTuningSettings(cluster=ClusterSpec(kind="slurm", gpus_per_node=0, shared_dir=str(shared)))


def test_a_shared_dir_without_a_tracking_server_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        slurm(tmp_path / "shared").checked()
    assert info.value.problems[0].path == "cluster.shared_dir"
    assert "MLFLOW_TRACKING_URI" in str(info.value)


def test_a_shared_dir_is_fine_with_a_tracking_uri_or_as_the_home(
    tmp_path: Path, isolated_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert slurm(isolated_home).checked().cluster.shared_dir == str(isolated_home)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert slurm(tmp_path / "shared").checked()


def test_settings_file_reports_every_problem_with_its_path(tmp_path: Path) -> None:
    path = tmp_path / "ft.yaml"
    path.write_text("poll_interval_s: 0\nevaluate: maybe\nclustr: {}\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert {p.path for p in info.value.problems} == {"poll_interval_s", "evaluate", "clustr"}
    path.write_text("poll_interval_s: 2\ncluster: {kind: local}\n")
    assert load_settings(path).poll_interval_s == 2
