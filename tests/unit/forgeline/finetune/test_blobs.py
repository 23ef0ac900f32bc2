"""Choosing and addressing the blob store of fine-tuning files (``FORGELINE_FILES_URL``)."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest

from forgeline.finetune.blobs import LocalBlobs, S3Blobs, blob_store_from_env
from registry.errors import ErrorCode, ForgelineError, MissingDependencyError

SHA = hashlib.sha256(b"x").hexdigest()


@pytest.fixture(autouse=True)
def no_endpoints(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("FORGELINE_FILES_URL", "FORGELINE_S3_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)


def test_unset_means_local_files_under_home(isolated_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = blob_store_from_env()
    assert isinstance(store, LocalBlobs) and store.root == isolated_home / "files"
    monkeypatch.setenv("FORGELINE_FILES_URL", "  ")
    assert isinstance(blob_store_from_env(), LocalBlobs)


@pytest.mark.parametrize(
    ("url", "bucket", "prefix", "key"),
    [
        ("s3://team/forgeline", "team", "forgeline", f"forgeline/sha256/{SHA[:2]}/{SHA}"),
        ("s3://team/a/b/", "team", "a/b", f"a/b/sha256/{SHA[:2]}/{SHA}"),
        ("s3://team", "team", "", f"sha256/{SHA[:2]}/{SHA}"),
    ],
)
def test_s3_url(url: str, bucket: str, prefix: str, key: str, isolated_home: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("FORGELINE_FILES_URL", url)
    store = blob_store_from_env()
    assert isinstance(store, S3Blobs)
    assert (store.bucket, store.prefix, store.endpoint_url) == (bucket, prefix, None)  # None: AWS
    assert store.key(SHA) == key
    assert store.root == isolated_home / "cache" / "files"


def test_endpoint_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORGELINE_FILES_URL", "s3://team/forgeline")
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", "http://minio:9000")
    assert blob_store_from_env().endpoint_url == "http://minio:9000"  # type: ignore[attr-defined]
    monkeypatch.setenv("FORGELINE_S3_ENDPOINT_URL", "http://files:9000")
    assert blob_store_from_env().endpoint_url == "http://files:9000"  # type: ignore[attr-defined]


@pytest.mark.parametrize("bad", ["/srv/files", "file:///srv/files", "s3:/team", "s3://", "gs://team/x", "s3://t?x=1"])
def test_bad_url_names_the_variable_the_value_and_the_forms(bad: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORGELINE_FILES_URL", bad)
    with pytest.raises(ForgelineError) as info:
        blob_store_from_env()
    assert info.value.code == ErrorCode.INVALID_CONFIG and info.value.param == "FORGELINE_FILES_URL"
    assert f"FORGELINE_FILES_URL: invalid value {bad!r}" in info.value.message
    assert "s3://BUCKET/PREFIX" in info.value.message and "unset" in info.value.message


def test_missing_boto3_says_which_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "boto3", None)  # makes `import boto3` fail as if not installed
    store = S3Blobs("team", "forgeline")
    with pytest.raises(MissingDependencyError, match=r"pip install 'forgeline\[s3\]'"):
        store.exists(SHA)


def test_local_blobs_put_fetch_delete(tmp_path: Path) -> None:
    blobs = LocalBlobs(tmp_path / "blobs")
    src = tmp_path / "upload.part"
    src.write_bytes(b"x")
    assert not blobs.exists(SHA)
    blobs.put(SHA, src)
    assert blobs.fetch(SHA) == tmp_path / "blobs" / "sha256" / SHA[:2] / SHA
    again = tmp_path / "again.part"
    again.write_bytes(b"changed")
    blobs.put(SHA, again)  # idempotent: the blob already there is kept
    assert blobs.fetch(SHA).read_bytes() == b"x"
    blobs.delete(SHA)
    blobs.delete(SHA)  # missing is fine
    with pytest.raises(ForgelineError, match="missing"):
        blobs.fetch(SHA)


def test_a_digest_is_never_a_path(tmp_path: Path) -> None:
    with pytest.raises(ForgelineError, match="sha256: invalid value"):
        LocalBlobs(tmp_path).fetch("../../etc/passwd")
    with pytest.raises(ForgelineError, match="sha256: invalid value"):
        S3Blobs("team").key(SHA.upper())
