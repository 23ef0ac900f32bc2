"""The ``serve`` section of a recipe, also used by ``forgeline serve``."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ServeSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    engine: Literal["torch"] = Field(default="torch", description="Engine target; `torch` is the portable PyTorch engine.")
    host: str = Field(default="127.0.0.1", description="Interface the gateway listens on.")
    port: int = Field(default=8000, ge=0, le=65535, description="Port the gateway listens on (0 picks a free one).")
    max_batch_size: int = Field(default=16, gt=0, description="Most requests decoded together by the PyTorch engine.")
    batch_window_ms: float = Field(default=5.0, ge=0, description="How long the engine waits to gather a batch.")
    max_new_tokens: int = Field(default=256, gt=0, description="Default and upper bound for `max_tokens` per request.")
    device: str = Field(default="auto", description="Torch device for the engine: auto, cpu, cuda, cuda:N.")
