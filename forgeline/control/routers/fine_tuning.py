"""OpenAI's fine-tuning jobs API: ``/v1/fine_tuning/jobs`` (create, list, retrieve, cancel,
pause, resume, events, checkpoints).

Thin: the rules live in :mod:`forgeline.finetune.service`. Creating and controlling jobs
needs the ``trainer`` role; reading needs any key. Everything is scoped to the key's org.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, cast

from fastapi import APIRouter, Depends, Query, Request

from forgeline.control.auth import caller
from forgeline.finetune.protocol import CreateJobRequest, event_object, job_object, page
from forgeline.finetune.service import FineTuning
from registry.errors import ErrorCode, ForgelineError
from registry.keys import KeyRecord
from serving.gateway.json_body import loads_untrusted

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"])

Limit = Annotated[int, Query(ge=1, le=100, description="Items per page.")]
After = Annotated[str | None, Query(description="Cursor: the id of the last item of the previous page.")]


def fine_tuning(request: Request) -> FineTuning:
    """The app's fine-tuning service."""
    return cast(FineTuning, request.app.state.fine_tuning)


@router.post("")
def create_job(body: CreateJobRequest, request: Request, key: KeyRecord = Depends(caller)) -> dict[str, Any]:
    """Queue a fine-tuning job of an operator-configured base model on uploaded files."""
    return job_object(fine_tuning(request).create(body, key))


@router.get("")
def list_jobs(
    request: Request,
    after: After = None,
    limit: Limit = 20,
    metadata: Annotated[str | None, Query(description="JSON object; only jobs whose metadata holds these pairs.")] = None,
    key: KeyRecord = Depends(caller),
) -> dict[str, Any]:
    """The organisation's jobs, newest first."""
    wanted = _metadata_filter(request, metadata)
    jobs, more = fine_tuning(request).list(key, after=after, limit=limit, metadata=wanted)
    return page([job_object(j) for j in jobs], more)


def _metadata_filter(request: Request, raw: str | None) -> dict[str, str] | None:
    # The openai SDK sends `metadata[k]=v` query pairs; a JSON object is accepted too.
    pairs = {k[len("metadata["):-1]: v for k, v in request.query_params.items() if k.startswith("metadata[")}
    if raw:
        try:
            parsed = loads_untrusted(raw, what="metadata", root="metadata")
        except json.JSONDecodeError:
            parsed = None
        if not isinstance(parsed, dict):
            raise ForgelineError(f"metadata: {raw!r} is not a JSON object; fix: pass e.g. {{\"team\": \"legal\"}}",
                                 code=ErrorCode.INVALID_REQUEST, param="metadata")
        pairs.update({str(k): str(v) for k, v in parsed.items()})
    return pairs or None


@router.get("/{job_id}")
def retrieve_job(job_id: str, request: Request, key: KeyRecord = Depends(caller)) -> dict[str, Any]:
    return job_object(fine_tuning(request).get(job_id, key))


@router.post("/{job_id}/cancel")
def cancel_job(job_id: str, request: Request, key: KeyRecord = Depends(caller)) -> dict[str, Any]:
    """Stop the job for good; its training processes are stopped."""
    return job_object(fine_tuning(request).cancel(job_id, key))


@router.post("/{job_id}/pause")
def pause_job(job_id: str, request: Request, key: KeyRecord = Depends(caller)) -> dict[str, Any]:
    """Stop training, keep the checkpoints."""
    return job_object(fine_tuning(request).pause(job_id, key))


@router.post("/{job_id}/resume")
def resume_job(job_id: str, request: Request, key: KeyRecord = Depends(caller)) -> dict[str, Any]:
    """Continue a paused job from its newest complete checkpoint."""
    return job_object(fine_tuning(request).resume(job_id, key))


@router.get("/{job_id}/events")
def list_events(job_id: str, request: Request, after: After = None, limit: Limit = 20,
                key: KeyRecord = Depends(caller)) -> dict[str, Any]:
    """The job's events, newest first."""
    events, more = fine_tuning(request).events(job_id, key, after=after, limit=limit)
    return page([event_object(e) for e in events], more)


@router.get("/{job_id}/checkpoints")
def list_checkpoints(job_id: str, request: Request, after: After = None, limit: Limit = 10,
                     key: KeyRecord = Depends(caller)) -> dict[str, Any]:
    """Complete checkpoints still kept, newest first, with the metrics logged at their step."""
    items, more = fine_tuning(request).checkpoints(job_id, key, after=after, limit=limit)
    return page(items, more)
