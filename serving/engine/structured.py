"""The capability an engine declares to serve structured output: JSON schemas and tool calls.

The gateway checks for it (``isinstance(engine, StructuredEngine)``) and refuses
``response_format`` and ``tools`` with a 400 on engines without it, so an engine that
cannot constrain its output never silently returns free text to a request that asked for a schema.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from serving.engine.grammar import GuideCompiler
from serving.engine.tool_formats import ToolFormat


@runtime_checkable
class StructuredEngine(Protocol):
    """An `Engine` that constrains generation through `SamplingParams.guide` and renders tools."""

    def guide_compiler(self) -> GuideCompiler:
        """Compiles schemas and grammars into guides for this engine's vocabulary."""
        ...

    def tool_format(self, adapter: str | None = None) -> ToolFormat | None:
        """How the model (or ``adapter``) writes tool calls; None when its chat template renders no tools."""
        ...

    def render_chat(
        self, messages: list[dict[str, Any]], *, adapter: str | None = None, tools: list[dict[str, Any]] | None = None
    ) -> str:
        """`Engine.render_chat`, with OpenAI function definitions passed to the chat template."""
        ...
