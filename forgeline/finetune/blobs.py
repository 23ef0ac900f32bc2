"""Where uploaded files' content lives: a content-addressed blob store keyed by sha256.

``LocalBlobs`` keeps blobs at ``<root>/sha256/<first 2 hex>/<sha256>`` (one machine, or a shared
folder). ``S3Blobs`` keeps them at ``<prefix>/sha256/<first 2 hex>/<sha256>`` in an S3-compatible
bucket (AWS S3, MinIO) so a team's control-plane replicas share them; readers get a local copy
cached under ``$FORGELINE_HOME/cache/files`` and checked against its sha256 before use.
:func:`blob_store_from_env` picks one from ``FORGELINE_FILES_URL``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

from registry import settings
from registry.errors import ErrorCode, ForgelineError, MissingDependencyError
from registry.settings import private_dir

logger = logging.getLogger(__name__)

FILES_URL_ENV = "FORGELINE_FILES_URL"
ENDPOINT_ENVS: tuple[str, ...] = ("FORGELINE_S3_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL")
"""Endpoint of an S3-compatible server, first set wins; MLflow teams already set the second for MinIO."""

_CHUNK = 1024 * 1024
_HEX = frozenset("0123456789abcdef")


def _check_sha(sha256: str) -> str:
    # The digest becomes part of a path or key: never let anything but 64 lowercase hex through.
    if len(sha256) != 64 or not set(sha256) <= _HEX:
        raise ForgelineError(
            f"sha256: invalid value {sha256!r}; fix: give 64 lowercase hex digits",
            code=ErrorCode.INTERNAL,
            param="sha256",
        )
    return sha256


def sha256_of(path: Path) -> str:
    """The hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class BlobStore(Protocol):
    """Content-addressed storage of uploaded files.

    Attributes:
        root: the local folder this store keeps files in: the blobs themselves (local) or the
            download cache (S3).
        staging_dir: a local folder for uploads in progress; on the blobs' filesystem for local
            storage, so that :meth:`put` is a rename.
    """

    root: Path
    staging_dir: Path

    def put(self, sha256: str, local: Path) -> None:
        """Store ``local`` (whose content hashes to ``sha256``); keep a blob already there.

        ``local`` may be moved away; the caller removes whatever is left of it.
        """
        ...

    def fetch(self, sha256: str) -> Path:
        """A local, readable path with the blob's content.

        Raises:
            ForgelineError: the blob is missing or its content does not match ``sha256`` (500).
        """
        ...

    def delete(self, sha256: str) -> None:
        """Remove the blob; a missing one is not an error."""
        ...

    def exists(self, sha256: str) -> bool:
        """Whether the blob is stored."""
        ...


def _missing(sha256: str, where: str) -> ForgelineError:
    return ForgelineError(
        f"file content sha256:{sha256} is missing from {where}; fix: upload the file again",
        code=ErrorCode.INTERNAL,
        param="file_id",
    )


