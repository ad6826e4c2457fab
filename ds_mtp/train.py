"""The training loop: steps, gradient accumulation, metrics, checkpoints and exact resume.

``prepare_run`` checks everything that needs no process group (config, data, run directory) so bad
input fails once, in the launching process, with one line. ``train`` runs on every rank.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import numpy as np
import torch

from ds_mtp.config import RunConfig, config_from_dict
from ds_mtp.data import TokenShards, WindowSampler, read_meta, write_atomic
from ds_mtp.data_checks import check_data
from ds_mtp.errors import UserError

CONFIG_NAME = "config.json"
CHECKPOINT_DIR = "checkpoints"
MODEL_DIR = "model"


def resolve_data(cfg: RunConfig, verify: bool = False) -> RunConfig:
    """Fill the vocab size from the data and check that the data fits the model (ds_mtp.data_checks); with
    ``verify`` (the launching process), data.verify=full also hashes the shards."""
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
    return cfg


def window_sampler(cfg: RunConfig, split: str, *, seed: int, dp_rank: int = 0, dp_size: int = 1) -> WindowSampler:
    """The windows a run reads from one split: the training data (seed train.seed), or the validation
    windows of train.eval_every (ds_mtp.validation.EVAL_SEED)."""
    t = cfg.train
    return WindowSampler(TokenShards(cfg.data.path, split), t.seq_len, t.micro_batch, seed=seed,
                         dp_rank=dp_rank, dp_size=dp_size, mode=cfg.data.sampling)


def prepare_run(cfg: RunConfig, run_dir: str | Path, resume: bool) -> RunConfig:
    """Validate data and run directory; write RUN_DIR/config.json for a new run."""
    from ds_mtp.teacher import check_teacher, fill_latent_width

    cfg = resolve_data(cfg, verify=True)
    meta = read_meta(cfg.data.path)
    # The sampler checks the windows fit the data (e.g. packed_documents: every document fits a window).
    window_sampler(cfg, cfg.data.split, seed=cfg.train.seed)
    check_teacher(cfg, meta)
    fill_latent_width(cfg, meta)  # the model's projection to the teacher's width, if any
    run_dir = Path(run_dir)
    saved = run_dir / CONFIG_NAME
    has_checkpoint = (run_dir / CHECKPOINT_DIR / "latest").is_file()
    if resume:
        if not has_checkpoint:
            raise UserError(f"--resume: no checkpoint in {run_dir / CHECKPOINT_DIR}")
        from ds_mtp.safe_load import check_checkpoint_files  # reliability: refuse pickled code before any rank

        check_checkpoint_files(run_dir / CHECKPOINT_DIR / (run_dir / CHECKPOINT_DIR / "latest").read_text().strip())
        previous = config_from_dict(json.loads(saved.read_text()))
        if previous.model != cfg.model:
            raise UserError(f"--resume: {run_dir} was trained with a different model config")
        if previous.train.pipeline_stages != cfg.train.pipeline_stages:
            raise UserError(f"--resume: {run_dir} was trained with train.pipeline_stages="
                            f"{previous.train.pipeline_stages}; its checkpoints cannot be resumed with "
                            f"{cfg.train.pipeline_stages} (convert with ds-mtp export instead)")
    else:
        if has_checkpoint or (run_dir / "metrics.jsonl").exists():
            raise UserError(f"{run_dir} already holds a run: pass --resume to continue it, or choose another --run-dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(saved, (json.dumps(cfg.to_dict(), indent=2) + "\n").encode())
    return cfg


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None:
        torch.cuda.set_rng_state_all(state["cuda"])


def cpu_threads(env=os.environ, cores: int | None = None) -> int:
    """Torch threads for one CPU rank: OMP_NUM_THREADS when the user set it, else this node's cores shared
    by the ranks of the launch on this node (teacher ranks included: they compute alongside the trainers)."""
    from ds_mtp.launch import LOCAL_SIZE_VARS

    explicit = env.get("OMP_NUM_THREADS", "")
    if explicit.isdigit() and int(explicit) > 0:
        return int(explicit)
    local = next((int(env[v]) for v in LOCAL_SIZE_VARS if env.get(v, "").isdigit()), None)
    if local is None:  # a launcher that says nothing of its node: assume all ranks are here
        local = next((int(env[v]) for v in ("WORLD_SIZE", "PMI_SIZE") if env.get(v, "").isdigit()), 1)
    return max(1, (cores or os.cpu_count() or 1) // max(1, local))


def set_cpu_threads() -> None:
    """Give each local rank its share of the cores instead of letting every rank take all (CPU only).
    Call before the roles are split: afterwards WORLD_SIZE counts one role's ranks only."""
    if not torch.cuda.is_available():
        torch.set_num_threads(cpu_threads())


def _quiet_libraries() -> None:
    import logging
    import warnings

    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")


