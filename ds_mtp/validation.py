"""Held-out evaluation while training (``train.eval_every``): cross-entropy and top-1 accuracy per head.

Every ``eval_every`` optimizer steps (and at the last step) each data-parallel replica runs the forward
pass, in eval mode and without gradients, on the first ``eval_batches`` micro-batches of a validation
``WindowSampler`` over ``data.eval_split``. Its seed is fixed (``EVAL_SEED``), so every evaluation of
a run, and of runs with other ``train.seed``s, sees the same windows; micro-batch g of replica r is
stream item (g·D + r), so the replicas' shares are disjoint and their union is the same for any number
of replicas D at the same D × eval_batches.

Each rank sums, per head k, CE_k × n_k, hits_k and n_k (n_k = valid target positions, the ones the
loss counts); the sums are all-reduced, so eval_ce_k is the mean over every evaluated position, not a
mean of per-batch means. Training is untouched: the training sampler is never read, a teacher is never
asked (the CE terms do not depend on latent targets), and the torch / numpy / python RNG states and the
modules' train mode are restored afterwards.

Results are added to the metrics row of that step: ``eval_ce_1..K`` and ``eval_acc_1..K`` (ds_mtp.monitor
writes them to TensorBoard as ``eval/ce_k`` and ``eval/acc_k``).
"""

from __future__ import annotations

import torch

from ds_mtp.errors import UserError
from ds_mtp.objective import head_sums, head_sums_size, heldout_metrics

EVAL_SEED = 0
"""Seed of the validation windows' order: fixed, so the evaluated windows do not depend on train.seed."""
AUTO_SPLITS = ("val", "heldout")
"""data.eval_split="" takes the first of these the data has: ds-mtp prep's validation split, a world's held-out paths."""


def splits_with_tokens(meta) -> list[str]:
    return [name for name, shards in meta.splits.items() if any(s.get("tokens", 0) > 0 for s in shards)]


def resolve_eval_split(cfg, meta) -> str:
    """The split train.eval_every evaluates: data.eval_split, or the first of AUTO_SPLITS with tokens."""
    present = splits_with_tokens(meta)
    requested = cfg.data.eval_split
    if requested:
        if requested not in present:
            raise UserError(f"data.eval_split={requested}: {cfg.data.path} has no '{requested}' tokens "
                            f"(splits with tokens: {', '.join(present) or 'none'})")
        return requested
    for name in AUTO_SPLITS:
        if name in present:
            return name
    raise UserError(f"train.eval_every={cfg.train.eval_every} needs a validation split, but {cfg.data.path} has only "
                    f"{', '.join(present) or 'no split with tokens'}: set data.eval_split=SPLIT, or write a 'val' "
                    "split with ds-mtp prep shard --val-fraction")


def _zero_sums(engine, sampler, batches: int, pad_id: int | None, device) -> torch.Tensor:
    """The ZeRO layout: every rank runs the engine's forward (ZeRO-3 gathers parameters collectively)."""
    sums = None
    for index in range(batches):
        batch = sampler.batch(index)
        tokens, doc_ids = batch.tokens.to(device), batch.doc_ids.to(device)
        part = head_sums(engine(tokens, doc_ids), tokens, doc_ids, pad_id)
        sums = part if sums is None else sums + part
    return sums.cpu()


def _pipeline_sums(engine, loss_fn, sampler, batches: int, n_terms: int) -> torch.Tensor:
    """The pipeline: DeepSpeed's eval_batch on every stage; the last stage's PipelineLoss collects the sums
    in its eval_sums (apart from the training terms). Zeros on the other stages."""
    from ds_mtp.pipeline import micro_batches

    loss_fn.eval_sums = []
    try:
        engine.eval_batch(micro_batches(sampler, 0, batches, engine.device), compute_loss=True, reduce_output=None,
                          bcast_loss=False, num_micro_batches=batches)
        collected = loss_fn.eval_sums
    finally:
        loss_fn.eval_sums = None
    sums = torch.zeros(n_terms, dtype=torch.float64)
    for part in collected:
        sums += part.cpu()
    return sums


class Validator:
    """Evaluates one rank's share of the validation windows and reduces the per-head results over ranks."""

    def __init__(self, cfg, sampler, pad_id: int | None, loss_fn=None):
        t = cfg.train
        self.every, self.last_step, self.K = t.eval_every, t.max_steps, cfg.model.mtp_k
        self.sampler, self.pad_id, self.loss_fn = sampler, pad_id, loss_fn
        self.split = cfg.data.eval_split
        # At most one pass over the split: later micro-batches would repeat windows (a new epoch's order).
        per_pass = sampler.num_samples // (sampler.dp_size * sampler.micro_batch)
        self.batches = max(1, min(t.eval_batches, per_pass))
        self.windows = self.batches * sampler.dp_size * sampler.micro_batch

    def due(self, step: int) -> bool:
        """Whether to evaluate after optimizer step ``step`` (counted from 1)."""
        return step % self.every == 0 or step == self.last_step

    def describe(self) -> str:
        return (f"evaluating split '{self.split}' every {self.every} steps and at step {self.last_step}: "
                f"{self.batches} micro-batch(es) per replica, {self.windows} windows")

    def run(self, engine, world: int) -> tuple[dict, int]:
        """Evaluate (a collective: call on every rank). Returns (metrics {eval_ce_k, eval_acc_k}, positions of head 1)."""
        import deepspeed.comm as dist

        from ds_mtp.checkpoint import rng_state, set_rng_state

        rng = rng_state()
        module = engine.module
        was_training = module.training
        module.eval()
        try:
            with torch.no_grad():
                if self.loss_fn is not None:
                    sums = _pipeline_sums(engine, self.loss_fn, self.sampler, self.batches, head_sums_size(self.K))
                else:
                    sums = _zero_sums(engine, self.sampler, self.batches, self.pad_id, engine.device)
        finally:
            module.train(was_training)
            set_rng_state(rng)
        if world > 1:  # on the engine's device: NCCL reduces only GPU tensors
            sums = sums.to(engine.device)
            dist.all_reduce(sums)
            sums = sums.cpu()
        return heldout_metrics(sums, self.K)


def format_eval(step: int, max_steps: int, row: dict, positions: int, split: str) -> str:
    K = sum(key.startswith("eval_ce_") for key in row)
    values = " ".join(f"ce_{k} {row[f'eval_ce_{k}']:.4f}" for k in range(1, K + 1)
                      if row[f"eval_ce_{k}"] is not None)
    return (f"[ds-mtp] eval step {step}/{max_steps} on '{split}' ({positions} positions): {values} "
            f"acc_1 {row['eval_acc_1'] or 0.0:.4f}")
