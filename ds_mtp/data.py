"""The one token-shard format: writer, memory-mapped reader, and the window sampler.

A data directory holds, per split, shards ``{split}_{i:05d}.bin`` (token ids, little-endian uint16
when the vocabulary fits, else uint32) with ``{split}_{i:05d}.idx`` (int64 document start offsets
followed by the shard's token count, so ``len(idx) == documents + 1``), and one ``manifest.json``
describing the vocabulary, special ids and every shard. Files are written under temporary names,
fsynced and renamed, and ``manifest.json`` is written last: a directory whose manifest exists is
complete. Directories written by older versions name the manifest ``meta.json``; readers still
accept it (``manifest_path``).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ds_mtp.errors import UserError

if TYPE_CHECKING:  # torch is imported where batches are made, so data_prep's processes start fast
    import torch

META_NAME = "manifest.json"
"""File name of the manifest (the Meta below) in a data directory."""
LEGACY_META_NAMES = ("meta.json",)
"""Names older versions gave the manifest: read when ``META_NAME`` is absent."""
FORMAT_VERSION = 1


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:05d}"


def write_atomic(path: Path, data: bytes) -> None:
    """Write bytes under a temporary name, fsync, then rename into place."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def shard_hash_faults(data_dir: str | Path, info: "ShardInfo", manifest: str) -> list[str]:
    """The files of shard ``info`` whose sha256 differs from the manifest's, as fault lines ([] when both match)."""
    data_dir = Path(data_dir)
    faults = []
    if sha256_file(data_dir / f"{info.name}.bin") != info.sha256:
        faults.append(f"{info.name}.bin: sha256 differs from {manifest}")
    if sha256_file(data_dir / f"{info.name}.idx") != info.idx_sha256:
        faults.append(f"{info.name}.idx: sha256 differs from {manifest}")
    return faults


@dataclass
class ShardInfo:
    """One shard as recorded in the manifest."""

    name: str
    tokens: int
    documents: int
    sha256: str
    idx_sha256: str


@dataclass
class Meta:
    """Contents of the manifest (manifest.json): what a reader needs to interpret the shards."""

    vocab_size: int
    """Number of token ids; every id in every shard is below it."""
    dtype: str
    """numpy dtype string of the .bin files ("<u2" or "<u4")."""
    special_ids: dict
    """Special token ids by name: pad, bos, eos, unk (a missing or null entry means none)."""
    splits: dict = field(default_factory=dict)
    """Split name -> list of ShardInfo dicts."""
    max_token_id: int = -1
    """Largest id written in any shard (-1 when empty)."""
    extra: dict = field(default_factory=dict)
    """Producer-specific information (tokenizer hash, world parameters, command line ...)."""
    format_version: int = FORMAT_VERSION

    def shards(self, split: str) -> list[ShardInfo]:
        return [ShardInfo(**s) for s in self.splits.get(split, [])]

    def write(self, out_dir: Path) -> None:
        """Write OUT/manifest.json (atomically) and drop a manifest under an old name, which it replaces."""
        write_atomic(Path(out_dir) / META_NAME, (json.dumps(asdict(self), indent=2) + "\n").encode())
        for legacy in LEGACY_META_NAMES:
            (Path(out_dir) / legacy).unlink(missing_ok=True)


def manifest_path(data_dir: str | Path) -> Path | None:
    """The manifest of a data directory: ``manifest.json``, else an older version's ``meta.json``, else None."""
    for name in (META_NAME, *LEGACY_META_NAMES):
        path = Path(data_dir) / name
        if path.is_file():
            return path
    return None


def has_manifest(data_dir: str | Path) -> bool:
    """Whether ``data_dir`` holds a manifest, i.e. is a complete data directory."""
    return manifest_path(data_dir) is not None


def read_meta(data_dir: str | Path) -> Meta:
    if not Path(data_dir).is_dir():
        raise UserError(f"data directory not found: {data_dir}")
    path = manifest_path(data_dir)
    if path is None:
        raise UserError(f"no {META_NAME} in {data_dir}: not a ds-mtp data directory (or an unfinished one)")
    try:
        raw = json.loads(path.read_text())
        return Meta(**raw)
    except (json.JSONDecodeError, TypeError) as e:
        raise UserError(f"{path} is not a valid ds-mtp manifest: {e}") from None


SHARD_DTYPES = ("<u2", "<u4")
"""The token dtypes a shard may have (``token_dtype``)."""


