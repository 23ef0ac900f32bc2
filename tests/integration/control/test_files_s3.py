"""Fine-tuning files on S3-compatible storage: a real control plane (uvicorn on loopback) with
``FORGELINE_FILES_URL=s3://...`` against moto's S3 server running as a real process, driven by
the real ``openai`` SDK: content-addressed objects, a second replica with an empty cache,
deletion of the last reference, and a tampered object refused instead of served."""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from forgeline.control import create_control_app
from forgeline.finetune.blobs import S3Blobs
from forgeline.finetune.files import FileStore
from registry.client import Registry
from registry.errors import ForgelineError
from registry.keys import KeyStore
from serving.gateway.server import serve_in_background
from tests.support.backends import sqlite_backend

pytestmark = pytest.mark.integration

boto3 = pytest.importorskip("boto3", reason="needs the s3 extra: pip install 'forgeline[s3]'")
pytest.importorskip("moto.server", reason="needs moto[server] (the dev extra)")

BUCKET = "team-files"
PREFIX = "forgeline"
ROW = {"messages": [{"role": "user", "content": "Where is my invoice?"}, {"role": "assistant", "content": "Billing."}]}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """moto's S3-compatible server as a real process on a free loopback port."""
    port = free_port()
    log = (tmp_path_factory.mktemp("moto") / "moto.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {proc.returncode}; see {log.name}")
            try:
                httpx.get(url + "/moto-api/", timeout=2)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@dataclass
class Plane:
    url: str
    store: FileStore
    secrets: dict[str, str]
    s3: Any
    endpoint: str
    home: Path

    def client(self, who: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.secrets[who], max_retries=0, timeout=60)

    def key(self, sha256: str) -> str:
        return f"{PREFIX}/sha256/{sha256[:2]}/{sha256}"

    def object_exists(self, sha256: str) -> bool:
        listed = self.s3.list_objects_v2(Bucket=BUCKET, Prefix=self.key(sha256))
        return listed.get("KeyCount", 0) > 0


@pytest.fixture
def plane(
    s3_endpoint: str, migrated_mlflow_db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Plane]:
    home = tmp_path / "home"
    for name, value in sqlite_backend(home, migrated_mlflow_db).env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("FORGELINE_FILES_URL", f"s3://{BUCKET}/{PREFIX}")
    monkeypatch.setenv("FORGELINE_S3_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "MLFLOW_S3_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket=BUCKET)
    registry, keys = Registry(), KeyStore()
    store = FileStore()  # blobs from FORGELINE_FILES_URL
    secrets = {
        "tess": keys.create("tess", roles=("trainer",), org="acme")[0],
        "rival": keys.create("rival", roles=("trainer",), org="rival")[0],
    }
    url, stop = serve_in_background(create_control_app(registry=registry, keys=keys, files=store))
    try:
        yield Plane(url, store, secrets, s3, s3_endpoint, home)
    finally:
        stop()
        registry.close()
        keys.dispose()
        store.dispose()
        # The bucket outlives the test (module-scoped server): empty and drop it.
        for obj in s3.list_objects_v2(Bucket=BUCKET).get("Contents", []):
            s3.delete_object(Bucket=BUCKET, Key=obj["Key"])
        s3.delete_bucket(Bucket=BUCKET)


def jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def upload(plane: Plane, who: str, path: Path) -> openai.types.FileObject:
    with path.open("rb") as fh:
        return plane.client(who).files.create(file=fh, purpose="fine-tune")


def replica(plane: Plane, home: Path, monkeypatch: pytest.MonkeyPatch) -> FileStore:
    """Another control-plane replica's store: same database and bucket, its own (empty) FORGELINE_HOME."""
    monkeypatch.setenv("FORGELINE_HOME", str(home))
    store = FileStore()
    assert isinstance(store.blobs, S3Blobs) and store.root == home / "cache" / "files"
    assert not store.root.exists()
    return store


def test_upload_is_shared_through_the_bucket(plane: Plane, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = jsonl(tmp_path / "train.jsonl", [ROW, ROW])
    sha = hashlib.sha256(data.read_bytes()).hexdigest()
    created = upload(plane, "tess", data)

    # Content-addressed object in the bucket, nothing stored under the local files folder.
    body = plane.s3.get_object(Bucket=BUCKET, Key=plane.key(sha))["Body"].read()
    assert body == data.read_bytes()
    assert not (plane.home / "files").exists()
    assert plane.client("tess").files.content(created.id).content == data.read_bytes()

    other = replica(plane, tmp_path / "replica-home", monkeypatch)
    try:
        path = other.path("acme", created.id)  # downloads into its empty cache, checks the sha256
        assert path == other.root / sha and path.read_bytes() == data.read_bytes()
        assert [p.name for p in other.root.iterdir()] == [sha]  # no temp file left behind
        with pytest.raises(ForgelineError):
            other.path("rival", created.id)  # org scoping is unchanged
    finally:
        other.dispose()


def test_the_object_goes_with_the_last_reference(plane: Plane, tmp_path: Path) -> None:
    data = jsonl(tmp_path / "train.jsonl", [ROW, ROW, ROW])
    sha = hashlib.sha256(data.read_bytes()).hexdigest()
    first, second = upload(plane, "tess", data), upload(plane, "rival", data)
    assert plane.s3.list_objects_v2(Bucket=BUCKET)["KeyCount"] == 1  # identical content: one object

    plane.client("tess").files.delete(first.id)
    assert plane.object_exists(sha)  # the other org's file still needs it
    assert plane.client("rival").files.content(second.id).content == data.read_bytes()

    plane.client("rival").files.delete(second.id)
    assert not plane.object_exists(sha)
    with pytest.raises(openai.NotFoundError):
        plane.client("rival").files.content(second.id)


def test_a_tampered_object_is_refused(plane: Plane, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = jsonl(tmp_path / "train.jsonl", [ROW])
    sha = hashlib.sha256(data.read_bytes()).hexdigest()
    created = upload(plane, "tess", data)
    bad = json.dumps({"messages": [{"role": "user", "content": "injected"}]}).encode() + b"\n"
    plane.s3.put_object(Bucket=BUCKET, Key=plane.key(sha), Body=bad)

    # The serving replica has never downloaded it: the HTTP read fails instead of sending other bytes.
    with pytest.raises(openai.InternalServerError, match="does not match its sha256"):
        plane.client("tess").files.content(created.id)

    other = replica(plane, tmp_path / "replica-home", monkeypatch)
    try:
        with pytest.raises(ForgelineError, match="does not match its sha256") as info:
            other.path("acme", created.id)
        assert created.id in info.value.message and info.value.http_status == 500
        assert not other.root.exists() or list(other.root.iterdir()) == []  # nothing cached, no temp file
    finally:
        other.dispose()
