"""Tokenize a corpus into train / val token shards (ds_mtp.data format), in parallel and resumably.

The parent process cuts the input into units (``data_prep.corpus``; for plain .txt/.jsonl files
just byte ranges, which the workers read themselves), W worker processes read, decode, validate
and tokenize them, and the parent receives the results *in unit order* and appends them
through ``ds_mtp.data.ShardWriter``. Everything that decides the output (unit boundaries, the
split by content hash, de-duplication) is independent of W and of timing, so the shards are
byte-identical for any worker count.

Resuming: after any shard completes, and every ``CHECKPOINT_SECONDS``, the parent checkpoints the
input position, both writers, the skip counts and the de-duplication set into ``OUT/.prep_state``
(companion files first, ``state.json`` last, each atomically). A rerun of the same command after
a crash or SIGKILL restores that state, cuts the open shards back to it and carries on, giving the
same bytes as an uninterrupted run. ``manifest.json`` is written last of all.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing
import os
import shutil
import signal
import sys
import time
from collections import deque
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ds_mtp.data import LEGACY_META_NAMES, META_NAME, Meta, ShardWriter, manifest_path, token_dtype, write_atomic
from ds_mtp.errors import UserError
from data_prep.corpus import (SKIP_REASONS, UNIT_BYTES, check_sources, fingerprint_sources, iter_units, record_to_text,
                              resolve_sources, unit_records)
from data_prep.tokenizer import INFO_NAME, MODEL_NAME, load_processor, model_path, special_ids, tokenizer_sha256

STATE_DIR = ".prep_state"
CHECKPOINT_SECONDS = 30.0
SPLITS = ("train", "val")
MAX_LOGGED_SKIPS = 5
_HASH_BYTES = 16


# ---------------------------------------------------------------- worker side

_worker: dict = {}


def _init_worker(model_file: str, field: str, max_doc_chars: int, in_pool: bool = True) -> None:
    import sentencepiece as spm

    if in_pool:  # Ctrl-C is the parent's to handle (it stops the pool); no traceback per worker
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    processor = spm.SentencePieceProcessor()
    processor.Load(model_file)
    _worker.update(processor=processor, eos=processor.eos_id(), field=field, max_doc_chars=max_doc_chars)


def _tokenize_unit(unit):
    """Read (for a byte range), decode, validate, hash and tokenize one unit. Returns a compact result.

    Skips are (reason, index of the record in the unit): the parent turns them into absolute lines.
    """
    records = unit_records(unit)
    texts, skips = [], []
    for i, record in enumerate(records):
        text, reason = record_to_text(unit.kind, record, _worker["field"], _worker["max_doc_chars"])
        if text is None:
            skips.append((reason, i))
        else:
            texts.append(text)
    digests = b"".join(hashlib.blake2b(t.encode("utf-8", "surrogatepass"), digest_size=_HASH_BYTES).digest()
                       for t in texts)
    # num_threads=1: parallelism comes from the worker processes; threads would oversubscribe the cores.
    ids = _worker["processor"].encode(texts, add_eos=True, num_threads=1) if texts else []
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    # int32 halves what travels back to the parent (SentencePiece ids are int32 anyway).
    tokens = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(lengths.sum()))
    input_bytes = len(records[0]) if unit.kind == "file" else unit.next_start - unit.start
    return (unit.source, unit.start, unit.next_start, len(records), input_bytes, tokens, lengths, digests, skips)


# ---------------------------------------------------------------- parent side

class Progress:
    """A tqdm bar on stderr with documents/s and tokens/s (silent when disabled).

    It counts input bytes (with a percentage and ETA) when every source is a plain .txt/.jsonl
    file, whose size is known up front, and documents otherwise.
    """

    def __init__(self, enabled: bool, sources: list, position: tuple[int, int, int]):
        self.bar = None
        self.start = time.perf_counter()
        self.docs = self.tokens = 0
        self.by_bytes = all(s.kind in ("txt", "jsonl", "txt-file") for s in sources)
        if enabled:
            from tqdm import tqdm

            if self.by_bytes:
                sizes = [os.path.getsize(s.path) for s in sources]
                done = sum(sizes[:position[0]]) + (position[1] if sources[position[0]].kind != "txt-file"
                                                   else position[1] * sizes[position[0]])
                self.bar = tqdm(total=sum(sizes), initial=done, unit="B", unit_scale=True, file=sys.stderr,
                                dynamic_ncols=True, mininterval=0.5, leave=False)
            else:
                self.bar = tqdm(unit=" docs", file=sys.stderr, dynamic_ncols=True, mininterval=0.5, leave=False)

    def update(self, docs: int, tokens: int, input_bytes: int) -> None:
        self.docs += docs
        self.tokens += tokens
        if self.bar is not None:
            self.bar.update(input_bytes if self.by_bytes else docs)
            elapsed = max(time.perf_counter() - self.start, 1e-9)
            self.bar.set_postfix_str(f"{self.docs / elapsed:,.0f} docs/s, {self.tokens / elapsed:,.0f} tokens/s",
                                     refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _in_order(pool, units, max_pending: int):
    """Results of ``_tokenize_unit`` in unit order, with at most ``max_pending`` units in flight.

    Unlike ``Pool.imap``, this never reads ahead of the workers or lets finished results pile up,
    so memory stays bounded by a few units whatever the corpus size.
    """
    pending: deque = deque()
    for unit in units:
        pending.append(pool.apply_async(_tokenize_unit, (unit,)))
        if len(pending) >= max_pending:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def _fingerprint(options: dict) -> str:
    return hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()


def _our_files(out: Path) -> list[Path]:
    """Files in OUT that a previous shard run could have written (shards, manifest, state), not the tokenizer."""
    found = []
    for p in out.iterdir():
        stem = p.name.split(".")[0]
        split, _, number = stem.rpartition("_")
        if split in SPLITS and len(number) == 5 and number.isdigit():
            found.append(p)
        elif p.name in (META_NAME, META_NAME + ".tmp", *LEGACY_META_NAMES, STATE_DIR):
            found.append(p)
    return found


def _remove(paths: list[Path]) -> None:
    for p in paths:
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)


class _State:
    """The checkpoint in OUT/.prep_state: state.json names its companion .npy files by sequence number."""

    def __init__(self, out: Path):
        self.dir = out / STATE_DIR

    def load(self) -> dict | None:
        path = self.dir / "state.json"
        if not path.is_file():
            return None
        try:
            state = json.loads(path.read_text())
            seq = state["seq"]
            for split in SPLITS:
                state["writers"][split]["offsets"] = np.load(self.dir / f"{split}_offsets.{seq}.npy")
            state["seen"] = np.load(self.dir / f"seen.{seq}.npy")
            return state
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
            raise UserError(f"cannot resume: the checkpoint in {self.dir} is unreadable ({e}); "
                            f"pass --overwrite to start again") from None

    def save(self, state: dict, writers: dict, seen: set) -> None:
        self.dir.mkdir(exist_ok=True)
        seq = state["seq"] = state.get("seq", 0) + 1
        writer_states = {}
        for split, writer in writers.items():
            ws = writer.checkpoint()
            _save_npy(self.dir / f"{split}_offsets.{seq}.npy", ws.pop("offsets"))
            writer_states[split] = ws
        seen_array = np.frombuffer(b"".join(sorted(seen)), dtype=np.uint8).reshape(-1, _HASH_BYTES) \
            if seen else np.zeros((0, _HASH_BYTES), dtype=np.uint8)
        _save_npy(self.dir / f"seen.{seq}.npy", seen_array)
        body = {k: v for k, v in state.items() if k not in ("writers", "seen")}
        write_atomic(self.dir / "state.json", json.dumps({**body, "writers": writer_states}).encode())
        for old in self.dir.glob("*.npy"):
            if not old.name.endswith(f".{seq}.npy"):
                old.unlink()


def _save_npy(path: Path, array: np.ndarray) -> None:
    import io

    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    write_atomic(path, buf.getvalue())


def shard_corpus(inputs: list[str], tokenizer: str | Path, out: str | Path, *, hf: str = "", hf_split: str = "train",
                 field: str = "text", doc_per_file: bool = False, workers: int = 1, shard_tokens: int = 1 << 26,
                 val_fraction: float = 0.01, dedup: bool = False, max_doc_chars: int = 1_000_000,
                 strict: bool = False, overwrite: bool = False, resume: bool = False, progress: bool = True,
                 unit_bytes: int = UNIT_BYTES, command: list[str] | None = None, log=print) -> Meta:
    """Tokenize the corpus into ``OUT/{train,val}_NNNNN.{bin,idx}`` and ``OUT/manifest.json``; returns the Meta."""
    out = Path(out)
    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    if shard_tokens < 1:
        raise UserError(f"--shard-tokens must be at least 1, got {shard_tokens}")
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if max_doc_chars < 0:
        raise UserError(f"--max-doc-chars must be non-negative, got {max_doc_chars}")
    if unit_bytes < 1:
        raise UserError(f"--unit-bytes must be at least 1, got {unit_bytes}")
    if overwrite and resume:
        raise UserError("--overwrite and --resume contradict each other")
    processor = load_processor(tokenizer)
    model_file = model_path(tokenizer)
    specials = special_ids(processor)
    if specials["eos"] is None:
        raise UserError(f"tokenizer {model_file} has no eos id, so documents could not be separated")
    vocab_size = processor.get_piece_size()
    tok_sha = tokenizer_sha256(tokenizer)
    sources = resolve_sources(inputs, hf=hf, hf_split=hf_split, doc_per_file=doc_per_file)
    check_sources(sources, field)
    options = {"inputs": fingerprint_sources(sources), "field": field, "shard_tokens": shard_tokens,
               "val_fraction": val_fraction, "dedup": dedup, "max_doc_chars": max_doc_chars,
               "tokenizer_sha256": tok_sha, "format": 1}
    fingerprint = _fingerprint(options)

    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    state_store = _State(out)
    state = None
    existing = _our_files(out)
    manifest = manifest_path(out)  # an older version's meta.json counts too
    if not (out / STATE_DIR / "state.json").is_file() and manifest is None and \
            all(p.name.endswith(".tmp") or p.name == STATE_DIR for p in existing):
        # Killed before its first checkpoint: nothing was written that a rerun could not redo.
        _remove(existing)
        existing = []
    if manifest is not None and not overwrite:
        try:
            old = json.loads(manifest.read_text())
        except (OSError, json.JSONDecodeError):
            old = {}
        extra = old.get("extra", {})
        if extra.get("tokenizer_sha256") and extra.get("tokenizer_sha256") != tok_sha:
            raise UserError(f"{out} holds shards of a different tokenizer (sha256 {extra['tokenizer_sha256'][:12]}, "
                            f"this one is {tok_sha[:12]}); pass --overwrite to replace them")
        if extra.get("fingerprint") == fingerprint:
            # Killed after the manifest but before the checkpoint was cleared: the run is complete.
            shutil.rmtree(out / STATE_DIR, ignore_errors=True)
            log(f"{out} is already complete for these inputs and options; nothing to do")
            return Meta(**old)
        raise UserError(f"{out} already holds shards from other inputs or options; pass --overwrite to replace them")
    if existing and not overwrite:
        state = state_store.load()
        if state is None:
            raise UserError(f"{out} already holds shard files but no resumable state; pass --overwrite to replace them")
        if state["tokenizer_sha256"] != tok_sha:
            raise UserError(f"{out} holds shards of a different tokenizer (sha256 {state['tokenizer_sha256'][:12]}, "
                            f"this one is {tok_sha[:12]}); pass --overwrite to replace them")
        if state["fingerprint"] != fingerprint:
            raise UserError(f"{out} holds an interrupted run with other inputs or options (or the inputs changed "
                            f"since); pass --overwrite to start again")
    elif resume:
        raise UserError(f"--resume: {out} holds no interrupted run to resume")
    if overwrite:
        _remove(existing)

    # The data directory carries its tokenizer, so inspect and training need nothing else (unless
    # --out is the tokenizer's own directory).
    copy_tokenizer = model_file.resolve() != (out / MODEL_NAME).resolve()
    if copy_tokenizer:
        write_atomic(out / MODEL_NAME, model_file.read_bytes())
        write_atomic(out / INFO_NAME, (json.dumps({"vocab_size": vocab_size, "special_ids": specials,
                                                   "sha256": tok_sha}, indent=2) + "\n").encode())

    if state is not None:
        writers = {s: ShardWriter.restore(out, state["writers"][s]) for s in SPLITS}
        seen = {bytes(row) for row in state["seen"]}
        log(f"resuming from the checkpoint at {sources[state['position'][0]].describe()} line {state['position'][2]}: "
            f"{state['documents']} documents, {state['tokens']} tokens already written")
    else:
        for split in SPLITS:
            for tmp in out.glob(f"{split}_*.tmp"):
                tmp.unlink()
        writers = {s: ShardWriter(out, s, vocab_size, shard_tokens) for s in SPLITS}
        seen = set()
        state = {"fingerprint": fingerprint, "tokenizer_sha256": tok_sha, "position": [0, 0, 1],
                 "skipped": {r: 0 for r in (*SKIP_REASONS, "duplicate")}, "skip_examples": [],
                 "documents": 0, "tokens": 0, "records": 0}
        state_store.save(state, writers, seen)

    threshold = np.uint64(min(int(val_fraction * 2**64), 2**64 - 1))
    units = iter_units(sources, field=field, position=tuple(state["position"]), unit_bytes=unit_bytes)
    # Tests kill the run at a chosen point to prove resuming is exact (SIGKILL: no cleanup runs).
    kill_after = int(os.environ.get("DATA_PREP_TEST_KILL_AFTER_UNITS", "0"))
    units_done = 0
    bar = Progress(progress, sources, tuple(state["position"]))
    started = time.perf_counter()
    last_checkpoint = time.monotonic()
    pool = None
    try:
        if workers == 1:
            _init_worker(str(model_file), field, max_doc_chars, in_pool=False)
            results = map(_tokenize_unit, units)
        else:
            pool = multiprocessing.get_context("spawn" if sys.platform == "darwin" else "fork").Pool(
                workers, initializer=_init_worker, initargs=(str(model_file), field, max_doc_chars))
            results = _in_order(pool, units, max_pending=2 * workers)
        for source, start, next_start, n_records, input_bytes, tokens, lengths, digests, skips in results:
            # Units arrive in order and follow each other: a unit that continues the position's source
            # starts at its line; any other is a source's first (start 0, line 1).
            position = state["position"]
            if (source, start) == (position[0], position[1]):
                line = position[2]
            elif start == 0 and source > position[0]:
                line = 1
            else:  # pragma: no cover - iter_units yields contiguous units in order
                raise AssertionError(f"unit {source}:{start} does not follow position {position}")
            for reason, i in skips:
                location = f"{sources[source].describe()}:{line + i}"
                if strict:
                    raise UserError(f"bad record at {location}: {reason.replace('_', ' ')} (--strict)")
                state["skipped"][reason] += 1
                if len(state["skip_examples"]) < MAX_LOGGED_SKIPS:
                    state["skip_examples"].append(f"{location}: {reason}")
                    log(f"skipped {location}: {reason}")
            keep = np.ones(lengths.size, dtype=bool)
            if dedup:
                for i in range(lengths.size):
                    digest = digests[i * _HASH_BYTES:(i + 1) * _HASH_BYTES]
                    if digest in seen:
                        keep[i] = False
                    else:
                        seen.add(digest)
                state["skipped"]["duplicate"] += int((~keep).sum())
            hashes = np.frombuffer(digests, dtype="<u8")[::2] if lengths.size else np.zeros(0, dtype=np.uint64)
            to_val = hashes < threshold
            completed_before = sum(len(w.infos) for w in writers.values())
            for split, mask in (("train", keep & ~to_val), ("val", keep & to_val)):
                if mask.any():
                    writers[split].add_many(tokens[np.repeat(mask, lengths)], lengths[mask])
            kept = int(keep.sum())
            state["documents"] += kept
            state["tokens"] += int(lengths[keep].sum())
            state["records"] += n_records
            state["position"] = [source, next_start, line + n_records]
            bar.update(kept, int(lengths[keep].sum()), input_bytes)
            units_done += 1
            if units_done == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
            shard_done = sum(len(w.infos) for w in writers.values()) > completed_before
            if shard_done or time.monotonic() - last_checkpoint > CHECKPOINT_SECONDS:
                state_store.save(state, writers, seen)
                last_checkpoint = time.monotonic()
    except BaseException:
        bar.close()
        if pool is not None:
            pool.terminate()
        raise
    bar.close()
    if pool is not None:
        pool.close()
        pool.join()
    if state["documents"] == 0:
        for w in writers.values():
            w.discard()
        _remove(_our_files(out) + ([out / MODEL_NAME, out / INFO_NAME] if copy_tokenizer else []))
        skipped = ", ".join(f"{n} {r}" for r, n in state["skipped"].items() if n)
        raise UserError(f"no documents to write: the corpus is empty{f' after skipping {skipped}' if skipped else ''}")
    meta = Meta(vocab_size=vocab_size, dtype=token_dtype(vocab_size).str, special_ids=specials, extra={
        "producer": "data_prep", "tokenizer": MODEL_NAME, "tokenizer_sha256": tok_sha, "fingerprint": fingerprint,
        "inputs": [s.describe() for s in sources], "records": state["records"], "documents": state["documents"],
        "tokens": state["tokens"], "skipped": state["skipped"], "skip_examples": state["skip_examples"],
        "options": {k: v for k, v in options.items() if k not in ("inputs", "tokenizer_sha256")},
        "eos_appended": True, "command": command or []})
    for split, writer in writers.items():
        meta.splits[split] = [asdict(i) for i in writer.close()]
        meta.max_token_id = max(meta.max_token_id, writer.max_token_id)
    meta.write(out)
    shutil.rmtree(state_store.dir, ignore_errors=True)
    elapsed = time.perf_counter() - started
    skipped = sum(state["skipped"].values())
    log(f"sharded {state['records']} records -> {state['documents']} documents, {state['tokens']:,} tokens "
        f"(train {sum(s['tokens'] for s in meta.splits['train']):,} in {len(meta.splits['train'])} shard(s), "
        f"val {sum(s['tokens'] for s in meta.splits['val']):,} in {len(meta.splits['val'])}), skipped {skipped}"
        f"{' (' + ', '.join(f'{n} {r}' for r, n in state['skipped'].items() if n) + ')' if skipped else ''}, "
        f"{state['tokens'] / max(elapsed, 1e-9):,.0f} tokens/s with {workers} worker(s) -> {out}")
    return meta