def shard_dtype(meta: Meta, data_dir: str | Path) -> np.dtype:
    """The manifest's token dtype, refused in one line unless it is one of SHARD_DTYPES."""
    if meta.dtype not in SHARD_DTYPES:
        raise UserError(f"{manifest_path(data_dir)} has dtype {meta.dtype!r}; ds-mtp shards are "
                        f"{' or '.join(SHARD_DTYPES)}")
    return np.dtype(meta.dtype)


def shard_size_problem(data_dir: str | Path, info: ShardInfo, dtype: np.dtype, manifest: str) -> str | None:
    """Why shard ``info`` cannot be memory-mapped as the manifest describes it (a line), or None when it can.

    Only file sizes are read: a ``.bin`` of ``tokens`` ids of ``dtype`` and an ``.idx`` of ``documents + 1``
    int64 offsets. A truncated shard, an odd byte count or a dtype the shards were not written with fail here."""
    data_dir = Path(data_dir)
    bin_path, idx_path = data_dir / f"{info.name}.bin", data_dir / f"{info.name}.idx"
    if not bin_path.is_file() or not idx_path.is_file():
        return f"shard {info.name} listed in {manifest} is missing from {data_dir}"
    size, expected = bin_path.stat().st_size, info.tokens * dtype.itemsize
    if size != expected:
        return (f"shard {bin_path} does not match {manifest}: {size} bytes, not {info.tokens} tokens of {dtype.str} "
                f"({expected} bytes); the shard is truncated or replaced, or the manifest's dtype is wrong")
    size, expected = idx_path.stat().st_size, (info.documents + 1) * 8
    if size != expected:
        return (f"shard index {idx_path} does not match {manifest}: {size} bytes, not {info.documents + 1} int64 "
                f"offsets ({expected} bytes); the index is truncated or replaced")
    return None


