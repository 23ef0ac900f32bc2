"""Real backends for registry and control-plane tests, shared as fixtures and helpers.

- ``sqlite``: the embedded default (MLflow on SQLite, control tables in another SQLite file).
- ``postgres``: how teams run it: a real ``mlflow server`` process backed by PostgreSQL,
  reached over REST, and forgeline's control tables in PostgreSQL too.

PostgreSQL comes from ``FORGELINE_TEST_POSTGRES_URL`` (CI starts it with
``.ci/services/postgres.sh``) or, when unset, is started here with that same script.
Tests skip only when PostgreSQL's binaries are not installed.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from mlflow import MlflowClient

from registry import lineage
from registry.client import Registry, VersionInfo

REPO = Path(__file__).resolve().parents[2]
PG_SCRIPT = REPO / ".ci" / "services" / "postgres.sh"
TRAINER = "trainer-tess"


def _pg_binaries() -> bool:
    if os.environ.get("PG_BIN"):
        return True
    return any(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl")) or shutil.which("pg_ctl") is not None


class _Shared:
    """One instance of a service per test session, however many conftests ask for it.

    Session fixtures defined in two conftests are two fixtures to pytest (one per
    folder), so each would start its own PostgreSQL and MLflow server; they share this
    instead and the last one to finish stops it.
    """

    def __init__(self) -> None:
        self.value: str | None = None
        self.users = 0
        self.stop: Iterator[None] | None = None

    def use(self, start: Callable[[], Iterator[str]]) -> Iterator[str]:
        if self.value is None:
            self.stop = start()
            self.value = next(self.stop)
        self.users += 1
        try:
            yield self.value
        finally:
            self.users -= 1
            if self.users == 0 and self.stop is not None:
                self.value, stop, self.stop = None, self.stop, None
                next(stop, None)


_POSTGRES = _Shared()
_MLFLOW = _Shared()


def _start_postgres() -> Iterator[str]:
    url = os.environ.get("FORGELINE_TEST_POSTGRES_URL")
    if url:
        yield url
        return
    # Not under pytest's tmp_path: as root the server runs as `postgres`, which cannot enter it.
    workdir = Path(tempfile.mkdtemp(prefix="forgeline-pg-"))
    proc = subprocess.run([str(PG_SCRIPT), "start", str(workdir)], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        shutil.rmtree(workdir, ignore_errors=True)
        pytest.fail(f"could not start PostgreSQL: {proc.stderr[-2000:]}")
    try:
        yield proc.stdout.strip()
    finally:
        _stop_early_mlflow()
        subprocess.run([str(PG_SCRIPT), "stop", str(workdir)], capture_output=True, timeout=60)
        shutil.rmtree(workdir, ignore_errors=True)


def _stop_early_mlflow() -> None:
    global _early_mlflow
    if _early_mlflow is not None:
        _early_mlflow, server = None, _early_mlflow
        server.stop()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """SQLAlchemy URL of a scratch PostgreSQL database (the cluster lives for the session)."""
    if not os.environ.get("FORGELINE_TEST_POSTGRES_URL"):
        if not _pg_binaries():
            pytest.skip("PostgreSQL binaries not found (apt-get install -y postgresql); PostgreSQL tests skipped")
        try:
            import psycopg  # noqa: F401
        except ImportError:
            pytest.fail("PostgreSQL is installed but its driver is not: pip install 'forgeline[postgres]'")
    global _early_mlflow
    for url in _POSTGRES.use(_start_postgres):
        if _early_mlflow is None and _MLFLOW.value is None:
            _early_mlflow = MlflowServerProcess(url)
        yield url
        _stop_early_mlflow()  # never claimed by a test (e.g. `-k audit_postgres`)


def fresh_database(server_url: str, prefix: str = "t") -> str:
    """Create an empty database next to ``server_url``'s and return its URL."""
    import psycopg
    from sqlalchemy.engine import make_url

    url = make_url(server_url)
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    dsn = url.set(drivername="postgresql", database="postgres").render_as_string(hide_password=False)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return url.set(database=name).render_as_string(hide_password=False)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MlflowServerProcess:
    """``mlflow server --backend-store-uri postgresql+psycopg://...`` as its own process group."""

    def __init__(self, postgres_url: str) -> None:
        backend = fresh_database(postgres_url, prefix="mlflow")
        self.artifacts = Path(tempfile.mkdtemp(prefix="forgeline-mlflow-artifacts-"))
        self.log = open(self.artifacts.parent / f"{self.artifacts.name}.log", "w+")  # noqa: SIM115  # see stop()
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            [
                sys.executable, "-m", "mlflow", "server",
                "--backend-store-uri", backend,
                "--artifacts-destination", self.artifacts.as_uri(),
                "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # MLflow's GenAI job runner (a huey consumer process) is not needed for the
            # registry and would compete for the CI machine's two cores.
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        )

    def wait_ready(self, timeout_s: float = 240) -> str:
        """Block until ``/health`` answers (imports and schema migrations take a while)."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                self.log.seek(0)
                pytest.fail(f"mlflow server exited with {self.proc.returncode}:\n{self.log.read()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self.url
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.log.seek(0)
                pytest.fail(f"mlflow server did not start in time:\n{self.log.read()[-3000:]}")
            time.sleep(0.25)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the server and the uvicorn worker it spawned
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # throwaway data: no graceful exit needed
                self.proc.wait(timeout=30)
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)
        shutil.rmtree(self.artifacts, ignore_errors=True)


# Started as soon as PostgreSQL is up, so its ~30 s of imports overlap with other tests.
_early_mlflow: MlflowServerProcess | None = None


def _start_mlflow(postgres_url: str) -> Iterator[str]:
    global _early_mlflow
    server, _early_mlflow = _early_mlflow or MlflowServerProcess(postgres_url), None
    try:
        yield server.wait_ready()
    finally:
        server.stop()


@pytest.fixture(scope="session")
def mlflow_server(postgres_server: str) -> Iterator[str]:
    """A real ``mlflow server`` process with PostgreSQL as backend store; yields its URL."""
    yield from _MLFLOW.use(lambda: _start_mlflow(postgres_server))


_MLFLOW_DB = _Shared()


def _migrate_mlflow_db() -> Iterator[str]:
    folder = Path(tempfile.mkdtemp(prefix="forgeline-mlflow-template-"))
    path = folder / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    try:
        yield str(path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def migrated_mlflow_db() -> Iterator[Path]:
    """An MLflow SQLite DB with its schema migrated once per session (that takes seconds); copy it."""
    for path in _MLFLOW_DB.use(_migrate_mlflow_db):
        yield Path(path)


@dataclass(frozen=True)
class Backend:
    """Where a test's registry lives; ``env`` configures any process (CLI, server, child) alike."""

    kind: str
    env: dict[str, str]


