"""Render every error as an OpenAI error body: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from registry.errors import ErrorCode, ForgelineError
from serving.gateway.protocol import ErrorInfo, ErrorResponse

logger = logging.getLogger(__name__)

# OpenAI's `type` for each status; model_not_found is an invalid_request_error in OpenAI too.
_ERROR_TYPE = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


def error_type(status: int) -> str:
    """OpenAI error ``type`` for an HTTP status."""
    return _ERROR_TYPE.get(status, "server_error" if status >= 500 else "invalid_request_error")


def error_body(message: str, status: int, *, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """The JSON body of an OpenAI-shaped error."""
    info = ErrorInfo(message=message, type=error_type(status), param=param, code=code)
    return ErrorResponse(error=info).model_dump()


class _ErrorJSONResponse(JSONResponse):
    # Messages quote what the client sent; ASCII escapes keep any echoed text encodable.
    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def error_response(message: str, status: int, *, param: str | None = None, code: str | None = None) -> JSONResponse:
    """An OpenAI-shaped error response."""
    return _ErrorJSONResponse(error_body(message, status, param=param, code=code), status_code=status)


def forgeline_error_body(exc: ForgelineError) -> dict[str, Any]:
    """The OpenAI error body for a `ForgelineError` (also used inside SSE streams)."""
    return error_body(exc.message, exc.http_status, param=exc.param, code=exc.code)


def _field_path(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or None


def _given(value: Any) -> str:
    # Echo short scalar inputs so the client sees what was refused (ascii(): escaped, encodable).
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return ""
    text = ascii(value)
    return f" (got {text})" if len(text) <= 80 else f" (got {text[:77]}...)"


def _validation_message(error: dict[str, Any]) -> str:
    message = str(error.get("msg", "invalid value"))
    # Our own validators raise ValueError; pydantic prefixes those with "Value error, ".
    return message.removeprefix("Value error, ")


def forgeline_error_response(exc: ForgelineError) -> JSONResponse:
    """The OpenAI-shaped response for a `ForgelineError` (with ``Retry-After`` when it has one)."""
    response = _ErrorJSONResponse(forgeline_error_body(exc), status_code=exc.http_status)
    retry_after = getattr(exc, "retry_after_header", None)
    if retry_after:
        response.headers["Retry-After"] = retry_after
    return response


async def _on_forgeline_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ForgelineError)
    if exc.http_status >= 500:
        logger.error("%s %s failed: %s", request.method, request.url.path, exc.message)
    return forgeline_error_response(exc)


async def _on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    for error in errors:
        if error.get("type") == "json_invalid":
            detail = (error.get("ctx") or {}).get("error", "")
            return error_response(
                f"We could not parse the JSON body of your request ({detail}). "
                "The body must be a JSON object with Content-Type: application/json.",
                400,
                code=ErrorCode.INVALID_REQUEST,
            )
        if error.get("type") == "missing" and tuple(error.get("loc", ())) == ("body",):
            return error_response(
                "the request body is missing; send a JSON object", 400, code=ErrorCode.INVALID_REQUEST
            )
    first = errors[0] if errors else {}
    param = _field_path(tuple(first.get("loc", ())))
    lines = []
    for error in errors:
        path = _field_path(tuple(error.get("loc", ()))) or "body"
        if error.get("type") == "extra_forbidden":
            lines.append(f"Unrecognized request argument supplied: {path}")
        else:
            lines.append(f"{path}: {_validation_message(error)}{_given(error.get('input'))}")
    return error_response("; ".join(lines), 400, param=param, code=ErrorCode.INVALID_REQUEST)


def too_large_message(limit: int) -> str:
    """The 413 message."""
    return f"The request body is larger than this server accepts ({limit} bytes); shorten the prompt."


async def _on_http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404:
        message = f"Invalid URL ({request.method} {request.url.path})"
        code = ErrorCode.NOT_FOUND
    elif exc.status_code == 413:
        message = too_large_message(getattr(request.app.state, "max_body_bytes", 0))
        code = ErrorCode.PAYLOAD_TOO_LARGE
    else:
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        code = None
    response = error_response(message, exc.status_code, code=code)
    if exc.headers:
        response.headers.update(exc.headers)
    return response


async def _on_unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    # The one catch-all: log the traceback (a bug), answer in OpenAI shape without details.
    logger.exception("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
    return error_response("The server had an error while processing your request.", 500, code=ErrorCode.INTERNAL)


ERROR_STATUS_MEANING: dict[int, str] = {
    400: "Invalid request: a field failed validation (never 422); `error.param` names it.",
    401: "No API key, or an unknown, revoked or expired one.",
    403: "The key lacks the role or the model scope the operation needs.",
    404: "No such model, version, file or job (or not visible to this key).",
    409: "Refused by the promotion policy, or a conflicting change happened first.",
    413: "The request body is over the server's limit.",
    429: "The key's request or token quota is spent; retry after `Retry-After` seconds.",
    503: "Not ready: the model is loading, draining or the engine is saturated.",
}


def document_errors(app: FastAPI, statuses: dict[str, tuple[int, ...]]) -> None:
    """Make ``app.openapi()`` describe the errors the app really answers.

    FastAPI documents 422 for validation errors; our handlers answer 400 with an OpenAI
    error body. This swaps 422 for 400 on every operation and adds the listed statuses.

    Args:
        app: the app whose schema to fix.
        statuses: per HTTP method (``"GET"``, ``"POST"``...; ``"*"`` for all), the error
            statuses its ``/v1`` operations can answer besides 400.
    """
    original = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = original()
        schemas = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in (ErrorInfo, ErrorResponse):
            schemas[model.__name__] = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.pop("HTTPValidationError", None)
        schemas.pop("ValidationError", None)
        error_ref = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
        for path, operations in schema.get("paths", {}).items():
            for method, operation in operations.items():
                responses = operation.setdefault("responses", {})
                validated = responses.pop("422", None) is not None
                wanted = set(statuses.get("*", ())) | set(statuses.get(method.upper(), ()))
                if validated:
                    wanted.add(400)
                if not path.startswith("/v1"):
                    wanted &= {400}
                for status in sorted(wanted):
                    responses.setdefault(str(status), {"description": ERROR_STATUS_MEANING[status], **error_ref})
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def install_error_handlers(app: FastAPI) -> None:
    """Register the OpenAI-shaped error handlers on ``app``."""
    app.add_exception_handler(ForgelineError, _on_forgeline_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_unexpected_error)