class ShardWriter:
    """Appends documents to the shards of one split, rolling over every ~``shard_tokens`` tokens.

    Shards become visible under their final names only when complete; call ``close()`` and then
    record the returned infos in a Meta written last. A long-running producer can call
    ``checkpoint()`` (which fsyncs the open shard's temporary file) and later rebuild the writer
    exactly where it was with ``ShardWriter.restore`` after being killed.
    """

    def __init__(self, out_dir: str | Path, split: str, vocab_size: int, shard_tokens: int = 1 << 26,
                 first_index: int = 0):
        if shard_tokens < 1:
            raise ValueError("shard_tokens must be at least 1")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.split = split
        self.vocab_size = vocab_size
        self.dtype = token_dtype(vocab_size)
        self.shard_tokens = shard_tokens
        self.index = first_index
        self.infos: list[ShardInfo] = []
        self.max_token_id = -1
        self._open()

    def _paths(self, index: int) -> tuple[Path, Path, Path]:
        base = self.out_dir / shard_name(self.split, index)
        bin_path = base.with_suffix(".bin")
        return bin_path, base.with_suffix(".idx"), bin_path.with_name(bin_path.name + ".tmp")

    def _open(self, mode: str = "wb") -> None:
        self._bin_path, self._idx_path, self._tmp_path = self._paths(self.index)
        self._bin = open(self._tmp_path, mode)
        self._bin_hash = hashlib.sha256()
        # Document end offsets as a list of int64 arrays (a Python list of ints costs ~4x the memory).
        self._ends: list[np.ndarray] = []
        self._tokens = 0
        self._documents = 0

    def add(self, tokens) -> None:
        """Append one document (a sequence of token ids)."""
        arr = np.asarray(tokens)
        self.add_many(arr.reshape(-1), np.array([arr.size], dtype=np.int64))

    def add_many(self, tokens, lengths) -> None:
        """Append consecutive documents given as one flat token array and their lengths.

        Writes exactly what ``add`` would for each document in turn (same rollover points).
        """
        tokens = np.asarray(tokens).reshape(-1)
        lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
        if int(lengths.sum()) != tokens.size:
            raise ValueError(f"document lengths sum to {int(lengths.sum())}, but {tokens.size} tokens were given")
        if tokens.size:
            lo, hi = int(tokens.min()), int(tokens.max())
            if lo < 0 or hi >= self.vocab_size:
                raise ValueError(f"token id out of range [0, {self.vocab_size}) in document")
            self.max_token_id = max(self.max_token_id, hi)
        data = tokens.astype(self.dtype, copy=False)
        pos = first = 0
        while first < lengths.size:
            ends = np.cumsum(lengths[first:])
            # A shard closes after the document that brings it to shard_tokens or more.
            room = self.shard_tokens - self._tokens
            take = min(int(np.searchsorted(ends, room, side="left")) + 1, ends.size)
            count = int(ends[take - 1])
            chunk = data[pos:pos + count].tobytes()
            self._bin.write(chunk)
            self._bin_hash.update(chunk)
            self._ends.append(self._tokens + ends[:take])
            self._tokens += count
            self._documents += take
            pos += count
            first += take
            if self._tokens >= self.shard_tokens:
                self._finish()
                self.index += 1
                self._open()

    def _offsets(self) -> np.ndarray:
        return np.concatenate([np.zeros(1, dtype=np.int64), *self._ends]).astype("<i8")

    def _finish(self) -> None:
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        os.replace(self._tmp_path, self._bin_path)
        idx = self._offsets().tobytes()
        write_atomic(self._idx_path, idx)
        self.infos.append(ShardInfo(
            name=self._bin_path.stem, tokens=self._tokens, documents=self._documents,
            sha256=self._bin_hash.hexdigest(), idx_sha256=hashlib.sha256(idx).hexdigest()))

    def checkpoint(self) -> dict:
        """Make everything written so far durable and return the state ``restore`` needs.

        The state is JSON-serialisable except ``offsets`` (an int64 array the caller stores itself).
        """
        self._bin.flush()
        os.fsync(self._bin.fileno())
        return {"split": self.split, "vocab_size": self.vocab_size, "shard_tokens": self.shard_tokens,
                "index": self.index, "infos": [asdict(i) for i in self.infos], "max_token_id": self.max_token_id,
                "offsets": self._offsets()}

    @classmethod
    def restore(cls, out_dir: str | Path, state: dict) -> "ShardWriter":
        """Rebuild a writer from ``checkpoint()``'s state after the process died.

        Shards completed after the checkpoint are removed (they will be written again, identically),
        and the open shard's temporary file is cut back to its checkpointed length. Its bytes may sit
        under the final name if the process died between the rename and the next checkpoint.
        """
        self = cls.__new__(cls)
        self.out_dir = Path(out_dir)
        self.split, self.vocab_size = state["split"], state["vocab_size"]
        self.dtype = token_dtype(self.vocab_size)
        self.shard_tokens, self.index = state["shard_tokens"], state["index"]
        self.infos = [ShardInfo(**i) for i in state["infos"]]
        self.max_token_id = state["max_token_id"]
        offsets = np.asarray(state["offsets"], dtype=np.int64)
        nbytes = int(offsets[-1]) * self.dtype.itemsize
        bin_path, idx_path, tmp_path = self._paths(self.index)
        if not tmp_path.exists() and bin_path.exists():
            os.replace(bin_path, tmp_path)
        if nbytes and (not tmp_path.exists() or tmp_path.stat().st_size < nbytes):
            raise UserError(f"cannot resume: {tmp_path} is missing or shorter than its checkpoint")
        for later in sorted(self.out_dir.glob(f"{self.split}_*")):
            stem = later.name.split(".")[0]
            if stem[len(self.split) + 1:].isdigit() and int(stem[len(self.split) + 1:]) >= self.index \
                    and later != tmp_path:
                later.unlink()
        if not tmp_path.exists():
            tmp_path.touch()
        with open(tmp_path, "rb+") as f:
            f.truncate(nbytes)
        self._open(mode="ab")
        with open(tmp_path, "rb") as f:
            while block := f.read(1 << 22):
                self._bin_hash.update(block)
        if offsets.size > 1:
            self._ends = [offsets[1:].copy()]
        self._tokens, self._documents = int(offsets[-1]), int(offsets.size - 1)
        return self

    def close(self) -> list[ShardInfo]:
        """Finish the open shard (dropped if empty) and return all shard infos."""
        if self._documents:
            self._finish()
        else:
            self._bin.close()
            os.unlink(self._tmp_path)
        return self.infos

    def discard(self) -> None:
        """Close and delete the open shard's temporary file (completed shards stay)."""
        self._bin.close()
        self._tmp_path.unlink(missing_ok=True)


def write_documents(out_dir: str | Path, documents_by_split: dict, *, vocab_size: int, special_ids: dict,
                    extra: dict | None = None, shard_tokens: int = 1 << 26) -> Meta:
    """Write whole splits (iterables of token sequences) and the manifest in one call."""
    meta = Meta(vocab_size=vocab_size, dtype=token_dtype(vocab_size).str, special_ids=special_ids,
                extra=extra or {})
    for split, docs in documents_by_split.items():
        writer = ShardWriter(out_dir, split, vocab_size, shard_tokens)
        for doc in docs:
            writer.add(doc)
        meta.splits[split] = [asdict(i) for i in writer.close()]
        meta.max_token_id = max(meta.max_token_id, writer.max_token_id)
    meta.write(Path(out_dir))
    return meta