class LocalBlobs:
    """Blobs in a local (or shared) folder: ``<root>/sha256/<first 2 hex>/<sha256>``.

    Args:
        root: the folder; created on first upload.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.staging_dir = self.root / "sha256"

    def blob(self, sha256: str) -> Path:
        """Where the blob of ``sha256`` lives."""
        return self.root / "sha256" / sha256[:2] / _check_sha(sha256)

    def put(self, sha256: str, local: Path) -> None:
        blob = self.blob(sha256)
        if blob.exists():
            return  # identical content: reuse the blob already there
        private_dir(blob.parent)
        os.replace(local, blob)

    def fetch(self, sha256: str) -> Path:
        blob = self.blob(sha256)
        if not blob.is_file():
            raise _missing(sha256, str(blob))
        return blob

    def delete(self, sha256: str) -> None:
        self.blob(sha256).unlink(missing_ok=True)

    def exists(self, sha256: str) -> bool:
        return self.blob(sha256).is_file()

    def __repr__(self) -> str:
        return f"LocalBlobs({str(self.root)!r})"


def _boto3() -> Any:
    try:
        import boto3
    except ModuleNotFoundError as exc:
        raise MissingDependencyError(
            f"{FILES_URL_ENV}=s3://... needs boto3; fix: pip install 'forgeline[s3]'", param=FILES_URL_ENV
        ) from exc
    return boto3


class S3Blobs:
    """Blobs in an S3-compatible bucket at ``<prefix>/sha256/<first 2 hex>/<sha256>``.

    Credentials and region come from boto3's usual chain (``AWS_ACCESS_KEY_ID``, profiles, instance roles).

    Args:
        bucket: the bucket (it must exist).
        prefix: key prefix inside the bucket; may be empty.
        endpoint_url: an S3-compatible server (MinIO); ``None`` for AWS.
        cache: where downloaded copies are kept; default ``$FORGELINE_HOME/cache/files``.
    """

    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str | None = None, *, cache: Path | None = None):
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url
        self.root = Path(cache) if cache is not None else settings.forgeline_home() / "cache" / "files"
        self.staging_dir = self.root
        self._client: Any = None

    @property
    def client(self) -> Any:
        """The boto3 S3 client, made on first use."""
        if self._client is None:
            self._client = _boto3().client("s3", endpoint_url=self.endpoint_url)
        return self._client

    def key(self, sha256: str) -> str:
        """The object key of ``sha256``."""
        tail = f"sha256/{sha256[:2]}/{_check_sha(sha256)}"
        return f"{self.prefix}/{tail}" if self.prefix else tail

    def _where(self, sha256: str) -> str:
        return f"s3://{self.bucket}/{self.key(sha256)}"

    def exists(self, sha256: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self.key(sha256))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
        return True

    def put(self, sha256: str, local: Path) -> None:
        if self.exists(sha256):
            return  # identical content: reuse the object already there
        self.client.upload_file(str(local), self.bucket, self.key(sha256))
        logger.debug("uploaded %s to %s", local, self._where(sha256))

    def fetch(self, sha256: str) -> Path:
        from botocore.exceptions import ClientError

        cached = self.root / _check_sha(sha256)
        if cached.is_file():
            return cached  # only verified downloads are ever renamed into the cache
        private_dir(self.root)
        fd, tmp_name = tempfile.mkstemp(dir=self.root, prefix=".download-", suffix=".part")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                try:
                    self.client.download_fileobj(self.bucket, self.key(sha256), out)
                except ClientError as exc:
                    if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                        raise _missing(sha256, self._where(sha256)) from None
                    raise
                out.flush()
                os.fsync(out.fileno())
            got = sha256_of(tmp)
            if got != sha256:
                raise ForgelineError(
                    f"file content {self._where(sha256)} does not match its sha256 (it hashes to {got}): the object "
                    "was changed in the bucket; fix: upload the file again, and keep the bucket writable only by "
                    "the control plane",
                    code=ErrorCode.INTERNAL,
                    param="file_id",
                )
            os.replace(tmp, cached)
        finally:
            tmp.unlink(missing_ok=True)
        return cached

    def delete(self, sha256: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.key(sha256))
        (self.root / sha256).unlink(missing_ok=True)

    def __repr__(self) -> str:
        return f"S3Blobs(bucket={self.bucket!r}, prefix={self.prefix!r}, endpoint_url={self.endpoint_url!r})"


def blob_store_from_env() -> BlobStore:
    """The blob store ``FORGELINE_FILES_URL`` names.

    Unset or empty: :class:`LocalBlobs` under ``$FORGELINE_HOME/files``. ``s3://bucket/prefix``:
    :class:`S3Blobs`, with the endpoint from ``FORGELINE_S3_ENDPOINT_URL``, else ``MLFLOW_S3_ENDPOINT_URL``,
    else AWS.

    Raises:
        ForgelineError: any other value (``invalid_config``).
    """
    raw = os.environ.get(FILES_URL_ENV, "").strip()
    if not raw:
        return LocalBlobs(settings.forgeline_home() / "files")
    parsed = urlparse(raw)
    if parsed.scheme != "s3" or not parsed.netloc or parsed.query or parsed.fragment or parsed.params:
        raise ForgelineError(
            f"{FILES_URL_ENV}: invalid value {raw!r}; fix: unset it (files under $FORGELINE_HOME/files) or give "
            "s3://BUCKET or s3://BUCKET/PREFIX (endpoint from FORGELINE_S3_ENDPOINT_URL or MLFLOW_S3_ENDPOINT_URL)",
            code=ErrorCode.INVALID_CONFIG,
            param=FILES_URL_ENV,
        )
    endpoint = next((os.environ[name] for name in ENDPOINT_ENVS if os.environ.get(name)), None)
    return S3Blobs(parsed.netloc, parsed.path.strip("/"), endpoint_url=endpoint)
