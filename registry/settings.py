"""Where forgeline keeps its state: ``$FORGELINE_HOME`` (default ``~/.forgeline``).

Embedded default: MLflow on SQLite (``$FORGELINE_HOME/mlflow.db``) with artifacts under
``$FORGELINE_HOME/artifacts``, and forgeline's own control-plane tables (audit log,
approvals, keys) in ``$FORGELINE_HOME/control.db``. Teams point ``MLFLOW_TRACKING_URI``
at an MLflow server and ``FORGELINE_DB_URL`` at PostgreSQL instead.

The state is private to its owner whatever the umask: the home and the folders forgeline
makes in it are 0700, the databases 0600 (keys, audit, approvals and job data live there).
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

logger = logging.getLogger(__name__)

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600


def _tighten(path: Path, mode: int) -> None:
    # Only removes permission bits (never adds); a path owned by someone else is reported, not fought.
    try:
        current = stat.S_IMODE(path.stat().st_mode)
        if current & ~mode:
            os.chmod(path, current & mode)
    except PermissionError:
        logger.warning("cannot make %s private (mode %o wanted): it belongs to another user", path, mode)


def private_dir(path: Path) -> Path:
    """``path`` as a folder only its owner can use: created 0700, an existing one tightened to 0700."""
    if not path.is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            path.mkdir(mode=PRIVATE_DIR)
        except FileExistsError:
            pass  # made by another process meanwhile
    _tighten(path, PRIVATE_DIR)
    return path


def private_file(path: Path) -> Path:
    """``path`` as a file only its owner can read: created empty with 0600 when missing, else tightened."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE))
    except FileExistsError:
        _tighten(path, PRIVATE_FILE)
    return path


def forgeline_home() -> Path:
    """The state folder (0700), created on first use."""
    home = Path(os.environ.get("FORGELINE_HOME", Path.home() / ".forgeline")).expanduser().resolve()
    return private_dir(home)


def tracking_uri() -> str:
    """MLflow tracking URI: ``MLFLOW_TRACKING_URI`` if set, else SQLite under the home.

    The embedded database is made 0600 before MLflow opens it (SQLite gives its journal and
    WAL files the database file's mode); MLflow initialises an empty file like a missing one.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{private_file(forgeline_home() / 'mlflow.db')}"


def registry_uri() -> str:
    """MLflow model-registry URI; follows the tracking URI unless set on its own."""
    return os.environ.get("MLFLOW_REGISTRY_URI") or tracking_uri()


def artifact_root() -> str:
    """Default artifact location for experiments created on the embedded store."""
    return private_dir(forgeline_home() / "artifacts").as_uri()


def control_db_url() -> str:
    """SQLAlchemy URL for forgeline's own tables (audit log, approvals, keys)."""
    return os.environ.get("FORGELINE_DB_URL") or f"sqlite:///{forgeline_home() / 'control.db'}"
