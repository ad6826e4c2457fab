"""``ds-mtp generate``'s job: a model directory loaded (any of the three layouts), prompts read, completions
streamed. The tokenizer comes from ds_mtp.tokenizers."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable

from ds_mtp.errors import UserError


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
