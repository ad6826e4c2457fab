"""The data a run reads: the manifest checked against the model, and the windows of a split."""

from __future__ import annotations

from ds_mtp.config import RunConfig
from ds_mtp.data import Meta, TokenShards, WindowSampler, read_meta
from ds_mtp.data_checks import check_data
from ds_mtp.errors import UserError


def resolve_data(cfg: RunConfig, verify: bool = False) -> RunConfig:
    """Fill the vocab size from the data and check that the data fits the model (ds_mtp.data_checks); with
    ``verify`` (the launching process), data.verify=full also hashes the shards."""
    return load_run_data(cfg, verify)[0]


def load_run_data(cfg: RunConfig, verify: bool = False) -> tuple[RunConfig, Meta]:
    """resolve_data, and the data's manifest it read (read once per process)."""
    if not cfg.data.path:
        raise UserError("no training data: set data.path=DIR (a directory written by ds-mtp prep or ds-mtp world make)")
    meta = read_meta(cfg.data.path)
    if cfg.data.split not in meta.splits:
        raise UserError(f"{cfg.data.path} has no split '{cfg.data.split}' (has: {', '.join(meta.splits) or 'none'})")
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = meta.vocab_size
    verify_mode = cfg.data.verify if verify else "quick"
    check_data(cfg.data.path, meta, [cfg.data.split], cfg.model.vocab_size, verify_mode)
    if meta.vocab_size > cfg.model.vocab_size:
        raise UserError(f"data in {cfg.data.path} declares vocab_size={meta.vocab_size} > model.vocab_size="
                        f"{cfg.model.vocab_size}")
    if cfg.train.eval_every or cfg.data.eval_split:
        from ds_mtp.validation import EVAL_SEED, resolve_eval_split

        cfg.data.eval_split = resolve_eval_split(cfg, meta)
        window_sampler(cfg, cfg.data.eval_split, seed=EVAL_SEED)  # a split too short for one window fails here
        check_data(cfg.data.path, meta, [cfg.data.eval_split], cfg.model.vocab_size, verify_mode)
    return cfg, meta


def window_sampler(cfg: RunConfig, split: str, *, seed: int, dp_rank: int = 0, dp_size: int = 1) -> WindowSampler:
    """The windows a run reads from one split: the training data (seed train.seed), or the validation
    windows of train.eval_every (ds_mtp.validation.EVAL_SEED)."""
    t = cfg.train
    return WindowSampler(TokenShards(cfg.data.path, split), t.seq_len, t.micro_batch, seed=seed,
                         dp_rank=dp_rank, dp_size=dp_size, mode=cfg.data.sampling)