def sqlite_backend(home: Path, migrated_mlflow_db: Path) -> Backend:
    home.mkdir(parents=True, exist_ok=True)
    shutil.copy(migrated_mlflow_db, home / "mlflow.db")
    return Backend(
        "sqlite",
        {
            "FORGELINE_HOME": str(home),
            "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
            "FORGELINE_DB_URL": f"sqlite:///{home / 'control.db'}",
        },
    )


def postgres_backend(home: Path, postgres_server: str, mlflow_server: str) -> Backend:
    home.mkdir(parents=True, exist_ok=True)
    return Backend(
        "postgres",
        {
            "FORGELINE_HOME": str(home),
            "MLFLOW_TRACKING_URI": mlflow_server,
            "FORGELINE_DB_URL": fresh_database(postgres_server, prefix="control"),
        },
    )


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Backend:
    """Each backend in turn, configured through the environment as users do."""
    if request.param == "sqlite":
        chosen = sqlite_backend(tmp_path / "home", request.getfixturevalue("migrated_mlflow_db"))
    else:
        chosen = postgres_backend(
            tmp_path / "home", request.getfixturevalue("postgres_server"), request.getfixturevalue("mlflow_server")
        )
    for key, value in chosen.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    return chosen


def unique_name(prefix: str = "m") -> str:
    """A model name no other test uses (the MLflow server is shared by the session)."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def trained_version(
    registry: Registry,
    name: str,
    *,
    accuracy: float = 0.9,
    loss: float = 1.0,
    base_loss: float = 2.0,
    trained_by: str = TRAINER,
) -> VersionInfo:
    """A run with a tiny artifact, registered and evaluated like the pipeline does."""
    experiment_id = registry.ensure_experiment("forgeline-tests")
    run = registry.client.create_run(experiment_id)
    run_id = run.info.run_id
    registry.client.log_text(run_id, '{"model_type": "tiny"}', "model/config.json")
    registry.client.set_terminated(run_id)
    version = registry.create_version(
        name,
        source=f"runs:/{run_id}/model",
        run_id=run_id,
        tags={
            lineage.BASE_MODEL: "tiny-base",
            lineage.METHOD: "sft",
            lineage.RUN_ID: run_id,
            lineage.TRAINED_BY: trained_by,
        },
    )
    registry.record_evaluation(
        name, version.version, {"accuracy": accuracy, "eval_loss": loss}, base_metrics={"eval_loss": base_loss}
    )
    return registry.get_version(name, version.version)


def promote_in_child(env: dict[str, str], name: str, version: int, barrier: object, results: object) -> None:
    """Child-process body for the concurrency test: check the gates, wait for the other
    process to have checked too, then try to move ``production``.

    The barrier sits between the policy check and the alias move, so both processes
    decide on the same (empty) holder: exactly the race a real pair of promotions has.
    """
    os.environ.update(env)
    from registry.errors import ConflictError, ForgelineError
    from registry.policy import PromotionPolicy
    from registry.promotion import promote

    registry = Registry()
    move = registry.move_alias

    def move_after_barrier(*args: object, **kwargs: object) -> object:
        barrier.wait(timeout=120)  # type: ignore[attr-defined]
        return move(*args, **kwargs)  # type: ignore[arg-type]

    registry.move_alias = move_after_barrier  # type: ignore[method-assign]
    try:
        policy = PromotionPolicy(no_regression=["accuracy"], tolerance=0.5)
        promote(registry, name, version, policy=policy, actor=f"proc-{version}", reason="race")
        results.put((version, "moved", ""))  # type: ignore[attr-defined]
    except ConflictError as exc:
        results.put((version, "conflict", str(exc)))  # type: ignore[attr-defined]
    except ForgelineError as exc:
        results.put((version, "error", f"{exc.code}: {exc}"))  # type: ignore[attr-defined]
    except Exception as exc:  # reported to the parent, which fails the test with it
        results.put((version, "error", repr(exc)))  # type: ignore[attr-defined]
    finally:
        registry.close()
