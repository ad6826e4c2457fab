"""Resuming a run on another number of data-parallel ranks, through DeepSpeed's universal checkpoint.

A ZeRO-1/2/3 checkpoint holds one optimizer partition per data-parallel rank, so DeepSpeed cannot load it
into a different number of ranks (a ``ZeRORuntimeException`` after the whole start-up). DeepSpeed's
``ds_to_universal`` rewrites it as one file per parameter and optimizer state, which any number of ranks
loads with ``checkpoint.load_universal`` in the DeepSpeed config.

``ds-mtp train --resume`` on a different number of ranks (``prepare_resize``, in the launching process):

- keeps the run's global batch, the windows per optimizer step (DeepSpeed's ``train_batch_size`` recorded in
  the checkpoint): ``train.grad_accum`` becomes global batch / (``train.micro_batch`` x data-parallel ranks),
  refused in one line when that is not a whole number. The sampler hands micro-batch ``g`` of rank ``r`` the
  stream items ``(g * ranks + r) * micro_batch ...`` (ds_mtp.data.WindowSampler), so step ``s`` reads the
  same windows, in a different split over ranks, and the averaged gradient is the same: the losses continue
  as an uninterrupted run's, to float rounding;
- converts the checkpoint once, next to it, as ``TAG_universal`` (written under a temporary name and renamed);
- the ranks (``resume_plan``) then load ``TAG_universal`` with ``checkpoint.load_universal``.

A ZeRO-0 checkpoint holds the whole optimizer state and loads on any number of ranks: only the
accumulation changes. A pipeline run keeps its number of replicas (one line says so). Ranks started by
another launcher that finds the checkpoint not converted say in one line what to run.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ds_mtp.config import RunConfig
from ds_mtp.errors import UserError
from ds_mtp.run_dir import LATEST_FILE

UNIVERSAL_SUFFIX = "_universal"
"""A tag's universal conversion is the folder TAG + this, beside it."""


@dataclass
class ResumePlan:
    """How a checkpoint saved on ``saved_ranks`` data-parallel ranks resumes on another number."""

    tag: str
    """The tag to load: the saved one, or its universal conversion."""
    saved_ranks: int
    global_batch: int
    """Windows per optimizer step, kept from the saved run."""
    grad_accum: int
    """train.grad_accum that keeps global_batch on the new number of ranks."""
    universal: bool
    """Whether ``tag`` is a universal checkpoint (loaded with checkpoint.load_universal)."""


def _model_states(tag_dir: Path) -> dict:
    from ds_mtp.safe_load import load

    files = sorted(p for p in tag_dir.glob("*model_states.pt") if not p.name.startswith("layer_"))
    if not files:
        raise UserError(f"--resume: {tag_dir} is not a DeepSpeed checkpoint (no *model_states.pt)")
    return load(files[0], mmap=True)


def resume_plan(cfg: RunConfig, ckpt_dir: str | Path, tag: str, dp_size: int) -> ResumePlan | None:
    """None when checkpoint ``tag`` was saved on ``dp_size`` data-parallel ranks; else how to resume it."""
    ckpt_dir = Path(ckpt_dir)
    states = _model_states(ckpt_dir / tag)
    saved, global_batch = int(states["dp_world_size"]), int(states["ds_config"]["train_batch_size"])
    if saved == dp_size:
        return None
    t = cfg.train
    if t.pipeline_stages > 1:
        raise UserError(f"--resume: {tag} was saved by {saved} pipeline replicas of {t.pipeline_stages} stages; a "
                        f"pipeline run resumes on the same number ({saved * t.pipeline_stages} trainer ranks), or "
                        f"export it (ds-mtp export) and start a new run")
    per_step = t.micro_batch * dp_size
    if global_batch % per_step:
        raise UserError(f"--resume on {dp_size} data-parallel ranks: the run's global batch of {global_batch} windows "
                        f"(saved on {saved} ranks) is not a multiple of train.micro_batch={t.micro_batch} x "
                        f"{dp_size} ranks; resume on a number of ranks that divides it, or change train.micro_batch")
    universal = t.zero_stage > 0  # ZeRO-0 keeps the whole optimizer state on every rank
    return ResumePlan(tag + UNIVERSAL_SUFFIX if universal else tag, saved, global_batch, global_batch // per_step,
                      universal)


