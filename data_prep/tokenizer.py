"""SentencePiece tokenizers: train one on a deterministic sample of the corpus, or adopt a ``.model``.

A tokenizer directory holds ``tokenizer.model`` and ``tokenizer_info.json`` (the special ids pad, bos,
eos and unk, the vocabulary size, the model's sha256 and how it was made).
"""

from __future__ import annotations

import hashlib
import heapq
import io
import json
import os
from pathlib import Path

from ds_mtp.data import sha256_file, write_atomic
from ds_mtp.errors import UserError
from data_prep.corpus import check_sources, iter_texts, resolve_sources

MODEL_NAME = "tokenizer.model"
INFO_NAME = "tokenizer_info.json"
MODEL_TYPES = ("bpe", "unigram")
MAX_SENTENCE_BYTES = 1 << 16


def special_ids(processor) -> dict:
    """pad/bos/eos/unk ids of a SentencePieceProcessor (None where the model has none)."""
    ids = {"pad": processor.pad_id(), "bos": processor.bos_id(), "eos": processor.eos_id(), "unk": processor.unk_id()}
    return {name: (i if i >= 0 else None) for name, i in ids.items()}


def load_processor(path: str | Path):
    """A SentencePieceProcessor from a ``.model`` file or a tokenizer directory."""
    import sentencepiece as spm

    path = Path(path)
    model = path / MODEL_NAME if path.is_dir() else path
    if not model.is_file():
        raise UserError(f"tokenizer not found: {path} (expected a .model file or a directory with {MODEL_NAME})")
    processor = spm.SentencePieceProcessor()
    try:
        processor.Load(str(model))
    except (OSError, RuntimeError) as e:
        raise UserError(f"{model} is not a SentencePiece model: {str(e).strip().splitlines()[0]}") from None
    return processor


def model_path(path: str | Path) -> Path:
    path = Path(path)
    return path / MODEL_NAME if path.is_dir() else path


def _sample_documents(texts, n: int) -> list[str]:
    """The n documents with the smallest content hash: deterministic and independent of input order."""
    heap: list[tuple[int, str]] = []  # max-heap by hash via negation
    for text in texts:
        h = int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
        if len(heap) < n:
            heapq.heappush(heap, (-h, text))
        elif -heap[0][0] > h:
            heapq.heapreplace(heap, (-h, text))
    return [text for _, text in sorted(heap, key=lambda item: -item[0])]


def _write_tokenizer(out_dir: Path, model_bytes: bytes, info: dict) -> dict:
    import sentencepiece as spm

    out_dir.mkdir(parents=True, exist_ok=True)
    processor = spm.SentencePieceProcessor(model_proto=model_bytes)
    info = {"vocab_size": processor.get_piece_size(), "special_ids": special_ids(processor),
            "sha256": hashlib.sha256(model_bytes).hexdigest(), **info}
    write_atomic(out_dir / MODEL_NAME, model_bytes)
    write_atomic(out_dir / INFO_NAME, (json.dumps(info, indent=2) + "\n").encode())
    return info


def _check_out(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} exists and is not a directory")
    if (out_dir / MODEL_NAME).exists() and not overwrite:
        raise UserError(f"{out_dir / MODEL_NAME} already exists (pass --overwrite to replace it)")


def train_tokenizer(inputs: list[str], out_dir: str | Path, *, vocab_size: int = 8000, model_type: str = "bpe",
                    sample_docs: int = 100_000, character_coverage: float = 0.9995, hf: str = "",
                    hf_split: str = "train",
                    field: str = "text", doc_per_file: bool = False, max_doc_chars: int = 0, seed: int = 0,
                    threads: int = 0, overwrite: bool = False, log=print) -> dict:
    """Train a SentencePiece model with byte fallback and write the tokenizer directory."""
    import sentencepiece as spm

    out_dir = Path(out_dir)
    if model_type not in MODEL_TYPES:
        raise UserError(f"unknown tokenizer type '{model_type}' (choose from {', '.join(MODEL_TYPES)})")
    # Byte fallback needs the 256 byte pieces plus the 4 specials; below that nothing useful fits.
    if vocab_size < 261:
        raise UserError(f"--vocab-size {vocab_size} is too small (byte fallback needs at least 261)")
    if vocab_size > 2**31 - 1:
        raise UserError(f"--vocab-size {vocab_size} is too large")
    if sample_docs < 1:
        raise UserError(f"--sample-docs must be at least 1, got {sample_docs}")
    if not 0.9 <= character_coverage <= 1.0:
        raise UserError(f"--character-coverage must be in [0.9, 1], got {character_coverage}")
    _check_out(out_dir, overwrite)
    sources = resolve_sources(inputs, hf=hf, hf_split=hf_split, doc_per_file=doc_per_file)
    check_sources(sources, field)
    docs = _sample_documents(iter_texts(sources, field=field, max_doc_chars=max_doc_chars), sample_docs)
    if not docs:
        raise UserError("the corpus holds no usable documents to train a tokenizer on")
    # SentencePiece trains on "sentences": give it the documents' non-empty lines, in sample order.
    sentences = [line for doc in docs for line in doc.splitlines() if line.strip()]
    model = io.BytesIO()
    options = dict(model_type=model_type, vocab_size=vocab_size, character_coverage=character_coverage,
                   byte_fallback=True, pad_id=3, unk_id=0, bos_id=1, eos_id=2, input_sentence_size=0,
                   shuffle_input_sentence=False, max_sentence_length=MAX_SENTENCE_BYTES,
                   split_digits=True, allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
                   normalization_rule_name="identity", seed_sentencepiece_size=1_000_000,
                   num_threads=threads or os.cpu_count() or 1, minloglevel=2)
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=model, **options)
    except RuntimeError as e:
        message = str(e).strip().splitlines()[-1] if str(e).strip() else "training failed"
        raise UserError(f"SentencePiece could not train a {vocab_size}-piece {model_type} model on "
                        f"{len(docs)} document(s): {message}") from None
    info = _write_tokenizer(out_dir, model.getvalue(), {
        "source": "trained", "documents": len(docs), "sentences": len(sentences),
        "options": {**{k: v for k, v in options.items() if k not in ("num_threads", "minloglevel")}, "seed": seed},
    })
    log(f"tokenizer: {info['vocab_size']} pieces ({model_type}) trained on {len(docs)} documents "
        f"-> {out_dir / MODEL_NAME}")
    return info


def adopt_tokenizer(model_file: str | Path, out_dir: str | Path, *, overwrite: bool = False, log=print) -> dict:
    """Copy an existing SentencePiece ``.model`` into a tokenizer directory and record its special ids."""
    out_dir = Path(out_dir)
    _check_out(out_dir, overwrite)
    processor = load_processor(model_file)
    data = model_path(model_file).read_bytes()
    info = _write_tokenizer(out_dir, data, {"source": f"adopted from {model_file}"})
    if info["special_ids"]["eos"] is None:
        log("warning: the adopted model has no eos id; shards will have no document separator")
    log(f"tokenizer: adopted {processor.get_piece_size()} pieces from {model_file} -> {out_dir / MODEL_NAME}")
    return info


def tokenizer_sha256(path: str | Path) -> str:
    return sha256_file(model_path(path))
