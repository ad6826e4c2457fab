"""No code from data files: every pickle ds-mtp reads goes through torch's weights-only unpickler.

A ``torch.load(weights_only=False)`` runs whatever a file's pickle asks for (a ``__reduce__`` payload), so a
checkpoint copied from elsewhere could run code on ``ds-mtp export`` or ``--resume``. ds-mtp's own loads call
``load`` below; DeepSpeed's loaders, which pass ``weights_only=False`` themselves, run inside
``weights_only_torch_load`` (the engines' ``load_checkpoint``, ``zero_to_fp32`` in export, ``ds_to_universal``),
and the engines read through ``WeightsOnlyCheckpointEngine``. A refused file is one line naming it and the
global it asked for, exit 2; nothing from it ran.

What DeepSpeed 0.19.8 pickles beyond tensors and plain containers, found by loading with nothing allowed
the model_states and optim_states files of ZeRO-0/1/2/3 (fp32; ZeRO-1/3 in bf16) and pipeline checkpoints,
and of their universal conversion: its loss scaler (the scale is in the object's fields), the ZeRO stage
enum and the ``fragment_address`` named tuple of the optimizer's parameter slices. Only those classes are
allowed, by name, with ``torch.serialization.safe_globals``; they rebuild from their fields and run no code
of the file's. (The per-rank RNG files ``ds_mtp.train`` writes become tensors / JSON in its own change.)
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
from pathlib import Path

import torch

from ds_mtp.errors import UserError

DEEPSPEED_FILE_PATTERNS = ("*model_states.pt", "*optim_states.pt")
"""The files DeepSpeed writes into a checkpoint tag (layer_NN-model_states.pt of a pipeline included)."""


def deepspeed_checkpoint_globals() -> list:
    """The classes a DeepSpeed checkpoint pickles besides tensors, dicts, lists, tuples, sets and torch.Size."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def _refusal(path, error: pickle.UnpicklingError) -> UserError:
    found = re.search(r"GLOBAL (\S+)", str(error))
    what = f"it asks for {found[1]}" if found else str(error).strip().splitlines()[0]
    return UserError(f"{path} holds pickled code or objects ds-mtp does not load ({what}); refused, nothing in it "
                     "ran: a checkpoint must hold only tensors and plain data")


def load(path, map_location="cpu", mmap: bool = False):
    """``torch.load`` of ``path`` with the weights-only unpickler and DeepSpeed's few classes allowed."""
    original = _ORIGINAL_TORCH_LOAD
    try:
        with torch.serialization.safe_globals(deepspeed_checkpoint_globals()):
            return original(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise _refusal(path if isinstance(path, (str, os.PathLike)) else getattr(path, "name", "a stream"), e) from None


_ORIGINAL_TORCH_LOAD = torch.load


@contextlib.contextmanager
def weights_only_torch_load():
    """Within it, every ``torch.load`` (DeepSpeed's calls with ``weights_only=False`` included) is ``load``."""

    def guarded(f, map_location=None, pickle_module=None, *, weights_only=None, mmap=None, **kwargs):
        return load(f, map_location=map_location, mmap=bool(mmap))

    previous = torch.load  # nested uses restore what they found
    torch.load = guarded
    try:
        yield
    finally:
        torch.load = previous


def check_checkpoint_files(tag_dir: str | Path) -> None:
    """Refuse a checkpoint tag any of whose DeepSpeed files would need code to load, before any rank starts.

    The pickles are read memory-mapped: the tensors' bytes are not read, so this costs little even for a
    large optimizer state."""
    tag_dir = Path(tag_dir)
    for pattern in DEEPSPEED_FILE_PATTERNS:
        for path in sorted(tag_dir.glob(pattern)):
            try:
                load(path, mmap=True)
            except RuntimeError:  # a file in torch's legacy (non-zip) format cannot be memory-mapped
                load(path)


def _weights_only_checkpoint_engine():
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        """DeepSpeed's torch checkpoint engine, reading with ``load`` (weights-only) instead of
        ``torch.load(weights_only=False)``; it saves exactly as DeepSpeed's does."""

        def load(self, path: str, map_location=None):
            return load(path, map_location=map_location)

    return WeightsOnlyCheckpointEngine


def install_weights_only_loading(engine) -> None:
    """Make ``engine.load_checkpoint`` read only tensors and plain data: its checkpoint engine becomes
    ``WeightsOnlyCheckpointEngine``, and the loads DeepSpeed makes with ``torch.load`` directly (the universal
    checkpoint's parameter files) run inside ``weights_only_torch_load``."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    if type(engine.checkpoint_engine) is TorchCheckpointEngine:
        engine.checkpoint_engine = _weights_only_checkpoint_engine()(engine._config)
    load_checkpoint = engine.load_checkpoint

    def weights_only_load_checkpoint(*args, **kwargs):
        with weights_only_torch_load():
            return load_checkpoint(*args, **kwargs)

    engine.load_checkpoint = weights_only_load_checkpoint
