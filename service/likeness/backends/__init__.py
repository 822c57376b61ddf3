"""Backends: the only modules that import torch, diffusers, insightface, faiss or open_clip.

Each backend family keeps a small registry (name -> loader) and is chosen by
config; :func:`choose` turns an unknown name into an :class:`InvalidInput`
listing the valid ones. This package's ``__init__`` stays import-light so that
``import likeness.backends.faces`` does not drag diffusers in, and vice versa.
"""

from __future__ import annotations

from typing import Mapping, TypeVar

from likeness.errors import InvalidInput

T = TypeVar("T")


def choose(registry: Mapping[str, T], name: str, what: str) -> T:
    """``registry[name]``, or InvalidInput naming the valid choices for ``what``."""
    try:
        return registry[name]
    except KeyError:
        valid = ", ".join(repr(n) for n in sorted(registry))
        raise InvalidInput(f"unknown {what} backend {name!r}; use one of {valid}") from None
