"""The training loop, as setup → step → reduce/log → save.

``prepare_run`` checks everything that needs no process group (config, data, run directory) so bad
input fails once, in the launching process, with one line. ``train`` runs on every rank:

- ``setup`` finds this rank's role (ds_mtp.ranks), serves latent targets if it is a teacher rank, and
  otherwise builds the engine, resumes from the newest complete checkpoint, and opens the data;
- ``zero_step`` / ``pipeline_step`` run one optimizer step of their layout and return the summed loss
  terms (ds_mtp.objective.pack_terms);
- ``reduce_step`` averages the terms over ranks into the step's metrics row, and agrees between ranks on
  a stop request (SIGTERM / SIGINT to any rank);
- the loop logs, saves (ds_mtp.checkpoint), stops on divergence (train.max_bad_steps) or on a signal
  (with a checkpoint of that step), and at the end writes the exported model.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ds_mtp.config import RunConfig, config_from_dict
from ds_mtp.data import write_atomic
from ds_mtp.errors import Diverged, Preempted, UserError
from ds_mtp.run_data import load_run_data, window_sampler
from ds_mtp.run_dir import RunDir, check_new_or_resume, read_saved_config


def prepare_run(cfg: RunConfig, run_dir: str | Path, resume: bool) -> RunConfig:
    """Validate data and run directory; write RUN_DIR/config.json (the resolved config)."""
    from ds_mtp.teacher import check_teacher, fill_latent_width

    cfg, meta = load_run_data(cfg, verify=True)
    # The sampler checks the windows fit the data (e.g. packed_documents: every document fits a window).
    window_sampler(cfg, cfg.data.split, seed=cfg.train.seed)
    check_teacher(cfg, meta)
    fill_latent_width(cfg, meta)  # the model's projection to the teacher's width, if any
    paths = RunDir(run_dir)
    check_new_or_resume(paths, resume)
    if resume:
        from ds_mtp.checkpoint import resume_tag
        from ds_mtp.safe_load import check_checkpoint_files

        check_resumable(config_from_dict(read_saved_config(paths)), cfg, paths)
        check_checkpoint_files(paths.checkpoints / resume_tag(paths)[0])  # pickled code is refused before any rank
    paths.path.mkdir(parents=True, exist_ok=True)
    write_atomic(paths.config, (json.dumps(cfg.to_dict(), indent=2) + "\n").encode())
    return cfg


RESUME_FIXED = ("train.seq_len", "train.pipeline_stages", "data.path", "data.sampling")
"""Settings a resumed run must keep (besides the whole model section): they decide the shapes in the checkpoint
or which window every step reads."""


def check_resumable(previous: RunConfig, cfg: RunConfig, paths: RunDir) -> None:
    """--resume continues the same run: the model and RESUME_FIXED must match the saved config."""
    changed = [f"model.{name}" for name in previous.model.__dataclass_fields__
               if getattr(previous.model, name) != getattr(cfg.model, name)]
    for key in RESUME_FIXED:
        section, name = key.split(".")
        if getattr(getattr(previous, section), name) != getattr(getattr(cfg, section), name):
            changed.append(key)
    if changed:
        first = changed[0]
        section, name = first.split(".")
        was, now = getattr(getattr(previous, section), name), getattr(getattr(cfg, section), name)
        more = f" (and {', '.join(changed[1:])})" if len(changed) > 1 else ""
        hint = " (convert with ds-mtp export instead)" if first == "train.pipeline_stages" else ""
        raise UserError(f"--resume: {paths.path} was trained with {first}={was}, not {now}{more}; a resumed run "
                        f"keeps them{hint}")


# ----------------------------------------------------------------------------------------------
# Set-up

def cpu_threads(env=os.environ, cores: int | None = None) -> int:
    """Torch threads for one CPU rank: OMP_NUM_THREADS when the user set it, else this node's cores shared
    by the launch's ranks on this node (teacher ranks included: they compute alongside the trainers; a launcher
    that does not say how many ranks are here is taken to have started them all here). Read before the roles
    are written: afterwards LOCAL_SIZE counts one role's ranks."""
    from ds_mtp.ranks import read_launch

    explicit = env.get("OMP_NUM_THREADS", "")
    if explicit.isdigit() and int(explicit) > 0:
        return int(explicit)
    place = read_launch(env)
    local = 1 if place is None else place.local_size or place.world_size
    return max(1, (cores or os.cpu_count() or 1) // max(1, local))


def _quiet_libraries() -> None:
    import logging
    import warnings

    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")


class StopSignals:
    """SIGTERM and SIGINT (what Slurm, Kubernetes, ``timeout`` and Ctrl-C send) become a request to stop at the
    next step boundary; a second signal of the same kind acts at once (Ctrl-C twice)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: str | None = None
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.received == name:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        self.received = name

    def __enter__(self) -> StopSignals:
        for s in self.SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


@dataclass
class Trainer:
    """What a trainer rank's steps share, built once by ``setup``."""

    cfg: RunConfig
    paths: RunDir
    engine: object
    model: torch.nn.Module | None
    """The MTPModel under ZeRO (None under a pipeline: the stages hold its layers)."""
    loss_fn: object | None
    """The pipeline's PipelineLoss (None under ZeRO: the engine's forward computes the loss)."""
    sampler: object
    feed: object | None
    """External latent targets (ds_mtp.teacher), or None."""
    validator: object | None
    monitor: object
    rank: int
    world: int
    dp_size: int
    pad_id: int | None
    start_step: int
    bridge_store: object | None = None
    """The trainer-teacher store, where a teacher that got SIGTERM asks the trainers to stop."""
    flops_per_token: float = 0.0
    last: dict = field(default_factory=dict)

    @property
    def pipeline(self) -> bool:
        return self.loss_fn is not None

    @property
    def end_step(self) -> int:
        t = self.cfg.train
        return min(t.max_steps, t.stop_after) if t.stop_after else t.max_steps

    @property
    def tokens_per_step(self) -> int:
        t = self.cfg.train
        return t.micro_batch * t.seq_len * t.grad_accum * self.dp_size


def setup(cfg: RunConfig, paths: RunDir, resume: bool, signals: StopSignals) -> Trainer | None:
    """Everything before the first step. Returns None on a teacher rank, after it has served its trainers."""
    import deepspeed.comm as dist

    from ds_mtp.engine import build_engine, init_distributed
    from ds_mtp.model import count_parameters
    from ds_mtp.monitor import Monitor, model_flops_per_token
    from ds_mtp.ranks import find_role, write_role_env
    from ds_mtp.teacher import (bridge_port, connect_bridge, count_local_trainers, fill_latent_width, open_feed,
                                run_teacher_rank)

    _quiet_libraries()
    cfg, meta = load_run_data(cfg)
    if not torch.cuda.is_available():  # each local rank gets its share of the cores, not all of them
        torch.set_num_threads(cpu_threads())
    role = find_role(cfg)
    store = group = local_trainers = None
    if role.layout.teacher_ranks:
        store, group = connect_bridge(role, bridge_port(cfg, role), cfg.teacher.startup_timeout)
        local_trainers = count_local_trainers(store, role)
    write_role_env(role, local_trainers)  # before DeepSpeed: teacher ranks must not be in the trainers' world
    if role.is_teacher:
        run_teacher_rank(cfg, role, store, group)
        return None
    fill_latent_width(cfg, meta)  # before the model is built: ZeRO-3 must see the projection
    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    pad_id = meta.special_ids.get("pad")
    t = cfg.train
    resume_from, resize = None, None
    if resume:  # the newest complete checkpoint, and how to load it if it was saved on another number of ranks
        from ds_mtp.checkpoint import resume_tag
        from ds_mtp.universal import rank_resume_plan

        resume_from, note = resume_tag(paths)
        if note and rank == 0:
            print(f"[ds-mtp] {note}", flush=True)
        resize = rank_resume_plan(cfg, paths.checkpoints, world // t.pipeline_stages, resume_from)
    if t.pipeline_stages > 1:
        from ds_mtp.pipeline import build_pipeline_engine, describe_stages

        engine, loss_fn, n_params = build_pipeline_engine(cfg, pad_id)
        model, dp_rank, dp_size = None, engine.grid.data_parallel_id, engine.grid.data_parallel_size
        holds_heads = engine.is_last_stage()
        stages_line = describe_stages(engine)
    else:
        engine, model = build_engine(cfg, pad_id, resize)
        loss_fn, dp_rank, dp_size, n_params, holds_heads = None, rank, world, count_parameters(model), True
    fed_replica = role.layout.replica_of(role.rank) if role.layout.teacher_ranks else None
    if role.layout.teacher_ranks and fed_replica != (dp_rank if holds_heads else None):
        raise RuntimeError(f"rank {rank}: the teachers' layout (replica {fed_replica}) disagrees with DeepSpeed's "
                           f"grid (replica {dp_rank}, last stage {holds_heads})")
    start_step = 0
    if resume:
        from ds_mtp import checkpoint

        start_step = int(checkpoint.load(engine, paths, resume_from, resize)["step"])
    validator = None
    if t.eval_every:
        from ds_mtp.validation import EVAL_SEED, Validator

        validator = Validator(cfg, window_sampler(cfg, cfg.data.eval_split, seed=EVAL_SEED, dp_rank=dp_rank,
                                                  dp_size=dp_size), pad_id, loss_fn)
    trainer = Trainer(cfg, paths, engine, model, loss_fn,
                      sampler=window_sampler(cfg, cfg.data.split, seed=t.seed, dp_rank=dp_rank, dp_size=dp_size),
                      feed=open_feed(cfg, role.layout if store else None, group, engine.device, role.rank, meta,
                                     holds_heads),
                      validator=validator, monitor=Monitor(paths.path, resume_step=start_step, enabled=rank == 0),
                      rank=rank, world=world, dp_size=dp_size, pad_id=pad_id, start_step=start_step,
                      bridge_store=store)
    if trainer.feed is not None:  # the teacher starts on the first micro-batches at once
        trainer.feed.start(start_step * t.grad_accum, trainer.end_step * t.grad_accum)
    if torch.cuda.is_available() and model is not None:
        trainer.flops_per_token = model_flops_per_token(model, t.seq_len)
    if rank == 0:
        if trainer.pipeline:
            print(f"[ds-mtp] pipeline of {t.pipeline_stages} stages x {dp_size} data-parallel: {stages_line}",
                  flush=True)
        print(f"[ds-mtp] {n_params:,} parameters, K={cfg.model.mtp_k} ({cfg.model.head_type}), ZeRO-{t.zero_stage}, "
              f"{world} rank(s) on {engine.device}, {trainer.tokens_per_step} tokens/step, "
              f"steps {start_step}->{t.max_steps}", flush=True)
        if validator is not None:
            print(f"[ds-mtp] {validator.describe()}", flush=True)
    return trainer


# ----------------------------------------------------------------------------------------------
# One optimizer step per layout: the summed pack_terms of its micro-batches (zero on ranks without the heads)

def zero_step(tr: Trainer, step: int) -> torch.Tensor:
    from ds_mtp.objective import pack_terms

    t, device = tr.cfg.train, tr.engine.device
    sums = 0
    for micro in range(t.grad_accum):
        index = step * t.grad_accum + micro
        batch = tr.sampler.batch(index)
        latent = tr.feed.targets(index, batch.tokens, batch.doc_ids) if tr.feed is not None else (None, None)
        out = tr.engine(batch.tokens.to(device), batch.doc_ids.to(device), *latent)
        tr.engine.backward(out["loss"])
        tr.engine.step()
        sums = sums + pack_terms(out).double()  # on the device: one copy to the host per step, not per micro-batch
    return sums.cpu()


def pipeline_step(tr: Trainer, step: int) -> torch.Tensor:
    from ds_mtp.objective import term_names
    from ds_mtp.pipeline import micro_batches

    t = tr.cfg.train
    tr.loss_fn.terms.clear()
    tr.engine.train_batch(data_iter=micro_batches(tr.sampler, step, t.grad_accum, tr.engine.device, tr.feed))
    sums = torch.zeros(len(term_names(tr.cfg.model.mtp_k)), dtype=torch.float64)
    for terms in tr.loss_fn.terms:  # only the last stage computes the loss
        sums += terms.double().cpu()
    return sums


# ----------------------------------------------------------------------------------------------
# Reduce and log

def _all_reduce(tr: Trainer, values: torch.Tensor, op=None) -> torch.Tensor:
    """Sum (or ``op``) over the trainers' world, on the engine's device: NCCL reduces only GPU tensors."""
    if tr.world == 1:
        return values
    import deepspeed.comm as dist

    values = values.to(tr.engine.device)
    dist.all_reduce(values, **({"op": op} if op is not None else {}))
    return values.cpu()


def reduce_step(tr: Trainer, step: int, sums: torch.Tensor, lr: float, seconds: float, stop_here: bool,
                heads_on: int) -> tuple[dict, bool]:
    """The step's metrics row (terms averaged over micro-batches and replicas), and whether any rank asked to stop."""
    import deepspeed.comm as dist

    from ds_mtp.monitor import peak_memory_gib
    from ds_mtp.objective import unpack_terms
    from ds_mtp.teacher import source_class

    t = tr.cfg.train
    sums = _all_reduce(tr, sums) / (t.grad_accum * tr.dp_size)
    grad_norm = tr.engine.get_global_grad_norm()
    # Maxima over ranks in one all-reduce: the rank closest to running out of memory, the fed rank that waited
    # longest for its teacher this step (the overlap check), and whether any rank was asked to stop.
    maxima = _all_reduce(tr, torch.tensor([peak_memory_gib(), tr.feed.wait_s if tr.feed is not None else 0.0,
                                           float(stop_here)], dtype=torch.float64), op=dist.ReduceOp.MAX)
    if tr.feed is not None:
        tr.feed.wait_s = 0.0
    row = {"step": step + 1, "tokens": (step + 1) * tr.tokens_per_step, **unpack_terms(sums, tr.cfg.model.mtp_k)}
    row.update(lr=lr, grad_norm=float(grad_norm) if grad_norm is not None else None,
               tokens_per_s=tr.tokens_per_step / seconds, peak_mem_gib=maxima[0].item())
    if tr.flops_per_token:
        row["tflops_per_gpu"] = tr.flops_per_token * tr.tokens_per_step / seconds / tr.world / 1e12
        if t.peak_tflops:
            row["mfu"] = row["tflops_per_gpu"] / t.peak_tflops
    if source_class(tr.cfg) is not None:
        row["teacher_wait_s"] = maxima[1].item()
    if tr.cfg.objective.curriculum:
        row["active_heads"] = heads_on
    return row, bool(maxima[2].item())


def is_bad_step(row: dict) -> bool:
    """A step whose loss or gradient norm is not finite (DeepSpeed skipped its update, or will diverge)."""
    return not math.isfinite(row["loss"]) or (row["grad_norm"] is not None and not math.isfinite(row["grad_norm"]))


def log_step(tr: Trainer, row: dict) -> None:
    t = tr.cfg.train
    step = row["step"]
    eval_line = ""
    if tr.validator is not None and tr.validator.due(step):  # after the step's timing: not in tokens_per_s
        from ds_mtp.validation import format_eval

        evaluated, positions = tr.validator.run(tr.engine, tr.world)
        row.update(evaluated)
        eval_line = format_eval(step, t.max_steps, evaluated, positions, tr.validator.split)
    tr.monitor.log(row)
    tr.last = row
    if tr.rank == 0 and (step % t.log_every == 0 or step == t.max_steps):
        print(f"[ds-mtp] step {step}/{t.max_steps} loss {row['loss']:.4f} ce_1 {row['ce_1']:.4f} "
              f"lr {row['lr']:.2e} {row['tokens_per_s']:.0f} tok/s", flush=True)
    if tr.rank == 0 and eval_line:
        print(eval_line, flush=True)


# ----------------------------------------------------------------------------------------------
# Save and finish

def save(tr: Trainer, step: int) -> None:
    from ds_mtp import checkpoint

    checkpoint.save(tr.engine, tr.paths, step, {"pad_id": tr.pad_id})


def export_model(tr: Trainer, step: int) -> None:
    """RUN_DIR/model from the weights of the last step."""
    import deepspeed.comm as dist

    if tr.pipeline:
        if tr.rank == 0:  # the stages' weights are on disk in the checkpoint just written
            from ds_mtp.checkpoint import tag_of
            from ds_mtp.export import export_checkpoint

            export_checkpoint(tr.paths.path, tr.paths.model, tag=tag_of(step), overwrite=True)
    else:
        from ds_mtp.engine import consolidated_state_dict
        from ds_mtp.model import save_exported

        state = consolidated_state_dict(tr.engine)
        if tr.rank == 0:
            save_exported(tr.model, state, tr.paths.model, extra={"data": tr.cfg.data.__dict__})
    dist.barrier()


def _stop_requested(tr: Trainer, signals: StopSignals) -> bool:
    if signals.received is not None:
        return True
    from ds_mtp.teacher import STOP_KEY

    return tr.bridge_store is not None and tr.bridge_store.check([STOP_KEY])


def train(cfg: RunConfig, run_dir: str | Path, resume: bool = False) -> dict:
    """Train on every rank of the current launch. Returns the last step's metrics (rank 0) or {}.

    Raises Preempted (exit 75) after saving a checkpoint when a rank got SIGTERM / SIGINT, and Diverged (exit 4)
    after train.max_bad_steps non-finite steps in a row."""
    from ds_mtp.objective import active_heads

    with StopSignals() as signals:
        tr = setup(cfg, RunDir(run_dir), resume, signals)
        if tr is None:
            return {}
        t, K = tr.cfg.train, tr.cfg.model.mtp_k
        step_fn = pipeline_step if tr.pipeline else zero_step
        bad_steps = 0
        try:
            for step in range(tr.start_step, tr.end_step):
                started = time.perf_counter()
                lr = tr.engine.get_lr()[0]
                heads_on = active_heads(tr.cfg.objective.curriculum, K, step)
                (tr.loss_fn if tr.pipeline else tr.model).active_heads = heads_on
                sums = step_fn(tr, step)
                row, stop = reduce_step(tr, step, sums, lr, time.perf_counter() - started,
                                        _stop_requested(tr, signals), heads_on)
                bad_steps = bad_steps + 1 if is_bad_step(row) else 0
                if t.max_bad_steps and bad_steps >= t.max_bad_steps:
                    tr.monitor.log(row)
                    raise Diverged(f"training diverged: {bad_steps} steps in a row up to step {step + 1} had a "
                                   f"non-finite loss or gradient norm (loss {row['loss']}, grad norm "
                                   f"{row['grad_norm']}); the last good checkpoint is kept and no model is exported "
                                   f"(lower train.lr, or raise train.max_bad_steps)")
                log_step(tr, row)
                if stop:
                    save(tr, step + 1)
                    raise Preempted(f"stopped at step {step + 1} by a signal; checkpoint step{step + 1} saved in "
                                    f"{tr.paths.checkpoints}: continue with --resume")
                if t.save_every and (step + 1) % t.save_every == 0 and step + 1 < tr.end_step:
                    save(tr, step + 1)
            if tr.feed is not None:
                tr.feed.close()
                tr.feed = None
            if tr.start_step < tr.end_step:
                save(tr, tr.end_step)
            if t.save_model and tr.end_step == t.max_steps:
                export_model(tr, tr.end_step)
        except (Preempted, Diverged):
            if tr.feed is not None:  # the teachers have targets in flight: take them, then say stop
                tr.feed.close(drain=True)
            raise
        finally:
            tr.monitor.close()
        return tr.last