def convert(ckpt_dir: str | Path, tag: str) -> Path:
    """Write ``TAG_universal`` beside checkpoint ``tag`` with DeepSpeed's ds_to_universal (weights-only loads)."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    from ds_mtp.safe_load import weights_only_torch_load

    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / (tag + UNIVERSAL_SUFFIX)
    tmp = ckpt_dir / (tag + UNIVERSAL_SUFFIX + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # a conversion that was killed
    # One worker: the work runs in this process, where weights_only_torch_load holds.
    args = argparse.Namespace(input_folder=str(ckpt_dir / tag), output_folder=str(tmp), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True,
                              # ds-mtp's client state has no universal_checkpoint_info: DeepSpeed's default one
                              inject_missing_state=True)
    # It narrates every step on stdout and draws progress bars on stderr; its errors still propagate.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
            weights_only_torch_load():
        ds_to_universal(args)
    tmp.rename(final)
    return final


def prepare_resize(cfg: RunConfig, ckpt_dir: str | Path, dp_size: int, tag: str | None = None) -> list[str]:
    """In the launching process of ``--resume``: when checkpoint ``tag`` (default: the latest) was saved on another
    number of data-parallel ranks, convert it (once) and set train.grad_accum in ``cfg``; returns the overrides
    that carry the new accumulation to the ranks ([] when nothing changes)."""
    ckpt_dir = Path(ckpt_dir)
    tag = tag or (ckpt_dir / LATEST_FILE).read_text().strip()
    plan = resume_plan(cfg, ckpt_dir, tag, dp_size)
    if plan is None:
        return []
    started = time.perf_counter()
    if plan.universal and not (ckpt_dir / plan.tag).is_dir():
        convert(ckpt_dir, tag)
    converted = f"; converted to {plan.tag} in {time.perf_counter() - started:.1f} s" if plan.universal else ""
    print(f"[ds-mtp] resuming {tag}, saved on {plan.saved_ranks} data-parallel rank(s), on {dp_size}{converted}; "
          f"train.grad_accum {cfg.train.grad_accum} -> {plan.grad_accum} keeps {plan.global_batch} windows per step",
          flush=True)
    cfg.train.grad_accum = plan.grad_accum
    return [f"train.grad_accum={plan.grad_accum}"]


def rank_resume_plan(cfg: RunConfig, ckpt_dir: str | Path, dp_size: int, tag: str | None = None) -> ResumePlan | None:
    """On a rank of ``--resume``: the plan for checkpoint ``tag`` (default: the latest), refused in one line that says
    what to run when the launching process did not prepare it (a launcher other than ds-mtp's)."""
    ckpt_dir = Path(ckpt_dir)
    tag = tag or (ckpt_dir / LATEST_FILE).read_text().strip()
    plan = resume_plan(cfg, ckpt_dir, tag, dp_size)
    if plan is None:
        return None
    if cfg.train.grad_accum != plan.grad_accum:
        raise UserError(f"--resume on {dp_size} data-parallel ranks: {tag} was saved on {plan.saved_ranks} with "
                        f"{plan.global_batch} windows per step; pass train.grad_accum={plan.grad_accum} to keep them "
                        "(ds-mtp train --resume --nproc N sets it)")
    if plan.universal and not (ckpt_dir / plan.tag).is_dir():
        raise UserError(f"--resume on {dp_size} data-parallel ranks: {tag} was saved on {plan.saved_ranks}; convert it "
                        f"first: python -m deepspeed.checkpoint.ds_to_universal --inject_missing_state --input_folder "
                        f"{ckpt_dir / tag} --output_folder {ckpt_dir / plan.tag} (ds-mtp train --resume does it)")
    return plan


def load_checkpoint(engine, ckpt_dir: str | Path, plan: ResumePlan | None, tag: str | None = None):
    """``engine.load_checkpoint`` of checkpoint ``tag`` (default: the latest), or of ``plan``'s universal one.

    DeepSpeed 0.19.8's ZeRO-3 universal load (stage3.py, load_hp_checkpoint_state_from_checkpoint_dir_stage3)
    leaves two faults that this undoes, so that the run continues exactly:

    - it copies the first parameter group's hyperparameters into every group: the undecayed group would
      decay. Each group gets back its own (weight decay, betas, eps ...), as built; the learning rate is
      the scheduler's;
    - it gives every group's Adam state one shared ``step`` tensor, which AdamW increments in place once per
      group: the bias correction of the second group would count two steps per step. Each gets its own.
    """
    if plan is None:
        return engine.load_checkpoint(str(ckpt_dir), tag=tag)
    groups = getattr(engine.optimizer, "optimizer", engine.optimizer).param_groups
    built = [{k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")} for g in groups]
    loaded = engine.load_checkpoint(str(ckpt_dir), tag=plan.tag)
    for group, hyperparameters in zip(groups, built):
        group.update(hyperparameters)
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for state in base.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
    return loaded


def ds_config_entries(plan: ResumePlan | None) -> dict:
    """What the DeepSpeed config of the ranks needs to load ``plan``'s checkpoint."""
    return {"checkpoint": {"load_universal": True}} if plan is not None and plan.universal else {}
