"""Where forgeline keeps its state: ``$FORGELINE_HOME`` (default ``~/.forgeline``).

Embedded default: MLflow on SQLite (``$FORGELINE_HOME/mlflow.db``) with artifacts under
``$FORGELINE_HOME/artifacts``, and forgeline's own control-plane tables (audit log,
approvals, keys) in ``$FORGELINE_HOME/control.db``. Teams point ``MLFLOW_TRACKING_URI``
at an MLflow server and ``FORGELINE_DB_URL`` at PostgreSQL instead.
"""

from __future__ import annotations

import os
from pathlib import Path


def forgeline_home() -> Path:
    """The state folder, created on first use."""
    home = Path(os.environ.get("FORGELINE_HOME", Path.home() / ".forgeline")).expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    return home


def tracking_uri() -> str:
    """MLflow tracking URI: ``MLFLOW_TRACKING_URI`` if set, else SQLite under the home."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{forgeline_home() / 'mlflow.db'}"


def registry_uri() -> str:
    """MLflow model-registry URI; follows the tracking URI unless set on its own."""
    return os.environ.get("MLFLOW_REGISTRY_URI") or tracking_uri()


def artifact_root() -> str:
    """Default artifact location for experiments created on the embedded store."""
    path = forgeline_home() / "artifacts"
    path.mkdir(parents=True, exist_ok=True)
    return path.as_uri()


def control_db_url() -> str:
    """SQLAlchemy URL for forgeline's own tables (audit log, approvals, keys)."""
    return os.environ.get("FORGELINE_DB_URL") or f"sqlite:///{forgeline_home() / 'control.db'}"
