"""MLflow's exceptions translated into the ``ForgelineError`` family, in one table.

Every registry call that talks to MLflow maps its ``MlflowException`` here, so callers
above ``registry/`` see forgeline's codes (and HTTP statuses) and never MLflow's.
"""

from __future__ import annotations

from mlflow.exceptions import MlflowException

from registry.errors import ConflictError, ErrorCode, ForgelineError, NotFoundError


def error_code(exc: MlflowException) -> str:
    """MLflow's error code name (``RESOURCE_DOES_NOT_EXIST``, …); empty when it has none."""
    return str(getattr(exc, "error_code", ""))


def is_missing(exc: MlflowException) -> bool:
    """Whether MLflow says the thing asked for does not exist."""
    return error_code(exc) == "RESOURCE_DOES_NOT_EXIST"


def translate(exc: MlflowException, context: str, *, param: str | None = None) -> ForgelineError:
    """Map an MLflow exception onto the forgeline error family (one table, like MLflow's)."""
    code = error_code(exc)
    message = f"{context}: {exc.message if hasattr(exc, 'message') else exc}"
    if code == "RESOURCE_DOES_NOT_EXIST":
        return NotFoundError(message, param=param)
    if code == "RESOURCE_ALREADY_EXISTS":
        return ConflictError(message, param=param)
    if code in ("INVALID_PARAMETER_VALUE", "BAD_REQUEST", "INVALID_STATE"):
        return ForgelineError(message, code=ErrorCode.INVALID_REQUEST, param=param)
    if code in ("TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"):
        return ForgelineError(message, code=ErrorCode.UNAVAILABLE, param=param)
    return ForgelineError(message, code=ErrorCode.INTERNAL, param=param)
