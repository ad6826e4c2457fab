"""Check a data directory shard by shard, and decode documents for a human to read."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ds_mtp.data import manifest_path, read_meta, shard_hash_faults
from ds_mtp.errors import UserError
from data_prep.tokenizer import MODEL_NAME, load_processor, tokenizer_sha256

_CHUNK_TOKENS = 1 << 24


def verify_data(data_dir: str | Path, log=print) -> list[str]:
    """Re-check every shard of every split; returns the faults found (empty when all is well).

    Per shard: the .bin's and .idx's sha256 against the manifest, the index starting at 0, never
    decreasing and ending at the .bin's token count, every id below the vocabulary size, and (for
    data_prep output) every document ending in EOS. Also the tokenizer copy against its recorded hash.
    """
    data_dir = Path(data_dir)
    meta = read_meta(data_dir)
    manifest = manifest_path(data_dir).name
    dtype = np.dtype(meta.dtype)
    eos = meta.special_ids.get("eos") if meta.extra.get("eos_appended") else None
    faults: list[str] = []
    tokens = documents = shards = 0
    for split in meta.splits:
        for info in meta.shards(split):
            shards += 1
            bin_path, idx_path = data_dir / f"{info.name}.bin", data_dir / f"{info.name}.idx"
            if not bin_path.is_file() or not idx_path.is_file():
                faults.append(f"{info.name}: missing {'.bin' if not bin_path.is_file() else '.idx'}")
                continue
            faults += shard_hash_faults(data_dir, info, manifest)
            idx_bytes = idx_path.read_bytes()
            size = bin_path.stat().st_size
            if size % dtype.itemsize:
                faults.append(f"{info.name}.bin: {size} bytes is not a whole number of {dtype} tokens")
                continue
            n_tokens = size // dtype.itemsize
            if len(idx_bytes) % 8:
                faults.append(f"{info.name}.idx: {len(idx_bytes)} bytes is not a whole number of int64 offsets")
                continue
            offsets = np.frombuffer(idx_bytes, dtype="<i8")
            if offsets.size < 2 or offsets[0] != 0 or np.any(np.diff(offsets) < 0) or offsets[-1] != n_tokens:
                faults.append(f"{info.name}.idx: offsets must start at 0, never decrease and end at the token count "
                              f"{n_tokens} (ends at {int(offsets[-1]) if offsets.size else 'nothing'})")
                continue
            if n_tokens != info.tokens or offsets.size - 1 != info.documents:
                faults.append(f"{info.name}: {n_tokens} tokens / {offsets.size - 1} documents, {manifest} says "
                              f"{info.tokens} / {info.documents}")
            toks = np.memmap(bin_path, dtype=dtype, mode="r")
            for start in range(0, n_tokens, _CHUNK_TOKENS):
                top = int(toks[start:start + _CHUNK_TOKENS].max())
                if top >= meta.vocab_size:
                    faults.append(f"{info.name}.bin: token id {top} is not below the vocabulary size {meta.vocab_size}")
                    break
            if eos is not None:
                ends = offsets[1:][np.diff(offsets) > 0] - 1
                bad = np.nonzero(toks[ends] != eos)[0]
                if bad.size:
                    faults.append(f"{info.name}: {bad.size} document(s) do not end with EOS ({eos})")
            tokens += n_tokens
            documents += offsets.size - 1
    tokenizer_hash = meta.extra.get("tokenizer_sha256")
    copy = data_dir / MODEL_NAME
    if tokenizer_hash and copy.is_file() and tokenizer_sha256(copy) != tokenizer_hash:
        faults.append(f"{MODEL_NAME}: sha256 differs from the one the shards were made with")
    for fault in faults:
        log(f"FAULT {fault}")
    splits = ", ".join(f"{s} {sum(i.tokens for i in meta.shards(s)):,} tokens / "
                       f"{sum(i.documents for i in meta.shards(s)):,} docs" for s in meta.splits)
    log(f"{'FAILED' if faults else 'OK'}: {shards} shard(s), {documents:,} documents, {tokens:,} tokens checked "
        f"({splits}; vocab {meta.vocab_size}, {meta.dtype}) with {len(faults)} fault(s) in {data_dir}")
    return faults


def inspect_data(data_dir: str | Path, *, shard: str = "", split: str = "train", count: int = 3, tokenizer: str = "",
                 max_chars: int = 2000, show_ids: bool = False, log=print) -> list[str]:
    """Decode and print the first ``count`` documents of a shard (default: the split's first)."""
    data_dir = Path(data_dir)
    meta = read_meta(data_dir)
    manifest = manifest_path(data_dir).name
    if count < 1:
        raise UserError(f"-n must be at least 1, got {count}")
    names = [i.name for s in meta.splits for i in meta.shards(s)]
    if shard:
        if shard not in names:
            raise UserError(f"no shard '{shard}' in {data_dir} (has: {', '.join(names) or 'none'})")
    else:
        if split not in meta.splits:
            raise UserError(f"{data_dir} has no split '{split}' (has: {', '.join(meta.splits)})")
        if not meta.shards(split):
            raise UserError(f"split '{split}' of {data_dir} has no shards")
        shard = meta.shards(split)[0].name
    processor = load_processor(tokenizer or data_dir / MODEL_NAME)
    if processor.get_piece_size() != meta.vocab_size:
        raise UserError(f"tokenizer has {processor.get_piece_size()} pieces but {data_dir} was made with "
                        f"vocab_size={meta.vocab_size}")
    bin_path, idx_path = data_dir / f"{shard}.bin", data_dir / f"{shard}.idx"
    if not bin_path.is_file() or not idx_path.is_file():
        raise UserError(f"shard {shard} listed in {manifest} is missing from {data_dir}")
    toks = np.memmap(bin_path, dtype=np.dtype(meta.dtype), mode="r")
    offsets = np.fromfile(idx_path, dtype="<i8")
    texts = []
    for i in range(min(count, offsets.size - 1)):
        ids = toks[offsets[i]:offsets[i + 1]].tolist()
        text = processor.decode(ids)
        texts.append(text)
        shown = text if len(text) <= max_chars else text[:max_chars] + f" [... {len(text) - max_chars} more chars]"
        log(f"=== {shard} document {i}: {len(ids)} tokens ===")
        if show_ids:
            log(" ".join(map(str, ids)))
        log(shown)
    return texts