class TokenShards:
    """Memory-mapped view of one split: token arrays and document offsets per shard."""

    def __init__(self, data_dir: str | Path, split: str = "train"):
        self.data_dir = Path(data_dir)
        self.meta = read_meta(data_dir)
        manifest = manifest_path(data_dir).name
        self.split = split
        infos = [s for s in self.meta.shards(split) if s.tokens > 0]
        if not infos:
            raise UserError(f"{data_dir} has no '{split}' tokens")
        self.tokens: list[np.ndarray] = []
        self.offsets: list[np.ndarray] = []
        dtype = shard_dtype(self.meta, data_dir)
        for info in infos:
            bin_path = self.data_dir / f"{info.name}.bin"
            idx_path = self.data_dir / f"{info.name}.idx"
            problem = shard_size_problem(data_dir, info, dtype, manifest)
            if problem:  # before np.memmap, which fails on an odd byte count with a traceback
                raise UserError(problem)
            toks = np.memmap(bin_path, dtype=dtype, mode="r")
            offs = np.fromfile(idx_path, dtype="<i8")
            if toks.size != info.tokens or offs.size != info.documents + 1 or offs[-1] != toks.size:
                raise UserError(f"shard {info.name} in {data_dir} does not match {manifest} (truncated or replaced)")
            self.tokens.append(toks)
            self.offsets.append(offs)

    @property
    def num_tokens(self) -> int:
        return sum(t.size for t in self.tokens)

    @property
    def num_documents(self) -> int:
        return sum(o.size - 1 for o in self.offsets)

    def document(self, i: int) -> np.ndarray:
        """Document i of the split (across shards), as an int64 array."""
        for toks, offs in zip(self.tokens, self.offsets):
            n = offs.size - 1
            if i < n:
                return np.asarray(toks[offs[i]:offs[i + 1]], dtype=np.int64)
            i -= n
        raise IndexError(i)


@dataclass
class Batch:
    tokens: torch.Tensor
    """[B, T] int64 token ids."""
    doc_ids: torch.Tensor
    """[B, T] int64; equal values mark positions of one document within a row."""


SAMPLING_MODES = ("packed", "packed_documents", "document")
"""How windows are cut from a split (see WindowSampler)."""


