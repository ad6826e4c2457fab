"""Text in and out of a trained model: its tokenizer, and ``ds-mtp generate``'s prompts-to-completions job.

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
import sys
from pathlib import Path
from typing import Callable

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


def load_model_dir(path: str | Path, device: str = "cpu"):
    """(MTPModel, ds-mtp config dict) of a directory written by training, ``ds-mtp export`` or
    ``ds-mtp export --format hf``."""
    import torch

    from ds_mtp.hf_export import DS_CONFIG_NAME, load_hf_export
    from ds_mtp.run_dir import resolve_model_dir
    from ds_mtp.model import load_exported

    path = resolve_model_dir(path)
    if not path.is_dir():
        raise UserError(f"model directory not found: {path}")
    if device != "cpu" and device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA device here")
    if (path / DS_CONFIG_NAME).is_file():
        return load_hf_export(path, device), json.loads((path / DS_CONFIG_NAME).read_text())
    model = load_exported(path, device)
    return model, json.loads((path / "config.json").read_text())


def read_prompts(prompts: list[str] | None, prompts_file: str | None, stdin=None) -> list[str]:
    """Prompts from --prompt (each one prompt), else --prompts FILE ('-' = stdin), else stdin; one per line."""
    if prompts:
        return list(prompts)
    if prompts_file and prompts_file != "-":
        try:
            lines = Path(prompts_file).read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read prompts from {prompts_file}: {e}") from None
    else:
        stream = stdin or sys.stdin
        if stream.isatty():
            print("reading prompts from stdin, one per line (end with Ctrl-D)", file=sys.stderr)
        lines = stream.read().splitlines()
    lines = [line for line in lines if line.strip()]
    if not lines:
        raise UserError("no prompt given (--prompt TEXT, --prompts FILE, or lines on stdin)")
    return lines


class _StreamWriter:
    """Writes completions in prompt order as their text grows: a row's new text is printed as soon as every
    earlier prompt is complete (with one prompt per batch, token by token)."""

    def __init__(self, tokenizer, write: Callable[[str], None], offset: int, rows: int):
        self.tokenizer, self.write, self.offset = tokenizer, write, offset
        self.ids: list[list[int]] = [[] for _ in range(rows)]
        self.printed = [0] * rows  # characters of each row's text already written
        self.done = [False] * rows
        self.current = 0  # the row being written

    def token(self, row: int, token: int) -> None:
        self.ids[row].append(token)
        self._flush()

    def finish(self) -> None:
        self.done = [True] * len(self.done)
        self._flush()

    def _flush(self) -> None:
        while self.current < len(self.ids):
            row = self.current
            text = self.tokenizer.decode(self.ids[row])
            if not self.done[row]:
                text = text.rstrip("\ufffd")  # an unfinished UTF-8 character (byte pieces) waits for its end
            if len(text) > self.printed[row]:
                self.write(text[self.printed[row]:])
                self.printed[row] = len(text)
            if not self.done[row]:
                return
            self.write("\n")
            self.current += 1


def generate_text(model, tokenizer, prompts: list[str], *, batch_size: int = 1, write=None, **options):
    """Complete each prompt, writing every completion (then a newline) in prompt order as it is made;
    ``options`` are ds_mtp.generate.generate's. Returns the DecodeStats summed over the batches."""
    from ds_mtp.generate import DecodeStats, generate

    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    if options.get("speculative") and not model.heads.extra:
        raise UserError("--speculative drafts with the extra MTP heads, and this model has none (model.mtp_k=1)")
    if options.get("max_new_tokens", 1) < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {options['max_new_tokens']}")
    write = write or (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    if tokenizer.vocab_size > model.cfg.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} tokens, the model only {model.cfg.vocab_size}: "
                        "not this model's tokenizer (pass the right --tokenizer)")
    import torch

    generator = torch.Generator().manual_seed(options.pop("seed", 0))  # one stream over all batches
    total = DecodeStats()
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        encoded = [tokenizer.encode(p) for p in chunk]
        for text, ids in zip(chunk, encoded):
            if not ids:
                raise UserError(f"prompt {text!r} encodes to no tokens")
        stream = _StreamWriter(tokenizer, write, start, len(chunk))
        stats = generate(model, encoded, eos_id=tokenizer.eos_id, on_token=stream.token, generator=generator,
                         **options).stats
        stream.finish()
        for name in ("tokens", "forward_passes", "row_steps", "drafted", "accepted", "seconds"):
            setattr(total, name, getattr(total, name) + getattr(stats, name))
    return total
