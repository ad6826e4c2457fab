"""A trained model's tokenizer: the run's SentencePiece model, or a world's vocabulary.

A model directory does not copy its tokenizer: its config.json keeps the run's ``data`` config, and
``data.path``'s manifest names the tokenizer (``extra.tokenizer``, a SentencePiece model beside the shards,
with its sha256 in ``extra.tokenizer_sha256``) or is a world (``world.json``: the world's vocabulary).
``find_tokenizer`` follows that pointer and checks the hash, so a tokenizer that changed since training is
refused rather than silently mis-decoding. A relative data.path is looked up from the working directory,
then from the model directory and each directory above it (a run's data usually sits beside its runs).
``--tokenizer`` names one explicitly. A Hugging Face export (``ds-mtp export --format hf``) carries a copy
(``tokenizer.model``, or ``world_vocab.json`` for a world), since it must stand alone.
"""


from __future__ import annotations

import json
from pathlib import Path

from ds_mtp.errors import UserError

WORLD_VOCAB_NAME = "world_vocab.json"  # a Hugging Face export's copy of a world's vocabulary


class SentencePieceText:
    """Text ↔ ids with the run's SentencePiece model: no BOS, as data_prep encodes documents (EOS ends one)."""

    def __init__(self, model_file: Path):
        from data_prep.tokenizer import load_processor

        self.path = Path(model_file)
        self.processor = load_processor(self.path)
        self.eos_id = self.processor.eos_id() if self.processor.eos_id() >= 0 else None
        self.vocab_size = self.processor.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self.processor.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.processor.decode([i for i in ids if i != self.eos_id])


class WordText:
    """Text ↔ ids for a world: whitespace-separated tokens of the world's vocabulary (``12 57`` is the prompt
    "from node 12 to node 57"; see docs/worlds.md)."""

    def __init__(self, vocab: list[str], eos_id: int):
        self.vocab, self.eos_id, self.vocab_size = list(vocab), eos_id, len(vocab)
        self.token_id = {t: i for i, t in enumerate(self.vocab)}

    def encode(self, text: str) -> list[int]:
        unknown = [t for t in text.split() if t not in self.token_id]
        if unknown:
            raise UserError(f"'{unknown[0]}' is not in the world's vocabulary (prompt: {text!r})")
        return [self.token_id[t] for t in text.split()]

    def decode(self, ids: list[int]) -> str:
        return " ".join(self.vocab[i] for i in ids)


def resolve_data_path(path: str, model_dir: Path) -> Path | None:
    """A run's data.path: as given if absolute or found from the working directory, else below the model
    directory or one of its ancestors."""
    candidate = Path(path)
    if candidate.is_absolute() or candidate.exists():
        return candidate if candidate.exists() else None
    for base in [model_dir.resolve(), *model_dir.resolve().parents]:
        if (base / candidate).exists():
            return base / candidate
    return None


def tokenizer_from(path: Path):
    """A tokenizer named by ``--tokenizer``: a SentencePiece .model, a directory holding tokenizer.model, a
    world directory, or a data directory whose manifest names its tokenizer."""
    from data_prep.tokenizer import MODEL_NAME

    if path.is_file():
        return SentencePieceText(path)
    if (path / MODEL_NAME).is_file():
        return SentencePieceText(path / MODEL_NAME)
    if (path / "manifest.json").is_file():
        return data_tokenizer(path)
    raise UserError(f"no tokenizer at {path} (expected a SentencePiece .model, a tokenizer directory, a world "
                    "or a data directory)")


def data_tokenizer(data_dir: Path):
    """The tokenizer a data directory's manifest names, its hash checked; a world's manifest carries its
    vocabulary (ds_mtp.experiments.worlds.make_world writes it under extra.world.vocab)."""
    from ds_mtp.data import read_meta, sha256_file

    meta = read_meta(data_dir)
    extra = meta.extra
    world = extra.get("world")
    if isinstance(world, dict) and world.get("vocab"):
        return WordText(world["vocab"], meta.special_ids.get("eos"))
    name = extra.get("tokenizer")
    if not name:
        raise UserError(f"the manifest of {data_dir} names no tokenizer: pass --tokenizer")
    model_file = data_dir / name
    if not model_file.is_file():
        raise UserError(f"{model_file} (the tokenizer named by {data_dir}/manifest.json) is missing: "
                        "pass --tokenizer")
    expected = extra.get("tokenizer_sha256")
    if expected and sha256_file(model_file) != expected:
        raise UserError(f"{model_file} is not the tokenizer the data was made with (sha256 differs from the "
                        "manifest's): pass --tokenizer")
    return SentencePieceText(model_file)


def find_tokenizer(model_dir: str | Path, config: dict, override: str | None = None):
    """The tokenizer of a model directory (see the module docstring for the order)."""
    model_dir = Path(model_dir)
    if override:
        return tokenizer_from(Path(override))
    from data_prep.tokenizer import MODEL_NAME

    if (model_dir / MODEL_NAME).is_file():
        return SentencePieceText(model_dir / MODEL_NAME)
    if (model_dir / WORLD_VOCAB_NAME).is_file():
        raw = json.loads((model_dir / WORLD_VOCAB_NAME).read_text())
        return WordText(raw["vocab"], raw["eos_id"])
    data_path = (config.get("data") or {}).get("path")
    if not data_path:
        raise UserError(f"{model_dir}/config.json records no data.path to find the tokenizer from: pass --tokenizer")
    data_dir = resolve_data_path(data_path, model_dir)
    if data_dir is None:
        raise UserError(f"the run's data directory '{data_path}' (which holds its tokenizer) is not found from "
                        f"here or from {model_dir}: pass --tokenizer")
    return data_tokenizer(data_dir)