def pack_documents(lengths: np.ndarray, capacity: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Best-fit-decreasing packing of whole documents into windows of ``capacity`` tokens.

    lengths [N] (each <= capacity). Documents are taken longest first (ties in ``rng``'s order); each goes
    into the open window with the least room that fits it, else opens a window. Returns (order [N]: the
    documents window by window, in placement order; bounds [W+1]: window w holds order[bounds[w]:bounds[w+1]]).
    Places whole groups of equal length at once: the Python-level loop grows with capacity², not with N
    (2M documents into windows of 512 in 0.8 s).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    by_room: list[list[np.ndarray]] = [[] for _ in range(capacity + 1)]  # room -> arrays of window ids
    doc_window = np.empty(lengths.size, dtype=np.int64)
    n_windows = 0
    shuffled = rng.permutation(lengths.size)
    order = shuffled[np.argsort(-lengths[shuffled], kind="stable")]
    starts = np.flatnonzero(np.r_[True, lengths[order][1:] != lengths[order][:-1]])
    for first, last in zip(starts, np.r_[starts[1:], order.size]):
        docs, length = order[first:last], int(lengths[order[first]])
        placed = 0
        while placed < docs.size:  # best fit: the open windows with the least room that still fits
            room = next((r for r in range(length, capacity + 1) if by_room[r]), None)
            if room is None:
                break
            windows = by_room[room].pop()
            take = min(windows.size, docs.size - placed)
            doc_window[docs[placed:placed + take]] = windows[:take]
            placed += take
            if take < windows.size:
                by_room[room].append(windows[take:])
            if room > length:
                by_room[room - length].append(windows[:take])
        if placed < docs.size:  # new windows, each filled with as many of these documents as fit
            per_window = capacity // length
            fresh = n_windows + np.arange(docs.size - placed) // per_window
            doc_window[docs[placed:]] = fresh
            n_windows = int(fresh[-1]) + 1
            used = np.bincount(fresh - fresh[0]) * length
            for room in np.unique(capacity - used):
                if room > 0:
                    by_room[room].append(fresh[0] + np.flatnonzero(capacity - used == room))
    # Within a window, documents keep their placement order (longest first).
    placement = np.empty(lengths.size, dtype=np.int64)
    placement[order] = np.arange(order.size)
    packed = np.lexsort((placement, doc_window))
    bounds = np.searchsorted(doc_window[packed], np.arange(n_windows + 1))
    return packed, bounds


def _concat_ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """[start_0, …, start_0 + count_0 − 1, start_1, …]: the ranges one after the other, vectorised."""
    offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    return np.repeat(starts, counts) + offsets


class WindowSampler:
    """Deterministic, rank-disjoint, resumable batches of fixed-length windows.

    ``mode="packed"``: the split is cut into consecutive non-overlapping windows of ``seq_len``
    tokens (per shard); documents run across window positions and ``doc_ids`` tell them apart (a
    document may continue into the next window).
    ``mode="packed_documents"``: whole documents packed into windows (best fit decreasing, once per run
    from ``seed``); a document never spans two windows, and padding sits only at a window's tail, with
    doc id -1. Every document must fit in ``seq_len``. For many short documents (graph paths): with
    model.attention = "document" each is computed as if alone in its row, without its padding.
    ``mode="document"``: one document per row, truncated to ``seq_len`` and right-padded with the
    pad id (for short, self-contained sequences such as graph paths).

    Samples (windows, or documents) are drawn from a stream that is a fresh permutation every epoch
    (seeded by ``seed`` and the epoch). Micro-batch ``g`` of data-parallel rank ``r`` takes stream items
    ``[(g*dp + r)*B, (g*dp + r + 1)*B)``, so ranks never share a sample and the position is a
    single integer.
    """

    def __init__(self, shards: TokenShards, seq_len: int, micro_batch: int, *, seed: int = 0,
                 dp_rank: int = 0, dp_size: int = 1, mode: str = "packed"):
        if mode not in SAMPLING_MODES:
            raise UserError(f"unknown sampling mode '{mode}' (expected {', '.join(SAMPLING_MODES)})")
        self.shards, self.seq_len, self.micro_batch = shards, seq_len, micro_batch
        self.seed, self.dp_rank, self.dp_size, self.mode = seed, dp_rank, dp_size, mode
        self.pad_id = shards.meta.special_ids.get("pad")
        if mode != "packed" and self.pad_id is None:
            raise UserError(f"data.sampling={mode} needs a pad id in the special_ids of {META_NAME}")
        if mode == "packed":
            per_shard = np.array([t.size // seq_len for t in shards.tokens], dtype=np.int64)
            if per_shard.sum() == 0:
                raise UserError(f"split '{shards.split}' has fewer tokens than one window of {seq_len}")
        elif mode == "document":
            per_shard = np.array([o.size - 1 for o in shards.offsets], dtype=np.int64)
        else:
            per_shard = self._pack()
        self._first = np.concatenate([[0], np.cumsum(per_shard)])
        self.num_samples = int(self._first[-1])
        self._perms: dict[int, np.ndarray] = {}

    def _pack(self) -> np.ndarray:
        """Pack the split's documents (packed_documents); returns [number of windows] as the one 'shard'."""
        starts = np.concatenate([o[:-1] for o in self.shards.offsets])
        lengths = np.concatenate([np.diff(o) for o in self.shards.offsets])
        shard = np.repeat(np.arange(len(self.shards.offsets)), [o.size - 1 for o in self.shards.offsets])
        too_long = lengths > self.seq_len
        if too_long.any():
            raise UserError(f"data.sampling=packed_documents: {int(too_long.sum()):,} of {lengths.size:,} documents "
                            f"in split '{self.shards.split}' are longer than train.seq_len={self.seq_len} (longest "
                            f"{int(lengths.max())} tokens); raise train.seq_len or use data.sampling=packed")
        order, self._bounds = pack_documents(lengths, self.seq_len, np.random.default_rng([self.seed, 0x9AC4]))
        self._doc_shard, self._doc_start, self._doc_len = shard[order], starts[order], lengths[order]
        self._doc_index = order  # the document's number in the split: its doc id
        # Each document's column in its window.
        ends = np.cumsum(self._doc_len)
        window_of = np.repeat(np.arange(self._bounds.size - 1), np.diff(self._bounds))
        window_start = np.r_[0, ends][self._bounds[:-1]]
        self._doc_col = ends - self._doc_len - window_start[window_of]
        return np.array([self._bounds.size - 1], dtype=np.int64)

    @property
    def fill(self) -> float:
        """Share of the window positions that hold tokens (not padding), over the whole split."""
        if self.mode == "packed":
            return 1.0
        if self.mode == "document":
            lengths = np.concatenate([np.minimum(np.diff(o), self.seq_len) for o in self.shards.offsets])
            return float(lengths.sum() / (lengths.size * self.seq_len))
        return float(self._doc_len.sum() / (self.num_samples * self.seq_len))

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.clear()
            rng = np.random.default_rng([self.seed, epoch])
            self._perms[epoch] = rng.permutation(self.num_samples)
        return self._perms[epoch]

    def sample_ids(self, micro_index: int) -> np.ndarray:
        start = (micro_index * self.dp_size + self.dp_rank) * self.micro_batch
        stream = np.arange(start, start + self.micro_batch, dtype=np.int64)
        epochs, within = np.divmod(stream, self.num_samples)
        ids = np.empty_like(stream)
        for e in np.unique(epochs):
            sel = epochs == e
            ids[sel] = self._permutation(int(e))[within[sel]]
        return ids

    def batch(self, micro_index: int) -> Batch:
        """The micro-batch number ``micro_index`` (counted from 0 over the whole run) of this rank."""
        ids = self.sample_ids(micro_index)
        if self.mode == "packed_documents":
            return self._packed_documents_batch(ids)
        T = self.seq_len
        tokens = np.empty((ids.size, T), dtype=np.int64)
        doc_ids = np.empty((ids.size, T), dtype=np.int64)
        shard_of = np.searchsorted(self._first, ids, side="right") - 1
        cols = np.arange(T, dtype=np.int64)
        for s in np.unique(shard_of):
            rows = np.nonzero(shard_of == s)[0]
            local = ids[rows] - self._first[s]
            toks, offs = self.shards.tokens[s], self.shards.offsets[s]
            if self.mode == "packed":
                pos = local[:, None] * T + cols  # [n, T] absolute positions in the shard
                tokens[rows] = toks[pos]
                doc_ids[rows] = np.searchsorted(offs, pos, side="right") - 1
            else:
                start, length = offs[local], np.minimum(offs[local + 1] - offs[local], T)
                inside = cols < length[:, None]
                pos = np.where(inside, start[:, None] + cols, start[:, None])
                tokens[rows] = np.where(inside, toks[pos], self.pad_id)
                doc_ids[rows] = local[:, None]
        import torch

        self._check_ids(tokens)
        return Batch(torch.from_numpy(tokens), torch.from_numpy(doc_ids))

    def _check_ids(self, tokens: np.ndarray) -> None:
        """A token id outside the vocabulary would fail deep in the embedding; the manifest said it cannot occur,
        so a shard changed after it was checked (ds_mtp.data_checks). One comparison per batch."""
        top = int(tokens.max()) if tokens.size else -1
        if top >= self.shards.meta.vocab_size:
            raise UserError(f"split '{self.shards.split}' of {self.shards.data_dir} holds token id {top}, not below its "
                            f"vocab_size={self.shards.meta.vocab_size}: a shard changed after it was written (ds-mtp "
                            f"prep verify {self.shards.data_dir} names it)")

    def _packed_documents_batch(self, windows: np.ndarray) -> Batch:
        import torch

        T = self.seq_len
        tokens = np.full((windows.size, T), self.pad_id, dtype=np.int64)
        doc_ids = np.full((windows.size, T), -1, dtype=np.int64)
        counts = self._bounds[windows + 1] - self._bounds[windows]
        docs = _concat_ranges(self._bounds[windows], counts)
        rows = np.repeat(np.arange(windows.size), counts)
        lengths = self._doc_len[docs]
        # One entry per token of the batch: its document (in packing order), row and column.
        token_doc = np.repeat(docs, lengths)
        within = _concat_ranges(np.zeros_like(lengths), lengths)
        token_row = np.repeat(rows, lengths)
        token_col = self._doc_col[token_doc] + within
        for s in np.unique(self._doc_shard[docs]):
            sel = self._doc_shard[token_doc] == s
            source = self._doc_start[token_doc[sel]] + within[sel]
            tokens[token_row[sel], token_col[sel]] = self.shards.tokens[s][source]
        doc_ids[token_row, token_col] = self._doc_index[token_doc]
        self._check_ids(tokens)
        return Batch(torch.from_numpy(tokens), torch.from_numpy(doc_ids))
