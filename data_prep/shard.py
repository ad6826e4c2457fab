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

``shard_corpus`` runs three steps: ``decide_start`` (a fresh run, a resume from a ``Checkpoint``, or
nothing to do), ``ShardRun`` (the main loop over the units' results) and ``finish`` (the manifest).
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
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
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

    def __init__(self, enabled: bool, sources: list, position: "Position"):
        self.bar = None
        self.start = time.perf_counter()
        self.docs = self.tokens = 0
        self.by_bytes = all(s.kind in ("txt", "jsonl", "txt-file") for s in sources)
        if enabled:
            from tqdm import tqdm

            if self.by_bytes:
                sizes = [os.path.getsize(s.path) for s in sources]
                done = sum(sizes[:position.source]) + (position.start if sources[position.source].kind != "txt-file"
                                                       else position.start * sizes[position.source])
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


@dataclass
class Position:
    """Where the next unit starts; a resumed run carries on from here (``data_prep.corpus.iter_units``)."""

    source: int = 0
    """Index of the source in the resolved input list."""
    start: int = 0
    """Where the next unit starts inside that source: a byte offset (.txt/.jsonl) or a record number."""
    line: int = 1
    """1-based line (record) number of the next unit's first record, for the locations of skipped records."""

    def as_tuple(self) -> tuple[int, int, int]:
        return (self.source, self.start, self.line)


def _no_skips() -> dict[str, int]:
    return {reason: 0 for reason in (*SKIP_REASONS, "duplicate")}


@dataclass
class ShardState:
    """What a run has done so far, checkpointed to OUT/.prep_state/state.json (with its writers' states)."""

    fingerprint: str
    """sha256 of the inputs and the options that decide the output: a resume must match it."""
    tokenizer_sha256: str
    """sha256 of the tokenizer model the shards were written with."""
    position: Position = field(default_factory=Position)
    """Where the next unit starts."""
    skipped: dict[str, int] = field(default_factory=_no_skips)
    """Records skipped so far, per reason (``data_prep.corpus.SKIP_REASONS`` and "duplicate")."""
    skip_examples: list[str] = field(default_factory=list)
    """The first ``MAX_LOGGED_SKIPS`` skipped records as "path:line: reason"."""
    documents: int = 0
    """Documents written (kept records)."""
    tokens: int = 0
    """Tokens written, EOS included."""
    records: int = 0
    """Records read, skipped ones included."""
    seq: int = 0
    """Number of the last checkpoint, which names its companion .npy files (0: none yet)."""

    def to_json(self) -> dict:
        return {**asdict(self), "position": list(self.position.as_tuple())}

    @classmethod
    def from_json(cls, raw: dict) -> "ShardState":
        raw = {k: v for k, v in raw.items() if k != "writers"}
        return cls(**{**raw, "position": Position(*raw["position"])})


@dataclass
class Checkpoint:
    """A run's state as OUT/.prep_state holds it: what ``ShardWriter.restore`` and the de-duplication need."""

    state: ShardState
    writers: dict[str, dict]
    """Per split, ``ShardWriter.checkpoint()``'s state (its offsets array included)."""
    seen: set[bytes]
    """Digests of the documents written so far (only filled with --dedup)."""


class CheckpointStore:
    """OUT/.prep_state: state.json names its companion .npy files by the checkpoint's sequence number.

    The .npy files are written first and state.json last, each atomically, so a kill at any moment
    leaves the previous checkpoint or the new one, never a mix."""

    def __init__(self, out: Path):
        self.dir = out / STATE_DIR
        self.state_file = self.dir / "state.json"

    def load(self) -> Checkpoint | None:
        if not self.state_file.is_file():
            return None
        try:
            raw = json.loads(self.state_file.read_text())
            state = ShardState.from_json(raw)
            writers = raw["writers"]
            for split in SPLITS:
                writers[split]["offsets"] = np.load(self.dir / f"{split}_offsets.{state.seq}.npy")
            seen = {bytes(row) for row in np.load(self.dir / f"seen.{state.seq}.npy")}
        except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
            raise UserError(f"cannot resume: the checkpoint in {self.dir} is unreadable ({e}); "
                            f"pass --overwrite to start again") from None
        return Checkpoint(state, writers, seen)

    def save(self, state: ShardState, writers: dict[str, ShardWriter], seen: set[bytes]) -> None:
        self.dir.mkdir(exist_ok=True)
        state.seq += 1
        seq = state.seq
        writer_states = {}
        for split, writer in writers.items():
            writer_state = writer.checkpoint()
            _save_npy(self.dir / f"{split}_offsets.{seq}.npy", writer_state.pop("offsets"))
            writer_states[split] = writer_state
        seen_array = np.frombuffer(b"".join(sorted(seen)), dtype=np.uint8).reshape(-1, _HASH_BYTES) \
            if seen else np.zeros((0, _HASH_BYTES), dtype=np.uint8)
        _save_npy(self.dir / f"seen.{seq}.npy", seen_array)
        write_atomic(self.state_file, json.dumps({**state.to_json(), "writers": writer_states}).encode())
        for old in self.dir.glob("*.npy"):
            if not old.name.endswith(f".{seq}.npy"):
                old.unlink()

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _save_npy(path: Path, array: np.ndarray) -> None:
    import io

    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    write_atomic(path, buf.getvalue())


def _check_options(workers: int, shard_tokens: int, val_fraction: float, max_doc_chars: int, unit_bytes: int,
                   overwrite: bool, resume: bool) -> None:
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


def decide_start(out: Path, store: CheckpointStore, fingerprint: str, tok_sha: str, *, overwrite: bool,
                 resume: bool, log=print) -> Meta | Checkpoint | None:
    """The resume decision for OUT: the finished run's Meta (nothing to do), the checkpoint to resume
    from, or None for a fresh start. Refuses (UserError) output of other inputs, options or tokenizer
    unless ``overwrite``, which removes it; removes the leftovers of a run killed before its first checkpoint."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    existing = _our_files(out)
    manifest = manifest_path(out)  # an older version's meta.json counts too
    if not store.state_file.is_file() and manifest is None and \
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
            store.clear()
            log(f"{out} is already complete for these inputs and options; nothing to do")
            return Meta(**old)
        raise UserError(f"{out} already holds shards from other inputs or options; pass --overwrite to replace them")
    if existing and not overwrite:
        checkpoint = store.load()
        if checkpoint is None:
            raise UserError(f"{out} already holds shard files but no resumable state; pass --overwrite to replace them")
        if checkpoint.state.tokenizer_sha256 != tok_sha:
            raise UserError(f"{out} holds shards of a different tokenizer (sha256 "
                            f"{checkpoint.state.tokenizer_sha256[:12]}, this one is {tok_sha[:12]}); "
                            f"pass --overwrite to replace them")
        if checkpoint.state.fingerprint != fingerprint:
            raise UserError(f"{out} holds an interrupted run with other inputs or options (or the inputs changed "
                            f"since); pass --overwrite to start again")
        return checkpoint
    if resume:
        raise UserError(f"--resume: {out} holds no interrupted run to resume")
    if overwrite:
        _remove(existing)
    return None


class ShardRun:
    """The parent's side of the main loop: takes the workers' results in unit order, splits, de-duplicates
    and appends them to the shards, and checkpoints so that a rerun resumes exactly where it stopped."""

    def __init__(self, out: Path, sources: list, vocab_size: int, shard_tokens: int, store: CheckpointStore,
                 start: Checkpoint | ShardState, *, val_fraction: float, dedup: bool, strict: bool, log=print):
        """``start``: the checkpoint to resume from, or a fresh run's state (its open shards are started afresh)."""
        self.out, self.sources, self.store, self.log = out, sources, store, log
        self.dedup, self.strict = dedup, strict
        # A document goes to val when the first 8 bytes of its digest fall below this (independent of order).
        self.val_threshold = np.uint64(min(int(val_fraction * 2**64), 2**64 - 1))
        if isinstance(start, Checkpoint):
            self.state, self.seen = start.state, start.seen
            self.writers = {s: ShardWriter.restore(out, start.writers[s]) for s in SPLITS}
        else:
            for split in SPLITS:
                for tmp in out.glob(f"{split}_*.tmp"):
                    tmp.unlink()
            self.state, self.seen = start, set()
            self.writers = {s: ShardWriter(out, s, vocab_size, shard_tokens) for s in SPLITS}
            self.checkpoint()
        self.progress: Progress | None = None

    def checkpoint(self) -> None:
        self.store.save(self.state, self.writers, self.seen)

    def _line_of(self, source: int, start: int) -> int:
        # Units arrive in order and follow each other: a unit that continues the position's source
        # starts at its line; any other is a source's first (start 0, line 1).
        position = self.state.position
        if (source, start) == (position.source, position.start):
            return position.line
        if start == 0 and source > position.source:
            return 1
        raise AssertionError(f"unit {source}:{start} does not follow position {position}")  # pragma: no cover

    def absorb(self, result) -> bool:
        """Append one unit's documents (``_tokenize_unit``'s result); True when a shard was completed."""
        source, start, next_start, n_records, input_bytes, tokens, lengths, digests, skips = result
        state = self.state
        line = self._line_of(source, start)
        for reason, i in skips:
            location = f"{self.sources[source].describe()}:{line + i}"
            if self.strict:
                raise UserError(f"bad record at {location}: {reason.replace('_', ' ')} (--strict)")
            state.skipped[reason] += 1
            if len(state.skip_examples) < MAX_LOGGED_SKIPS:
                state.skip_examples.append(f"{location}: {reason}")
                self.log(f"skipped {location}: {reason}")
        keep = np.ones(lengths.size, dtype=bool)
        if self.dedup:
            for i in range(lengths.size):
                digest = digests[i * _HASH_BYTES:(i + 1) * _HASH_BYTES]
                if digest in self.seen:
                    keep[i] = False
                else:
                    self.seen.add(digest)
            state.skipped["duplicate"] += int((~keep).sum())
        hashes = np.frombuffer(digests, dtype="<u8")[::2] if lengths.size else np.zeros(0, dtype=np.uint64)
        to_val = hashes < self.val_threshold
        completed_before = self._completed_shards()
        for split, mask in (("train", keep & ~to_val), ("val", keep & to_val)):
            if mask.any():
                self.writers[split].add_many(tokens[np.repeat(mask, lengths)], lengths[mask])
        kept, kept_tokens = int(keep.sum()), int(lengths[keep].sum())
        state.documents += kept
        state.tokens += kept_tokens
        state.records += n_records
        state.position = Position(source, next_start, line + n_records)
        if self.progress is not None:
            self.progress.update(kept, kept_tokens, input_bytes)
        return self._completed_shards() > completed_before

    def _completed_shards(self) -> int:
        return sum(len(w.infos) for w in self.writers.values())

    def run(self, results) -> None:
        """Absorb every result, checkpointing after each completed shard and every ``CHECKPOINT_SECONDS``."""
        last_checkpoint = time.monotonic()
        for result in results:
            shard_done = self.absorb(result)
            if shard_done or time.monotonic() - last_checkpoint > CHECKPOINT_SECONDS:
                self.checkpoint()
                last_checkpoint = time.monotonic()


@contextmanager
def _tokenized(units, workers: int, model_file: Path, field: str, max_doc_chars: int):
    """``_tokenize_unit``'s results in unit order, in this process (one worker) or a pool of ``workers``."""
    if workers == 1:
        _init_worker(str(model_file), field, max_doc_chars, in_pool=False)
        yield map(_tokenize_unit, units)
        return
    pool = multiprocessing.get_context("spawn" if sys.platform == "darwin" else "fork").Pool(
        workers, initializer=_init_worker, initargs=(str(model_file), field, max_doc_chars))
    try:
        yield _in_order(pool, units, max_pending=2 * workers)
    except BaseException:
        pool.terminate()
        raise
    pool.close()
    pool.join()


def finish(run: ShardRun, *, vocab_size: int, specials: dict, options: dict, command: list[str],
           tokenizer_copies: list[Path]) -> Meta:
    """Close the shards and write ``manifest.json`` (last), then drop the checkpoint. With no document
    at all, remove everything the run wrote (``tokenizer_copies`` too) and refuse with a UserError."""
    state = run.state
    if state.documents == 0:
        for writer in run.writers.values():
            writer.discard()
        _remove(_our_files(run.out) + tokenizer_copies)
        skipped = ", ".join(f"{n} {r}" for r, n in state.skipped.items() if n)
        raise UserError(f"no documents to write: the corpus is empty{f' after skipping {skipped}' if skipped else ''}")
    meta = Meta(vocab_size=vocab_size, dtype=token_dtype(vocab_size).str, special_ids=specials, extra={
        "producer": "data_prep", "tokenizer": MODEL_NAME, "tokenizer_sha256": state.tokenizer_sha256,
        "fingerprint": state.fingerprint, "inputs": [s.describe() for s in run.sources], "records": state.records,
        "documents": state.documents, "tokens": state.tokens, "skipped": state.skipped,
        "skip_examples": state.skip_examples,
        "options": {k: v for k, v in options.items() if k not in ("inputs", "tokenizer_sha256")},
        "eos_appended": True, "command": command})
    for split, writer in run.writers.items():
        meta.splits[split] = [asdict(i) for i in writer.close()]
        meta.max_token_id = max(meta.max_token_id, writer.max_token_id)
    meta.write(run.out)
    run.store.clear()
    return meta


def _summary(meta: Meta, state: ShardState, workers: int, elapsed: float, out: Path) -> str:
    skipped = sum(state.skipped.values())
    reasons = ", ".join(f"{n} {r}" for r, n in state.skipped.items() if n)
    return (f"sharded {state.records} records -> {state.documents} documents, {state.tokens:,} tokens "
            f"(train {sum(s['tokens'] for s in meta.splits['train']):,} in {len(meta.splits['train'])} shard(s), "
            f"val {sum(s['tokens'] for s in meta.splits['val']):,} in {len(meta.splits['val'])}), skipped {skipped}"
            f"{' (' + reasons + ')' if skipped else ''}, "
            f"{state.tokens / max(elapsed, 1e-9):,.0f} tokens/s with {workers} worker(s) -> {out}")


def shard_corpus(inputs: list[str], tokenizer: str | Path, out: str | Path, *, hf: str = "", hf_split: str = "train",
                 field: str = "text", doc_per_file: bool = False, workers: int = 1, shard_tokens: int = 1 << 26,
                 val_fraction: float = 0.01, dedup: bool = False, max_doc_chars: int = 1_000_000,
                 strict: bool = False, overwrite: bool = False, resume: bool = False, progress: bool = True,
                 unit_bytes: int = UNIT_BYTES, command: list[str] | None = None, log=print) -> Meta:
    """Tokenize the corpus into ``OUT/{train,val}_NNNNN.{bin,idx}`` and ``OUT/manifest.json``; returns the Meta.

    Three steps: the resume decision (``decide_start``), the main loop (``ShardRun``) and the finish."""
    out = Path(out)
    _check_options(workers, shard_tokens, val_fraction, max_doc_chars, unit_bytes, overwrite, resume)
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

    store = CheckpointStore(out)
    start = decide_start(out, store, fingerprint, tok_sha, overwrite=overwrite, resume=resume, log=log)
    if isinstance(start, Meta):
        return start

    # The data directory carries its tokenizer, so inspect and training need nothing else (unless
    # --out is the tokenizer's own directory).
    tokenizer_copies = []
    if model_file.resolve() != (out / MODEL_NAME).resolve():
        write_atomic(out / MODEL_NAME, model_file.read_bytes())
        write_atomic(out / INFO_NAME, (json.dumps({"vocab_size": vocab_size, "special_ids": specials,
                                                   "sha256": tok_sha}, indent=2) + "\n").encode())
        tokenizer_copies = [out / MODEL_NAME, out / INFO_NAME]

    run = ShardRun(out, sources, vocab_size, shard_tokens, store, start or ShardState(fingerprint, tok_sha),
                   val_fraction=val_fraction, dedup=dedup, strict=strict, log=log)
    if start is not None:
        position = start.state.position
        log(f"resuming from the checkpoint at {sources[position.source].describe()} line {position.line}: "
            f"{start.state.documents} documents, {start.state.tokens} tokens already written")
    units = iter_units(sources, field=field, position=run.state.position.as_tuple(), unit_bytes=unit_bytes)
    run.progress = Progress(progress, sources, run.state.position)
    started = time.perf_counter()
    try:
        with _tokenized(units, workers, model_file, field, max_doc_chars) as results:
            run.run(results)
    finally:
        run.progress.close()
    meta = finish(run, vocab_size=vocab_size, specials=specials, options=options, command=command or [],
                  tokenizer_copies=tokenizer_copies)
    log(_summary(meta, run.state, workers, time.perf_counter() - started, out))
    return meta
