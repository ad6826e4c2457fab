"""DeepSpeed set-up for the ZeRO layouts: the DeepSpeed config, the model, AdamW and the schedule.

The engine's forward computes the whole loss (ds_mtp.objective), so under ZeRO-3 the embedding
that the unembedding and the semantic anchor read is registered as an external parameter of the
top module: it is gathered for the full forward, not only inside its owner's.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

import ds_configs
from ds_mtp import safe_load, universal
from ds_mtp.config import RunConfig
from ds_mtp.errors import UserError
from ds_mtp.model import MTPModel

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable


def default_ds_config_path(cfg: RunConfig) -> Traversable:
    """The shipped default (package data, so a non-editable install finds it too)."""
    return ds_configs.shipped("pipeline_zero1.json" if cfg.train.pipeline_stages > 1 else "zero3.json")


def on_gpu() -> bool:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name() != "cpu"


def build_ds_config(cfg: RunConfig, dp_size: int, gpu: bool) -> dict:
    """Read the DeepSpeed JSON and fill in what ds-mtp owns: batch sizes, clipping, ZeRO stage, precision.

    A value the file sets that contradicts ds-mtp's own config is an error, not a silent override.
    """
    t = cfg.train
    path = Path(t.ds_config) if t.ds_config else default_ds_config_path(cfg)
    if not path.is_file():
        raise UserError(f"DeepSpeed config not found: {path}")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"DeepSpeed config {path} is not valid JSON: {e}") from None
    owned = {
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch * t.grad_accum * dp_size,
        "gradient_clipping": t.grad_clip,
    }
    for key, value in owned.items():
        if key in ds and ds[key] != value:
            raise UserError(f"{path}: {key}={ds[key]} contradicts the run config ({key}={value} from "
                            f"micro_batch={t.micro_batch}, grad_accum={t.grad_accum}, data-parallel size={dp_size})")
        ds[key] = value
    zero = ds.setdefault("zero_optimization", {})
    if t.ds_config and zero.get("stage", t.zero_stage) != t.zero_stage:
        raise UserError(f"{path}: zero_optimization.stage={zero['stage']} contradicts train.zero_stage={t.zero_stage}")
    if zero.get("offload_param") and t.zero_stage != 3:
        raise UserError(f"{path}: offload_param needs ZeRO-3 (train.zero_stage={t.zero_stage})")
    zero["stage"] = t.zero_stage
    # A config file that sets bf16 decides precision "auto"; an explicit train.precision must agree with it.
    file_bf16 = ds.get("bf16", {}).get("enabled")
    if file_bf16 is not None and t.precision != "auto" and file_bf16 != (t.precision == "bf16"):
        raise UserError(f"{path}: bf16.enabled={str(file_bf16).lower()} contradicts train.precision={t.precision}")
    bf16 = t.precision == "bf16" or (t.precision == "auto" and (gpu if file_bf16 is None else file_bf16))
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": bf16}
    ds.pop("fp16", None)
    ds.pop("optimizer", None)  # ds-mtp builds AdamW itself (param_groups: the paper's decay rule)
    ds.pop("scheduler", None)
    return ds


def lr_lambda(cfg: RunConfig):
    """Linear warm-up to the peak, then cosine decay to min_lr_ratio of it at max_steps."""
    t = cfg.train
    warmup = t.warmup_steps if t.warmup_steps >= 0 else t.max_steps // 20

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, t.max_steps - warmup))
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def decayed_parameters(module: torch.nn.Module) -> set[int]:
    """ids of the parameters weight decay applies to, by the paper's code's rule (its configure_optimizers):
    the weights of linear layers, except the unembedding (its lm_head, which it takes out of the decayed set).

    Everything else is not decayed: norms, biases, and the token and position embeddings. A tied embedding
    is not decayed either: in the paper's code the shared tensor is named after the embedding, so its rule
    meets it as an embedding weight (the untied case never occurs there; its lm_head would not be optimised at
    all, so ds-mtp keeps it undecayed instead). The rule goes by module type, so it holds for MTPModel, for
    the pipeline's layers (a PipelineModule of EmbeddingPipe, BlockPipe, HeadsPipe) and for ZeRO-3
    partitioned parameters alike.
    """
    return {id(m.weight) for m in module.modules()
            if isinstance(m, torch.nn.Linear) and not getattr(m, "unembedding", False)}


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: ``decayed_parameters(model)`` with weight_decay, every other trainable one without."""
    decayed = decayed_parameters(model)
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if id(p) in decayed else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def init_distributed() -> None:
    """Join the default process group of this rank's role, from the environment ds_mtp.ranks.write_role_env
    wrote (so DeepSpeed's own MPI discovery has nothing to do)."""
    import deepspeed

    gpu = torch.cuda.is_available()
    deepspeed.init_distributed(dist_backend="nccl" if gpu else "gloo", auto_mpi_discovery=False,
                               distributed_port=int(os.environ["MASTER_PORT"]), verbose=False)


def initialize(cfg: RunConfig, module: torch.nn.Module, dp_size: int, resume_plan=None):
    """AdamW (the paper's decay rule: param_groups) and the warm-up + cosine schedule around ``module``, as one
    DeepSpeed engine; the ZeRO and the pipeline layouts both start here. ``resume_plan``: a
    ds_mtp.universal.ResumePlan when resuming on another number of ranks. Checkpoints load weights-only."""
    import deepspeed

    t = cfg.train
    ds_config = build_ds_config(cfg, dp_size, on_gpu())
    for key, value in universal.ds_config_entries(resume_plan).items():
        ds_config[key] = {**ds_config.get(key, {}), **value}
    optimizer = torch.optim.AdamW(param_groups(module, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8,
                                  fused=on_gpu())
    engine, _, _, _ = deepspeed.initialize(
        model=module, optimizer=optimizer, config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg)))
    safe_load.install_weights_only_loading(engine)  # no code from checkpoint files (ds_mtp.safe_load)
    return engine


def build_engine(cfg: RunConfig, pad_id: int | None, resume_plan=None):
    """Create the model and its ZeRO engine (every rank one data-parallel replica). Returns (engine, model)."""
    import deepspeed
    import deepspeed.comm as dist

    torch.manual_seed(cfg.train.seed)
    model = MTPModel(cfg.model, cfg.objective, pad_id)
    if cfg.train.zero_stage == 3:
        for p in model.external_parameters():
            deepspeed.zero.register_external_parameter(model, p)
    engine = initialize(cfg, model, dist.get_world_size(), resume_plan)
    t = cfg.train
    if t.compile == "always" or (t.compile == "gpu" and on_gpu()):
        engine.compile()
    return engine, model


def consolidated_state_dict(engine) -> dict | None:
    """Full fp32 weights on rank 0 (None elsewhere), gathering ZeRO-3 partitions when needed."""
    import deepspeed
    import deepspeed.comm as dist

    module = engine.module
    params = list(module.parameters())
    if engine.zero_optimization_stage() == 3:
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            state = {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()} \
                if dist.get_rank() == 0 else None
    else:
        state = {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()} \
            if dist.get_rank() == 0 else None
    return state
