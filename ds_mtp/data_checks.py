"""The checks a run makes on its data before any rank starts: one line and exit 2 instead of a crash mid-run.

``data.verify=quick`` (the default) costs a ``stat`` per shard: the manifest's dtype, its largest token id
against the model's vocabulary, and every shard's ``.bin`` and ``.idx`` sizes against the token and
document counts the manifest records. It catches a truncated or odd-sized shard, a manifest whose dtype
does not match the shards (``<u4`` over ``<u2`` data), and data made with a larger vocabulary. A manifest
without ``max_token_id`` (another producer's; ds-mtp's writers have always recorded it) vouches for no id,
so its shards' ids are read instead.

``data.verify=full`` also reads every shard of the splits the run uses: the sha256 of each ``.bin`` and
``.idx`` against the manifest (what ``ds-mtp prep shard`` and ``ds-mtp world make`` record) and the
largest token id actually stored. It catches a shard overwritten in place with the same size. It costs one
read of the data, once, in the launching process.

What neither can see, a shard changed after the run started, the sampler still refuses batch by batch
(``ds_mtp.data.WindowSampler``): a token id outside the vocabulary stops the run with one line, not an
``IndexError`` deep in the embedding.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ds_mtp.data import Meta, ShardInfo, manifest_path, shard_dtype, shard_hash_faults, shard_size_problem
from ds_mtp.errors import UserError

VERIFY_MODES = ("quick", "full")
"""Values of data.verify (see the module docstring)."""

_SCAN_TOKENS = 1 << 24


def check_data(data_dir: str | Path, meta: Meta, splits: list[str], vocab_size: int, mode: str = "quick") -> None:
    """Raise a one-line UserError if the splits of ``data_dir`` cannot be read by a model of ``vocab_size``."""
    data_dir = Path(data_dir)
    manifest = manifest_path(data_dir).name
    dtype = shard_dtype(meta, data_dir)
    if meta.max_token_id >= vocab_size:
        raise UserError(f"data in {data_dir} has token id {meta.max_token_id}, not below the model's "
                        f"vocab_size={vocab_size} (max_token_id of {manifest})")
    # A manifest without max_token_id (another producer's) cannot vouch for the ids: they are read instead.
    unvouched = meta.max_token_id < 0
    for split in dict.fromkeys(splits):
        for info in meta.shards(split):
            problem = shard_size_problem(data_dir, info, dtype, manifest)
            if problem:
                raise UserError(problem)
            if mode == "full":
                _check_hashes(data_dir, info, manifest)
            if mode == "full" or unvouched:
                _scan_ids(data_dir / f"{info.name}.bin", info, dtype, vocab_size)


def _check_hashes(data_dir: Path, info: ShardInfo, manifest: str) -> None:
    faults = shard_hash_faults(data_dir, info, manifest)
    if faults:
        raise UserError(f"data.verify=full: {data_dir}/{faults[0]} (changed after it was written; ds-mtp prep verify "
                        f"{data_dir} lists every fault)")


def _scan_ids(bin_path: Path, info: ShardInfo, dtype: np.dtype, vocab_size: int) -> None:
    tokens = np.memmap(bin_path, dtype=dtype, mode="r") if info.tokens else np.zeros(0, dtype)
    for start in range(0, tokens.size, _SCAN_TOKENS):
        top = int(tokens[start:start + _SCAN_TOKENS].max())
        if top >= vocab_size:
            raise UserError(f"{bin_path} holds token id {top}, not below the model's vocab_size={vocab_size}")
