"""Engines: the seam the gateway speaks (`Engine`) and its implementations."""

from serving.engine.base import Chunk, Engine, SamplingParams

__all__ = ["Chunk", "Engine", "SamplingParams"]
