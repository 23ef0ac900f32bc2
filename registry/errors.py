"""The one forgeline error family.

Every error carries a stable ``code``; the gateway and control plane map codes to HTTP
status in ``HTTP_STATUS`` (one table, like MLflow's ``ErrorCode``), and the CLI prints
``str(error)`` as one line. It lives in ``registry`` because that is the bottom layer:
training, serving and the ``forgeline`` entry package all import it.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class ErrorCode:
    INVALID_CONFIG = "invalid_config"
    INVALID_REQUEST = "invalid_request"
    NOT_FOUND = "not_found"
    MODEL_NOT_FOUND = "model_not_found"
    POLICY_REFUSED = "policy_refused"
    CONFLICT = "conflict"
    UNAUTHENTICATED = "invalid_api_key"
    FORBIDDEN = "permission_denied"
    RATE_LIMITED = "rate_limit_exceeded"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    UNAVAILABLE = "unavailable"
    MISSING_DEPENDENCY = "missing_dependency"
    INTERNAL = "internal_error"


HTTP_STATUS: dict[str, int] = {
    ErrorCode.INVALID_CONFIG: 400,
    ErrorCode.INVALID_REQUEST: 400,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.MODEL_NOT_FOUND: 404,
    ErrorCode.POLICY_REFUSED: 409,
    ErrorCode.CONFLICT: 409,
    ErrorCode.UNAUTHENTICATED: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.PAYLOAD_TOO_LARGE: 413,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.MISSING_DEPENDENCY: 500,
    ErrorCode.INTERNAL: 500,
}


class ForgelineError(Exception):
    """Base of every error forgeline raises on purpose.

    Args:
        message: one line for a person: what is wrong and how to fix it.
        code: a stable ``ErrorCode`` value.
        param: the offending field, when there is one (rendered as OpenAI's ``param``).
    """

    code: str = ErrorCode.INTERNAL

    def __init__(self, message: str, *, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.param = param

    @property
    def http_status(self) -> int:
        return HTTP_STATUS.get(self.code, 500)


@dataclass(frozen=True)
class FieldProblem:
    """One problem in a user-written config: where, what was given, how to fix it."""

    path: str
    message: str
    value: object = None
    fix: str | None = None

    def __str__(self) -> str:
        text = f"{self.path}: {self.message}"
        if self.value is not None:
            text += f" (got {self.value!r})"
        if self.fix:
            text += f"; fix: {self.fix}"
        return text


@dataclass
class ConfigError(ForgelineError):
    """A user-written config (recipe, policy, request) has one or more problems.

    All problems are reported at once, each on its own line.
    """

    problems: list[FieldProblem] = field(default_factory=list)
    source: str = "config"

    def __post_init__(self) -> None:
        lines = [f"{self.source} has {len(self.problems)} problem(s):"]
        lines += [f"  - {p}" for p in self.problems]
        first = self.problems[0].path if self.problems else None
        ForgelineError.__init__(self, "\n".join(lines), code=ErrorCode.INVALID_CONFIG, param=first)

    def __str__(self) -> str:
        return self.message


class NotFoundError(ForgelineError):
    code = ErrorCode.NOT_FOUND


class ModelNotFoundError(ForgelineError):
    code = ErrorCode.MODEL_NOT_FOUND


class PolicyRefused(ForgelineError):
    code = ErrorCode.POLICY_REFUSED
    # Every gate's verdict (``PolicyResult.to_dict()``), set by ``registry.promotion.promote``.
    policy_result: dict[str, object] | None = None


class ConflictError(ForgelineError):
    code = ErrorCode.CONFLICT


class MissingDependencyError(ForgelineError):
    code = ErrorCode.MISSING_DEPENDENCY


class AuthenticationError(ForgelineError):
    """No API key, or an unknown, revoked or expired one (HTTP 401)."""

    code = ErrorCode.UNAUTHENTICATED


class PermissionDeniedError(ForgelineError):
    """A valid caller without the role or scope the operation needs (HTTP 403)."""

    code = ErrorCode.FORBIDDEN
