"""Backends run a model forward pass and return its attention probabilities."""

from pipelines.backends.base import Backend, create_backend, resolve_device

__all__ = ["Backend", "create_backend", "resolve_device"]
