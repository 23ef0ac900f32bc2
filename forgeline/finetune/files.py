"""Uploaded fine-tuning files: content-addressed blobs plus a ``files`` table.

Blobs live in a :class:`~forgeline.finetune.blobs.BlobStore`: by default
``$FORGELINE_HOME/files/sha256/<first 2 hex>/<sha256>``, or an S3-compatible bucket named by
``FORGELINE_FILES_URL`` so control-plane replicas share them. Identical uploads share one blob,
and a blob is deleted only when no live row references it. Metadata
(owner org, name, purpose, size, format, row count) lives in the control database beside
keys and the audit log; deleting a file hides its row (``deleted_at``) but keeps it for audit.

An upload is streamed into a temporary file in the store's staging folder while it is hashed and
counted, stopped as soon as it passes the size limit, checked with
:func:`forgeline.finetune.formats.inspect_jsonl`, and only then moved into place, so a
bad or oversized upload never leaves a blob behind.
"""

from __future__ import annotations

import builtins
import hashlib
import logging
import os
import secrets
import tempfile
import unicodedata
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO

from sqlalchemy import BigInteger, Column, Index, Integer, String, Table, and_, func, or_, select, update

from forgeline.finetune.blobs import BlobStore, LocalBlobs, blob_store_from_env
from forgeline.finetune.formats import inspect_jsonl
from registry.db import READ_ONLY, ControlStore, UTCDateTime, lock_model, metadata, now
from registry.errors import ErrorCode, ForgelineError, NotFoundError
from registry.settings import private_dir

logger = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 512 * 1024 * 1024
"""Largest accepted upload; override with ``FORGELINE_MAX_FILE_BYTES``."""

PURPOSES: tuple[str, ...] = ("fine-tune",)
"""Accepted ``purpose`` values (OpenAI's ``batch``, ``vision`` ... are not served here)."""

_CHUNK = 1024 * 1024
_MAX_FILENAME = 255
_DEFAULT_FILENAME = "upload.jsonl"

