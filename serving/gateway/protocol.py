"""OpenAI wire models for chat completions, completions and models.

Requests forbid unknown top-level fields, as OpenAI does ("Unrecognized request
argument"), but declare every field the ``openai`` SDK can send, so any SDK call is
accepted or refused with a message that names the field. Fields we cannot honour yet
(tools, logprobs, penalties, ...) are accepted at their neutral value and refused
otherwise: silently ignoring them would return something the client did not ask for.
Nested objects (messages, content parts) ignore extra keys because the SDK echoes
assistant messages back with response-only fields such as ``refusal`` and ``annotations``.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

logger = logging.getLogger(__name__)

FinishReason = Literal["stop", "length"]


def _unsupported(name: str, value: Any, neutral: tuple[Any, ...] = (None,)) -> Any:
    # An empty list (``tools=[]``) asks for nothing, like None.
    if value not in neutral and value != []:
        raise ValueError(f"`{name}` is not supported by this server yet; leave it unset")
    return value


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="Public model id, alias (`name@production`) or `name:adapter`.")
    max_tokens: int | None = Field(default=None, gt=0, description="Most tokens to generate.")
    temperature: float | None = Field(default=None, ge=0, le=2, description="0 is greedy; default 1.")
    top_p: float | None = Field(default=None, gt=0, le=1, description="Nucleus sampling mass; default 1.")
    n: int | None = Field(default=None, description="Number of choices; only 1 is supported.")
    stop: str | list[str] | None = Field(default=None, description="Up to 4 strings that end generation.")
    seed: int | None = Field(default=None, description="Seed for reproducible sampling.")
    stream: bool | None = Field(default=False, description="Stream server-sent events.")
    stream_options: StreamOptions | None = Field(default=None, description="Options for streaming.")
    user: str | None = Field(default=None, description="End-user id; accepted and ignored.")
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, int] | None = None

    @field_validator("n")
    @classmethod
    def _only_one_choice(cls, value: int | None) -> int | None:
        if value not in (None, 1):
            raise ValueError("only n=1 is supported")
        return value

    @field_validator("stop")
    @classmethod
    def _at_most_four_stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop sequences are allowed")
        return value

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def _no_penalties(cls, value: float | None, info: ValidationInfo) -> float | None:
        return _unsupported(str(info.field_name), value, (None, 0, 0.0))

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, value: dict[str, int] | None) -> dict[str, int] | None:
        return None if not value else _unsupported("logit_bias", value)

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> _Request:
        if self.stream_options is not None and not self.stream:
            raise ValueError("`stream_options` is only allowed when `stream` is true")
        return self

    def stop_list(self) -> list[str]:
        """``stop`` as a list."""
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        """Whether a streamed response ends with a usage chunk."""
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool | None = Field(default=None, description="Send a final chunk with token usage.")
    include_obfuscation: bool | None = Field(default=None, description="Accepted and ignored (no obfuscation).")


# -- chat completions -------------------------------------------------------------------


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _text_parts_only(cls, value: str | list[ContentPart] | None) -> str | list[ContentPart] | None:
        if isinstance(value, list):
            for part in value:
                if part.type != "text" or part.text is None:
                    raise ValueError(f"content parts of type `{part.type}` are not supported; send text parts only")
        return value

    def text(self) -> str:
        """The message content as one string (text parts joined)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text or "" for part in self.content)


class ChatCompletionRequest(_Request):
    """``POST /v1/chat/completions`` body."""

    messages: list[ChatMessage] = Field(min_length=1, description="The conversation so far.")
    max_completion_tokens: int | None = Field(default=None, gt=0, description="Newer name for `max_tokens`; wins.")
    # Accepted at their neutral value only; see the module docstring.
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    audio: dict[str, Any] | None = None
    modalities: list[str] | None = None
    prediction: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None
    # Accepted and ignored: they do not change what the model generates here.
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_options: dict[str, Any] | None = None
    prompt_cache_retention: str | None = None
    safety_identifier: str | None = None
    moderation: dict[str, Any] | None = None

    @field_validator("tools", "functions", "audio", "prediction", "web_search_options")
    @classmethod
    def _no_tools(cls, value: Any, info: ValidationInfo) -> Any:
        return _unsupported(str(info.field_name), value)

    @field_validator("tool_choice", "function_call")
    @classmethod
    def _no_tool_choice(cls, value: Any, info: ValidationInfo) -> Any:
        return _unsupported(str(info.field_name), value, (None, "none", "auto"))

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: bool | None) -> bool | None:
        return _unsupported("logprobs", value, (None, False))

    @field_validator("top_logprobs")
    @classmethod
    def _no_top_logprobs(cls, value: int | None) -> int | None:
        return _unsupported("top_logprobs", value, (None, 0))

    @field_validator("response_format")
    @classmethod
    def _text_format_only(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and value.get("type") != "text":
            raise ValueError("only response_format type `text` is supported")
        return value

    @field_validator("modalities")
    @classmethod
    def _text_modality_only(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and set(value) - {"text"}:
            raise ValueError("only the `text` modality is supported")
        return value

    @property
    def requested_max_tokens(self) -> int | None:
        """``max_completion_tokens`` if given, else ``max_tokens``."""
        return self.max_completion_tokens or self.max_tokens


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> UsageInfo:
        """Usage with the total derived from its parts."""
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: str | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatResponseMessage
    finish_reason: FinishReason
    logprobs: None = None


def _new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: _new_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatStreamChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    finish_reason: FinishReason | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


# -- completions ------------------------------------------------------------------------


class CompletionRequest(_Request):
    """``POST /v1/completions`` body."""

    prompt: str | list[str] = Field(description="The prompt; a list must hold exactly one string.")
    max_tokens: int | None = Field(default=16, gt=0, description="Most tokens to generate; OpenAI's default is 16.")
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None
    logprobs: int | None = None
    # The extension trtllm-serve and vLLM take: a gateway relaying to a `forgeline worker` sends the model's stop ids.
    stop_token_ids: list[Annotated[int, Field(ge=0, le=2**31 - 1)]] | None = Field(
        default=None, max_length=64, description="Token ids that end generation, besides the model's own stop tokens."
    )

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("exactly one prompt is supported per request")
        return value

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value: bool | None) -> bool | None:
        return _unsupported("echo", value, (None, False))

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        return _unsupported("suffix", value, (None, ""))

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, value: int | None) -> int | None:
        if value not in (None, 1):
            raise ValueError("only best_of=1 is supported")
        return value

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: int | None) -> int | None:
        return _unsupported("logprobs", value)

    def prompt_text(self) -> str:
        """The single prompt string."""
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: FinishReason | None = None
    logprobs: None = None


class CompletionResponse(BaseModel):
    """Both the non-streaming response and each streamed chunk (same shape in OpenAI)."""

    id: str = Field(default_factory=lambda: _new_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


# -- models -----------------------------------------------------------------------------


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "forgeline"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# -- errors -----------------------------------------------------------------------------


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


_Request.model_rebuild()
ChatCompletionRequest.model_rebuild()
CompletionRequest.model_rebuild()
