"""Which engine serves which public model name."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from registry.errors import ConflictError, ModelNotFoundError
from serving.engine.base import Engine

logger = logging.getLogger(__name__)


@dataclass
class ServedModel:
    """A model version the gateway serves.

    Attributes:
        name: the public model id clients send, e.g. ``quickstart`` or ``quickstart@production``.
        version: the registry version it is (shown in ``x-forgeline-model-version``).
        engine: what generates for it.
        aliases: further names that resolve to it (``quickstart@production``, ``quickstart@1``).
        artifact: the engine artifact it was built into, for lineage headers.
        created: Unix time shown in ``/v1/models``.
    """

    name: str
    version: str
    engine: Engine
    aliases: tuple[str, ...] = ()
    artifact: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def names(self) -> tuple[str, ...]:
        """The name followed by every alias."""
        return (self.name, *self.aliases)


class ModelCatalog(Protocol):
    """Resolves the ``model`` a client sends to a `ServedModel`."""

    def resolve(self, model: str) -> ServedModel:
        """The served model for ``model``; raises `ModelNotFoundError` when there is none."""
        ...

    def list(self) -> list[ServedModel]:
        """Every served model, once each."""
        ...


def model_not_found(model: str) -> ModelNotFoundError:
    """The error OpenAI returns for an unknown model, with our code."""
    return ModelNotFoundError(f"The model `{model}` does not exist or you do not have access to it.", param="model")


class StaticCatalog:
    """A fixed, dict-backed catalog: each served model is reachable by its name and aliases.

    Args:
        models: the served models; two may not share a name or alias.
    """

    def __init__(self, models: Iterable[ServedModel] = ()) -> None:
        self._by_name: dict[str, ServedModel] = {}
        self._models: list[ServedModel] = []
        for model in models:
            self.add(model)

    def add(self, model: ServedModel) -> None:
        """Serve ``model`` under its name and aliases.

        Raises:
            ConflictError: one of its names is already taken.
        """
        taken = [n for n in model.names if n in self._by_name]
        if taken:
            raise ConflictError(f"model name(s) already served: {', '.join(taken)}", param="name")
        for name in model.names:
            self._by_name[name] = model
        self._models.append(model)

    def resolve(self, model: str) -> ServedModel:
        """The served model for ``model``; raises `ModelNotFoundError` when there is none."""
        try:
            return self._by_name[model]
        except KeyError:
            raise model_not_found(model) from None

    def list(self) -> list[ServedModel]:
        """Every served model, once each, in the order added."""
        return list(self._models)