files = Table(
    "files",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("org", String(256), nullable=False),
    Column("filename", String(_MAX_FILENAME), nullable=False),
    Column("purpose", String(32), nullable=False),
    Column("bytes", BigInteger, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("format", String(16), nullable=False),
    Column("rows", Integer, nullable=False),
    Column("created_by", String(256), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("deleted_at", UTCDateTime(), nullable=True),
    Index("ix_files_org_created", "org", "created_at"),
    Index("ix_files_sha256", "sha256"),
)


@dataclass(frozen=True)
class FileRecord:
    """One live uploaded file."""

    id: str
    org: str
    filename: str
    purpose: str
    bytes: int
    sha256: str
    format: str
    rows: int
    created_by: str
    created_at: datetime

    def to_openai(self) -> dict[str, Any]:
        """The OpenAI ``file`` object."""
        return {
            "id": self.id,
            "object": "file",
            "bytes": self.bytes,
            "created_at": int(self.created_at.timestamp()),
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "status_details": None,
            "expires_at": None,
        }


def _record(row: Any) -> FileRecord:
    return FileRecord(
        id=row.id,
        org=row.org,
        filename=row.filename,
        purpose=row.purpose,
        bytes=row.bytes,
        sha256=row.sha256,
        format=row.format,
        rows=row.rows,
        created_by=row.created_by,
        created_at=row.created_at,
    )


def safe_filename(name: str | None) -> str:
    """The upload's name as metadata: its basename without control characters, at most 255 characters."""
    base = (name or "").replace("\\", "/").rsplit("/", 1)[-1]
    base = "".join(ch for ch in base if unicodedata.category(ch) != "Cc").strip()
    base = base[:_MAX_FILENAME]
    return _DEFAULT_FILENAME if base in ("", ".", "..") else base


def _env_max_bytes() -> int:
    raw = os.environ.get("FORGELINE_MAX_FILE_BYTES")
    if not raw:
        return DEFAULT_MAX_BYTES
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ForgelineError(
            f"FORGELINE_MAX_FILE_BYTES: invalid value {raw!r}; fix: give a positive number of bytes, e.g. 536870912",
            code=ErrorCode.INVALID_CONFIG,
            param="FORGELINE_MAX_FILE_BYTES",
        )
    return value


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def _not_found(file_id: str, param: str = "file_id") -> NotFoundError:
    return NotFoundError(
        f"no file {file_id!r}; fix: list your files with `client.files.list()` (GET /v1/files)", param=param
    )


def _lock_blob(conn: Any, sha256: str) -> None:
    # Creating a row for a blob and deleting the last row of it must not interleave, or a
    # delete could remove the blob a new row just reused (SQLite: BEGIN IMMEDIATE already serialises).
    lock_model(conn, f"files/sha256/{sha256}")


class FileStore(ControlStore):
    """Create, read, list and delete uploaded files, scoped to an organisation.

    Args:
        url: SQLAlchemy URL of the control database; default ``registry.settings.control_db_url()``.
        root: folder of local blobs (a shortcut for ``blobs=LocalBlobs(root)``).
        max_bytes: largest accepted upload; default ``FORGELINE_MAX_FILE_BYTES`` or 512 MiB.
        blobs: where the content lives; default :func:`~forgeline.finetune.blobs.blob_store_from_env`
            (``FORGELINE_FILES_URL``, else ``$FORGELINE_HOME/files``).
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        root: Path | None = None,
        max_bytes: int | None = None,
        blobs: BlobStore | None = None,
    ) -> None:
        super().__init__(url)
        if root is not None and blobs is not None:
            raise ForgelineError(
                "FileStore: give root or blobs, not both; fix: pass blobs=LocalBlobs(root)",
                code=ErrorCode.INVALID_CONFIG,
                param="root",
            )
        self.blobs: BlobStore = LocalBlobs(Path(root)) if root is not None else blobs or blob_store_from_env()
        self.root = self.blobs.root
        self.max_bytes = max_bytes if max_bytes is not None else _env_max_bytes()
        if self.max_bytes < 1:
            raise ForgelineError(
                f"max_bytes: invalid value {self.max_bytes!r}; fix: give a positive number of bytes",
                code=ErrorCode.INVALID_CONFIG,
                param="max_bytes",
            )

    def create(self, *, org: str, actor: str, filename: str, purpose: str, stream: BinaryIO) -> FileRecord:
        """Store an upload after checking it.

        Args:
            org: the owning organisation (the uploader's key's org).
            actor: who uploaded it (the key's name).
            filename: the client's name for it; metadata only, never part of a path.
            purpose: ``fine-tune``.
            stream: the upload, read in chunks (never whole into memory).

        Raises:
            ForgelineError: ``purpose`` is not accepted (400), or the upload is larger
                than ``max_bytes`` (``payload_too_large``, 413).
            FileFormatError: the content is not valid fine-tuning JSONL (400).
        """
        if purpose not in PURPOSES:
            raise ForgelineError(
                f"purpose: {purpose!r} is not accepted here; fix: use one of: {', '.join(PURPOSES)}",
                code=ErrorCode.INVALID_REQUEST,
                param="purpose",
            )
        name = safe_filename(filename)
        staging = self.blobs.staging_dir
        private_dir(staging)
        fd, tmp_name = tempfile.mkstemp(dir=staging, prefix=".upload-", suffix=".part")
        tmp = Path(tmp_name)
        try:
            digest, size = hashlib.sha256(), 0
            with os.fdopen(fd, "wb") as out:
                while chunk := stream.read(_CHUNK):
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise ForgelineError(
                            f"file {name!r} is larger than the limit of {self.max_bytes} bytes "
                            f"({_size(self.max_bytes)}); fix: split it into smaller files, or raise the server's "
                            "limit with FORGELINE_MAX_FILE_BYTES",
                            code=ErrorCode.PAYLOAD_TOO_LARGE,
                            param="file",
                        )
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            summary = inspect_jsonl(tmp, filename=name)
            sha256 = digest.hexdigest()
            record = FileRecord(
                id=f"file-{secrets.token_hex(12)}",
                org=org,
                filename=name,
                purpose=purpose,
                bytes=size,
                sha256=sha256,
                format=summary.format.value,
                rows=summary.rows,
                created_by=actor,
                created_at=now(),
            )
            with self.engine.begin() as conn:
                _lock_blob(conn, sha256)
                # Under the lock, so a concurrent delete of the last row cannot remove the blob
                # between this put and the insert (put keeps a blob already there).
                self.blobs.put(sha256, tmp)
                conn.execute(files.insert().values(**record.__dict__, deleted_at=None))
        finally:
            tmp.unlink(missing_ok=True)
        logger.info(
            "file %s (%s, %d bytes, %d %s rows) uploaded by %s in org %s",
            record.id,
            name,
            size,
            summary.rows,
            summary.format,
            actor,
            org,
        )
        return record

    def _live(self, conn: Any, org: str, file_id: str) -> Any:
        query = select(files).where(files.c.id == file_id, files.c.org == org, files.c.deleted_at.is_(None))
        row = conn.execute(query).one_or_none()
        if row is None:
            # Another org's file reads exactly like a missing one: never reveal that it exists.
            raise _not_found(file_id)
        return row

    def get(self, org: str, file_id: str) -> FileRecord:
        """One live file of ``org``.

        Raises:
            NotFoundError: no such live file in ``org`` (also when another org owns it).
        """
        with self.engine.connect().execution_options(**{READ_ONLY: True}) as conn:
            return _record(self._live(conn, org, file_id))

    def list(
        self,
        org: str,
        *,
        purpose: str | None = None,
        after: str | None = None,
        limit: int = 10000,
        order: str = "desc",
    ) -> tuple[builtins.list[FileRecord], bool]:
        """A page of ``org``'s live files by creation time, and whether more follow.

        Args:
            org: the organisation.
            purpose: only files of this purpose.
            after: a file id; the page starts after it (OpenAI's cursor).
            limit: page size, 1 to 10000.
            order: ``desc`` (newest first) or ``asc``.

        Raises:
            ForgelineError: ``limit`` or ``order`` is invalid (400).
            NotFoundError: ``after`` is not a file of ``org``.
        """
        if isinstance(limit, bool) or not 1 <= limit <= 10000:
            raise ForgelineError(
                f"limit: invalid value {limit!r}; fix: give 1 to 10000", code=ErrorCode.INVALID_REQUEST, param="limit"
            )
        if order not in ("asc", "desc"):
            raise ForgelineError(
                f"order: invalid value {order!r}; fix: use asc or desc", code=ErrorCode.INVALID_REQUEST, param="order"
            )
        query = select(files).where(files.c.org == org, files.c.deleted_at.is_(None))
        if purpose is not None:
            query = query.where(files.c.purpose == purpose)
        with self.engine.connect().execution_options(**{READ_ONLY: True}) as conn:
            if after is not None:
                cursor = conn.execute(
                    select(files.c.created_at, files.c.id).where(files.c.id == after, files.c.org == org)
                ).one_or_none()
                if cursor is None:
                    raise _not_found(after, param="after")
                if order == "desc":
                    query = query.where(
                        or_(
                            files.c.created_at < cursor.created_at,
                            and_(files.c.created_at == cursor.created_at, files.c.id < cursor.id),
                        )
                    )
                else:
                    query = query.where(
                        or_(
                            files.c.created_at > cursor.created_at,
                            and_(files.c.created_at == cursor.created_at, files.c.id > cursor.id),
                        )
                    )
            keys = (files.c.created_at, files.c.id)
            query = query.order_by(*(k.desc() if order == "desc" else k.asc() for k in keys)).limit(limit + 1)
            rows = conn.execute(query).all()
        return [_record(row) for row in rows[:limit]], len(rows) > limit

    def delete(self, org: str, file_id: str) -> FileRecord:
        """Hide a file (its row stays for audit); remove its blob when no live file shares it.

        Raises:
            NotFoundError: no such live file in ``org``.
        """
        with self.engine.begin() as conn:
            record = _record(self._live(conn, org, file_id))
            _lock_blob(conn, record.sha256)
            conn.execute(update(files).where(files.c.id == file_id).values(deleted_at=now()))
            live = conn.execute(
                select(func.count())
                .select_from(files)
                .where(files.c.sha256 == record.sha256, files.c.deleted_at.is_(None))
            ).scalar_one()
            if live == 0:
                self.blobs.delete(record.sha256)
        logger.info("file %s (%s) deleted in org %s", record.id, record.filename, org)
        return record

    def is_deleted(self, org: str, file_id: str) -> bool:
        """Whether ``file_id`` of ``org`` was deleted (a file that never existed is not)."""
        query = select(files.c.deleted_at).where(files.c.id == file_id, files.c.org == org)
        with self.engine.connect().execution_options(**{READ_ONLY: True}) as conn:
            row = conn.execute(query).first()
        return row is not None and row.deleted_at is not None

    def path(self, org: str, file_id: str) -> Path:
        """A local, readable path with the content of a live file of ``org``.

        The blob itself for local storage; for S3 a verified copy in the local cache.

        Raises:
            NotFoundError: no such live file in ``org``.
            ForgelineError: the row exists but its content is gone, or does not match its sha256 (500).
        """
        record = self.get(org, file_id)
        try:
            return self.blobs.fetch(record.sha256)
        except ForgelineError as exc:
            raise ForgelineError(f"file {file_id!r}: {exc.message}", code=ErrorCode.INTERNAL, param="file_id") from exc
