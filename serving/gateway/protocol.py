"""OpenAI wire models for chat completions, completions and models.

Requests forbid unknown top-level fields, as OpenAI does ("Unrecognized request
argument"), but declare every field the ``openai`` SDK can send, so any SDK call is
accepted or refused with a message that names the field. Which fields take effect depends
on the engine that answers, known only once the model is resolved: a chat request that
passes through to workers that speak chat keeps every field (tools, JSON schema, logprobs,
``n``, penalties, ...); an engine of our own refuses, with a 400 naming each field, what it
cannot honour (`unsupported_fields`; chat ``logprobs`` and ``n`` it does): silently ignoring
it would return something the client did not ask for. Nested objects (messages, content
parts) keep extra keys, so they pass through too (the SDK echoes assistant messages back
with ``refusal`` and the like).
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from registry.errors import ErrorCode, ForgelineError
from serving.engine.base import TokenLogprobs

logger = logging.getLogger(__name__)

FinishReason = Literal["stop", "length", "tool_calls"]

MAX_CHOICES = 8
"""Most choices (``n``) an engine of our own generates for one chat request."""


def _set(value: Any, neutral: tuple[Any, ...] = (None,)) -> bool:
    # An empty list or mapping (``tools=[]``, ``metadata={}``) asks for nothing, like None.
    return value not in neutral and value != [] and value != {}



SSE_EVENT_SCHEMA: dict[str, object] = {
    "type": "object",
    "description": "One server-sent event: `data` is a JSON chunk, or `[DONE]` last.",
    "properties": {"data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"}},
    "required": ["data"],
}
"""The OpenAPI schema of each event of a ``stream: true`` answer (``text/event-stream``)."""

def _refuse(fields: list[str], model: str) -> None:
    """Raise a 400 naming ``fields``, which the engine serving ``model`` cannot honour (if any)."""
    if fields:
        names = ", ".join(f"`{f}`" for f in fields)
        raise ForgelineError(
            f"{names} {'is' if len(fields) == 1 else 'are'} not supported by the engine serving `{model}`; "
            f"leave {'it' if len(fields) == 1 else 'them'} unset or at the default",
            code=ErrorCode.INVALID_REQUEST,
            param=fields[0],
        )


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="Public model id, alias (`name@production`) or `name:adapter`.")
    max_tokens: int | None = Field(default=None, gt=0, description="Most tokens to generate.")
    temperature: float | None = Field(default=None, ge=0, le=2, description="0 is greedy; default 1.")
    top_p: float | None = Field(default=None, gt=0, le=1, description="Nucleus sampling mass; default 1.")
    n: int | None = Field(default=None, ge=1, le=128, description="Number of choices.")
    stop: str | list[str] | None = Field(default=None, description="Up to 4 strings that end generation.")
    seed: int | None = Field(default=None, description="Seed for reproducible sampling.")
    stream: bool | None = Field(default=False, description="Stream server-sent events.")
    stream_options: StreamOptions | None = Field(default=None, description="Options for streaming.")
    user: str | None = Field(default=None, description="End-user id; accepted and ignored.")
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, int] | None = None

    @field_validator("stop")
    @classmethod
    def _at_most_four_stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop sequences are allowed")
        return value

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> _Request:
        if self.stream_options is not None and not self.stream:
            raise ValueError("`stream_options` is only allowed when `stream` is true")
        return self

    def unsupported_fields(self, *, logprobs: bool = True) -> list[str]:
        """Fields set to something an engine of our own cannot do (it generates one plain choice);
        ``logprobs``: whether the engine reports log-probabilities (subclasses that accept them)."""
        fields = [name for name in ("frequency_penalty", "presence_penalty") if _set(getattr(self, name), (None, 0, 0.0))]
        if _set(self.n, (None, 1)):
            fields.insert(0, "n")
        if _set(self.logit_bias):
            fields.append("logit_bias")
        return fields

    def refuse_unsupported(self, model: str, *, logprobs: bool = True) -> None:
        """Raise a 400 naming every field ``model``'s engine cannot honour.

        Args:
            model: the model named in messages.
            logprobs: whether ``model``'s engine reports log-probabilities.

        Raises:
            ForgelineError: ``invalid_request`` with ``param`` the first such field.
        """
        _refuse(self.unsupported_fields(logprobs=logprobs), model)

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
    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    def unsupported_fields(self, *, structured: bool = False) -> list[str]:
        """What an engine of our own cannot take from this message (``structured``: one that renders tool calls)."""
        names = ("name",) if structured else ("name", "tool_calls")
        fields = [name for name in names if _set(getattr(self, name)) and not (name == "name" and self.role == "tool")]
        if isinstance(self.content, list) and any(p.type != "text" or p.text is None for p in self.content):
            fields.append("content")
        return fields

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
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: dict[str, Any] | None = None
    audio: dict[str, Any] | None = None
    modalities: list[str] | None = None
    prediction: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None
    # Tags a stored completion; without `store` (refused) it changes nothing, as at OpenAI.
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_options: dict[str, Any] | None = None
    prompt_cache_retention: str | None = None
    # Accepted and ignored: identifiers for abuse monitoring; they change nothing generated.
    safety_identifier: str | None = None
    moderation: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("`top_logprobs` requires `logprobs` to be true; set `logprobs: true`")
        return self

    def unsupported_fields(self, *, logprobs: bool = True, structured: bool = False) -> list[str]:
        """Fields an engine of our own cannot honour (see `_Request.unsupported_fields`).

        Unlike completions, chat takes ``n`` up to `MAX_CHOICES` (see `refuse_unsupported`),
        and ``logprobs`` / ``top_logprobs`` where the engine reports them (``logprobs``);
        ``tools``, ``tool_choice``, assistant ``tool_calls`` and a JSON ``response_format``
        where it constrains and parses output (``structured``, see `serving.gateway.structured`).
        """
        fields = [f for f in super().unsupported_fields() if f != "n"]
        if not logprobs:
            fields += [f for f in ("logprobs", "top_logprobs") if _set(getattr(self, f), (None, False, 0))]
        neutral: dict[str, tuple[Any, ...]] = {
            "tool_choice": (None, "none", "auto"),
            "function_call": (None, "none", "auto"),
            "store": (None, False),
            "service_tier": (None, "auto", "default"),
            "parallel_tool_calls": (None, True, False),
        }
        for name in (
            *(() if structured else ("tools", "tool_choice")), "functions", "function_call", "audio",
            "prediction", "web_search_options", "store", "service_tier", "reasoning_effort",
            "verbosity", "prompt_cache_key", "prompt_cache_options", "prompt_cache_retention",
        ):
            if _set(getattr(self, name), neutral.get(name, (None,))):
                fields.append(name)
        if not structured and self.response_format is not None and self.response_format.get("type") != "text":
            fields.append("response_format")
        if self.modalities is not None and set(self.modalities) - {"text"}:
            fields.append("modalities")
        for i, message in enumerate(self.messages):
            fields += [f"messages[{i}].{name}" for name in message.unsupported_fields(structured=structured)]
        return fields

    def refuse_unsupported(self, model: str, *, logprobs: bool = True, structured: bool = False) -> None:
        """As `_Request.refuse_unsupported`, and refuse more than `MAX_CHOICES` choices.

        Args:
            model: the model named in messages.
            logprobs: whether ``model``'s engine reports log-probabilities.
            structured: whether it serves tools and JSON response formats.

        Raises:
            ForgelineError: ``invalid_request`` naming the first field ``model``'s engine cannot honour.
        """
        _refuse(self.unsupported_fields(logprobs=logprobs, structured=structured), model)
        if self.choices > MAX_CHOICES:
            raise ForgelineError(
                f"n is {self.n}, but the engine serving `{model}` generates at most {MAX_CHOICES} choices "
                "per request; lower `n` or send several requests",
                code=ErrorCode.INVALID_REQUEST,
                param="n",
            )

    @property
    def choices(self) -> int:
        """How many choices to generate (``n``, default 1)."""
        return self.n or 1

    @property
    def top_logprobs_wanted(self) -> int | None:
        """Alternatives to report per token: None without ``logprobs``, else ``top_logprobs`` (default 0)."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def passthrough_body(self) -> dict[str, Any]:
        """The request as the client sent it (unset fields left out), for a worker that speaks chat."""
        return self.model_dump(mode="json", exclude_unset=True)

    @property
    def requested_max_tokens(self) -> int | None:
        """``max_completion_tokens`` if given, else ``max_tokens``."""
        return self.max_completion_tokens or self.max_tokens

    @property
    def max_tokens_field(self) -> str:
        """The name under which the client sent its token limit."""
        return "max_completion_tokens" if self.max_completion_tokens else "max_tokens"


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
    content: str | None
    refusal: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None
    refusal: list[ChatTokenLogprob] | None = None

    @classmethod
    def of(cls, reports: list[TokenLogprobs] | None) -> ChoiceLogprobs | None:
        """The wire form of an engine's per-token reports; None when none were asked for."""
        if reports is None:
            return None
        content = [
            ChatTokenLogprob(
                token=r.chosen.token,
                logprob=r.chosen.logprob,
                bytes=r.chosen.bytes,
                top_logprobs=[TopLogprob(token=t.token, logprob=t.logprob, bytes=t.bytes) for t in r.top],
            )
            for r in reports
        ]
        return cls(content=content)


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatResponseMessage
    finish_reason: FinishReason
    logprobs: ChoiceLogprobs | None = None


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
    tool_calls: list[dict[str, Any]] | None = None


class ChatStreamChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    finish_reason: FinishReason | None = None
    logprobs: ChoiceLogprobs | None = None


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
    logprobs: int | None = Field(
        default=None, ge=0, le=5, description="Report each token's logprob and this many alternatives."
    )
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

    def unsupported_fields(self, *, logprobs: bool = True) -> list[str]:
        """Fields our engines cannot honour on completions (see `_Request.unsupported_fields`).

        ``logprobs`` is honoured where the engine reports log-probabilities (``logprobs``).
        """
        fields = super().unsupported_fields()
        for name, neutral in (("echo", (None, False)), ("suffix", (None, "")), ("best_of", (None, 1))):
            if _set(getattr(self, name), neutral):
                fields.append(name)
        if not logprobs and self.logprobs is not None:
            fields.append("logprobs")
        return fields

    def prompt_text(self) -> str:
        """The single prompt string."""
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class CompletionLogprobs(BaseModel):
    """The legacy completions shape: parallel lists, one entry per generated token.

    ``text_offset`` counts characters from the start of the completion (there is no echo).
    """

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)

    @classmethod
    def of(cls, reports: list[TokenLogprobs] | None, offset: int = 0) -> CompletionLogprobs | None:
        """The wire form of an engine's reports, offsets starting at ``offset``; None when none were asked for."""
        if reports is None:
            return None
        out = cls()
        for r in reports:
            out.tokens.append(r.chosen.token)
            out.token_logprobs.append(r.chosen.logprob)
            out.top_logprobs.append({t.token: t.logprob for t in r.top})
            out.text_offset.append(offset)
            offset += len(r.chosen.token)
        return out


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: FinishReason | None = None
    logprobs: CompletionLogprobs | None = None


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
