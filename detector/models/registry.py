"""Registry of named model variants."""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

__all__ = ["build_model", "list_models", "register_model"]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: registers ``fn`` under its ``__name__``."""
    name = fn.__name__
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is registered twice")
    _REGISTRY[name] = fn
    return fn


def list_models() -> list[str]:
    """Registered variant names, sorted."""
    return sorted(_REGISTRY)


def build_model(name: str, **overrides: Any) -> nn.Module:
    """Builds a registered variant; ``overrides`` replace fields of its config (e.g. ``input_size``)."""
    try:
        fn = _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; available: {', '.join(list_models())}") from None
    return fn(**overrides)
