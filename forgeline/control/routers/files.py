"""OpenAI's Files API for fine-tuning data: ``/v1/files`` (upload, list, retrieve, delete, content).

Thin: every rule lives in :mod:`forgeline.finetune.files`. Everything is scoped to the
caller's org; uploading and deleting need the ``trainer`` role, reading needs any key.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, cast

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field

from forgeline.control.auth import caller
from forgeline.finetune.files import FileStore
from forgeline.finetune.service import FineTuning
from registry.keys import KeyRecord

router = APIRouter(prefix="/v1/files", tags=["files"])


class FileOut(BaseModel):
    """OpenAI's ``file`` object."""

    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str
    status_details: str | None = None
    expires_at: int | None = None


class FileListOut(BaseModel):
    """OpenAI's cursor page of files."""

    object: Literal["list"] = "list"
    data: list[FileOut]
    has_more: bool
    first_id: str | None
    last_id: str | None


class FileDeletedOut(BaseModel):
    """OpenAI's answer to a delete."""

    id: str
    object: Literal["file"] = "file"
    deleted: bool
    retained_by: list[str] = Field(
        default_factory=list,
        description="Fine-tuning jobs that still need the file: each keeps its copy in its job folder until it "
        "finishes, then the copy is removed. Every other copy is gone.",
    )


def file_store(request: Request) -> FileStore:
    """The app's file store."""
    return cast(FileStore, request.app.state.files)


def _out(data: dict[str, Any]) -> FileOut:
    return FileOut.model_validate(data)


@router.post("")
def create_file(
    request: Request,
    file: Annotated[UploadFile, File(description="JSONL of one OpenAI fine-tuning format.")],
    purpose: Annotated[str, Form(description="`fine-tune`.")],
    key: KeyRecord = Depends(caller),
) -> FileOut:
    """Upload a fine-tuning file; it is checked line by line before it is kept."""
    record = file_store(request).create(
        org=key.org, actor=key.name, filename=file.filename or "", purpose=purpose, stream=file.file
    )
    return _out(record.to_openai())


@router.get("")
def list_files(
    request: Request,
    after: Annotated[str | None, Query(description="A file id; the page starts after it.")] = None,
    limit: Annotated[int, Query(ge=1, le=10000, description="Page size.")] = 10000,
    order: Annotated[Literal["asc", "desc"], Query(description="By creation time.")] = "desc",
    purpose: Annotated[str | None, Query(description="Only files of this purpose.")] = None,
    key: KeyRecord = Depends(caller),
) -> FileListOut:
    """The org's files."""
    page, has_more = file_store(request).list(key.org, purpose=purpose, after=after, limit=limit, order=order)
    return FileListOut(
        data=[_out(r.to_openai()) for r in page],
        has_more=has_more,
        first_id=page[0].id if page else None,
        last_id=page[-1].id if page else None,
    )


@router.get("/{file_id}")
def retrieve_file(file_id: str, request: Request, key: KeyRecord = Depends(caller)) -> FileOut:
    """One file's metadata."""
    return _out(file_store(request).get(key.org, file_id).to_openai())


@router.delete("/{file_id}")
def delete_file(file_id: str, request: Request, key: KeyRecord = Depends(caller)) -> FileDeletedOut:
    """Delete a file and its copies in job folders (its metadata stays in the audit trail)."""
    service = cast(FineTuning, request.app.state.fine_tuning)
    record, retained = service.delete_file(key.org, file_id)
    return FileDeletedOut(id=record.id, deleted=True, retained_by=retained)


@router.get("/{file_id}/content", response_class=FileResponse)
def file_content(file_id: str, request: Request, key: KeyRecord = Depends(caller)) -> FileResponse:
    """The file's bytes, exactly as uploaded."""
    store = file_store(request)
    record = store.get(key.org, file_id)
    return FileResponse(store.path(key.org, file_id), media_type="application/octet-stream", filename=record.filename)
