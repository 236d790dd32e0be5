"""The registry of base-classifier architectures: `@register_model(name)` on a factory."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

ModelFactory = Callable[..., nn.Module]

# Each factory takes (num_classes, in_channels); build_model puts the dataset's standardisation
# in front, so the whole model reads [0,1] pixels and sigma and radii are in pixel units.
MODELS: dict[str, ModelFactory] = {}


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Register the decorated factory `(num_classes, in_channels) -> nn.Module` as `name`."""

    def register(factory: ModelFactory) -> ModelFactory:
        if name in MODELS:
            raise ValueError(f"model {name!r} is already registered")
        MODELS[name] = factory
        return factory

    return register


def list_models() -> list[str]:
    """The registered architectures' names, in registration order (`smoothcert models`)."""
    return list(MODELS)
