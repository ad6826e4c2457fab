"""World-model evaluation of a trained path model.

Every metric takes a ``PathModel`` (anything with ``logits`` and ``hidden`` below) and a
``ds_mtp.experiments.worlds.World`` (the ground truth: graph, tokenizer, held-out pairs). The real model and
the tests' fake models (oracles, uniform) all satisfy the protocol.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class PathModel(Protocol):
    """What evaluation needs from a model; both methods are causal and take a full batch of prefixes."""

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, T] int64 tokens -> [B, T, V] next-token logits at every position."""
        ...

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, T] int64 tokens -> [B, T, d] final (post-norm) hidden states."""
        ...


def model_device(model) -> torch.device:
    """Where to put input tokens (ds_mtp.generate.input_device: the model's ``device`` attribute, else its first
    parameter's, else CPU)."""
    from ds_mtp.generate import input_device

    return input_device(model)