def train(cfg: RunConfig, run_dir: str | Path, resume: bool = False) -> dict:
    """Train on every rank of the current launch. Returns the last step's metrics (rank 0) or {}."""
    import deepspeed.comm as dist

    from ds_mtp.engine import build_engine, consolidated_state_dict, init_distributed
    from ds_mtp.model import count_parameters, save_exported
    from ds_mtp.monitor import Monitor, model_flops_per_token, peak_memory_gib
    from ds_mtp.objective import active_heads
    from ds_mtp.teacher import (connect_bridge, count_local_trainers, fill_latent_width, open_feed,
                                run_teacher_rank, source_class, split_roles)

    run_dir = Path(run_dir)
    _quiet_libraries()
    cfg = resolve_data(cfg)
    set_cpu_threads()
    layout = split_roles(cfg)  # before DeepSpeed: teacher ranks must not be in the trainers' world
    if layout is not None and layout.is_teacher:
        run_teacher_rank(cfg, layout)
        return {}
    fill_latent_width(cfg, read_meta(cfg.data.path))  # before the model is built: ZeRO-3 must see the projection
    bridge = connect_bridge(layout, cfg.teacher.startup_timeout) if layout is not None else (None, None)
    if layout is not None:
        count_local_trainers(bridge[0], layout)
    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    meta = read_meta(cfg.data.path)
    pad_id = meta.special_ids.get("pad")
    t = cfg.train
    pipeline = t.pipeline_stages > 1
    resize = None  # reliability: a checkpoint saved on another number of data-parallel ranks (ds_mtp.universal)
    if resume:
        from ds_mtp.universal import rank_resume_plan

        resize = rank_resume_plan(cfg, run_dir / CHECKPOINT_DIR, world // t.pipeline_stages)
    if pipeline:
        from ds_mtp.pipeline import build_pipeline_engine, describe_stages, train_step

        engine, loss_fn, n_params = build_pipeline_engine(cfg, pad_id)
        dp_rank, dp_size = engine.grid.data_parallel_id, engine.grid.data_parallel_size
        holds_heads = engine.is_last_stage()
        stages_line = describe_stages(engine)
    else:
        engine, model = build_engine(cfg, pad_id, resize)
        dp_rank, dp_size, n_params = rank, world, count_parameters(model)
        holds_heads = True
    if layout is not None and layout.replica_of(rank) != (dp_rank if holds_heads else None):
        raise RuntimeError(f"rank {rank}: the teachers' layout (replica {layout.replica_of(rank)}) disagrees with "
                           f"DeepSpeed's grid (replica {dp_rank}, last stage {holds_heads})")
    device = engine.device
    ckpt_dir = run_dir / CHECKPOINT_DIR

    start_step = 0
    if resume:
        from ds_mtp.universal import load_checkpoint

        load_path, client = load_checkpoint(engine, ckpt_dir, resize)
        if load_path is None:
            raise UserError(f"--resume: could not load a checkpoint from {ckpt_dir}")
        start_step = client["step"]
        rng_file = Path(load_path if Path(load_path).is_dir() else ckpt_dir / client["tag"]) / f"rng_rank{rank}.pt"
        if rng_file.is_file():
            _set_rng_state(torch.load(rng_file, weights_only=False))

    sampler = window_sampler(cfg, cfg.data.split, seed=t.seed, dp_rank=dp_rank, dp_size=dp_size)
    validator = None
    if t.eval_every:
        from ds_mtp.validation import EVAL_SEED, Validator, format_eval

        validator = Validator(cfg, window_sampler(cfg, cfg.data.eval_split, seed=EVAL_SEED, dp_rank=dp_rank,
                                                  dp_size=dp_size), pad_id, loss_fn if pipeline else None)
    monitor = Monitor(run_dir, resume_step=start_step, enabled=rank == 0)
    K = cfg.model.mtp_k
    tokens_per_step = t.micro_batch * t.seq_len * t.grad_accum * dp_size
    flops_per_token = (model_flops_per_token(model, t.seq_len)
                       if torch.cuda.is_available() and not pipeline else 0.0)
    if rank == 0:
        if pipeline:
            print(f"[ds-mtp] pipeline of {t.pipeline_stages} stages x {dp_size} data-parallel: {stages_line}",
                  flush=True)
        print(f"[ds-mtp] {n_params:,} parameters, K={K} ({cfg.model.head_type}), ZeRO-{t.zero_stage}, "
              f"{world} rank(s) on {device}, {tokens_per_step} tokens/step, steps {start_step}->{t.max_steps}",
              flush=True)
        if validator is not None:
            print(f"[ds-mtp] {validator.describe()}", flush=True)

    def save(step: int) -> None:
        tag = f"step{step}"
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step, "tag": tag, "pad_id": pad_id})
        torch.save(_rng_state(), ckpt_dir / tag / f"rng_rank{rank}.pt")
        dist.barrier()

    end_step = min(t.max_steps, t.stop_after) if t.stop_after else t.max_steps
    feed = open_feed(cfg, layout, bridge[1], device, rank, meta, holds_heads)
    if feed is not None:
        feed.start(start_step * t.grad_accum, end_step * t.grad_accum)
    last: dict = {}
    for step in range(start_step, end_step):
        started = time.perf_counter()
        lr = engine.get_lr()[0]
        heads_on = active_heads(cfg.objective.curriculum, K, step)
        (loss_fn if pipeline else model).active_heads = heads_on
        if pipeline:  # the terms come from the last stage of each of the dp_size pipelines
            sums = train_step(engine, loss_fn, sampler, step, t.grad_accum, 1 + 4 * K, feed)
        else:
            sums = torch.zeros(1 + 4 * K, dtype=torch.float64)
            for micro in range(t.grad_accum):
                micro_index = step * t.grad_accum + micro
                batch = sampler.batch(micro_index)
                latent = feed.targets(micro_index, batch.tokens, batch.doc_ids) if feed is not None else (None, None)
                out = engine(batch.tokens.to(device), batch.doc_ids.to(device), *latent)
                engine.backward(out["loss"])
                engine.step()
                terms = [out["loss"], *out["ce"], *out["latent"], *out["semantic"], *out["acc"]]
                sums[: len(terms)] += torch.stack([x.detach().float().cpu() for x in terms]).double()
        if world > 1:  # on the engine's device: NCCL reduces only GPU tensors
            sums = sums.to(device)
            dist.all_reduce(sums)
            sums = sums.cpu()
        sums /= t.grad_accum * dp_size
        grad_norm = engine.get_global_grad_norm()
        elapsed = time.perf_counter() - started
        # Maxima over ranks in one all-reduce: the rank closest to running out of memory, and the fed rank
        # that waited longest for its teacher this step (the overlap check).
        maxima = torch.tensor([peak_memory_gib(), feed.wait_s if feed is not None else 0.0], dtype=torch.float64)
        if feed is not None:
            feed.wait_s = 0.0
        if world > 1:
            maxima = maxima.to(device)
            dist.all_reduce(maxima, op=dist.ReduceOp.MAX)
            maxima = maxima.cpu()
        row = {"step": step + 1, "tokens": (step + 1) * tokens_per_step, "loss": sums[0].item()}
        row.update({f"ce_{k}": sums[k].item() for k in range(1, K + 1)})
        row.update({f"latent_{k}": sums[K + k - 1].item() for k in range(2, K + 1)})
        row.update({f"semantic_{k}": sums[2 * K + k - 2].item() for k in range(2, K + 1)})
        row.update({f"acc_{k}": sums[3 * K + k - 2].item() for k in range(1, K + 1)})
        row.update(lr=lr, grad_norm=float(grad_norm) if grad_norm is not None else None,
                   tokens_per_s=tokens_per_step / elapsed, peak_mem_gib=maxima[0].item())
        if flops_per_token:
            row["tflops_per_gpu"] = flops_per_token * tokens_per_step / elapsed / world / 1e12
            if t.peak_tflops:
                row["mfu"] = row["tflops_per_gpu"] / t.peak_tflops
        if source_class(cfg) is not None:
            row["teacher_wait_s"] = maxima[1].item()
        if cfg.objective.curriculum:
            row["active_heads"] = heads_on
        eval_line = ""
        if validator is not None and validator.due(step + 1):  # after the step's timing: not in tokens_per_s
            evaluated, positions = validator.run(engine, world)
            row.update(evaluated)
            eval_line = format_eval(step + 1, t.max_steps, evaluated, positions, validator.split)
        monitor.log(row)
        last = row
        if rank == 0 and ((step + 1) % t.log_every == 0 or step + 1 == t.max_steps):
            print(f"[ds-mtp] step {step + 1}/{t.max_steps} loss {row['loss']:.4f} ce_1 {row['ce_1']:.4f} "
                  f"lr {lr:.2e} {row['tokens_per_s']:.0f} tok/s", flush=True)
        if rank == 0 and eval_line:
            print(eval_line, flush=True)
        if t.save_every and (step + 1) % t.save_every == 0 and step + 1 < end_step:
            save(step + 1)
    if feed is not None:
        feed.close()
    if start_step < end_step:
        save(end_step)
    if t.save_model and end_step == t.max_steps and pipeline:
        if rank == 0:  # the stages' weights are on disk in the checkpoint just written
            from ds_mtp.export import export_checkpoint

            export_checkpoint(run_dir, run_dir / MODEL_DIR, tag=f"step{end_step}", overwrite=True)
    elif t.save_model and end_step == t.max_steps:
        state = consolidated_state_dict(engine)
        if rank == 0:
            save_exported(model, state, run_dir / MODEL_DIR, extra={"data": cfg.data.__dict__})
    monitor.close()
    dist.barrier()
    return last
