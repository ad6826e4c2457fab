"""The DeepSpeed configs that ship with ds-mtp; README.md here says which to pick.

They are package data (pyproject.toml), read with ``importlib.resources``, so ``ds-mtp train`` finds
its default config after a plain ``pip install .`` as well as in a source checkout.
"""

from __future__ import annotations

from importlib import resources
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable


def shipped(name: str) -> Traversable:
    """The shipped config ``name`` (e.g. "zero3.json"): a file that supports ``is_file`` and ``read_text``."""
    return resources.files(__name__) / name
