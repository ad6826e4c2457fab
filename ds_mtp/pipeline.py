"""Pipeline-parallel training: MTPModel's own layers on DeepSpeed's PipelineModule.

The layer list is MTPModel.layers() (embedding, blocks, output heads) with the tied embedding
repeated on the last stage, because the unembedding and the semantic anchor E[x_{t+k}] both read it:

    0        EmbeddingPipe  TiedLayerSpec("embed")       (tokens, doc_ids) [B,T] → (x [B,T,d], tokens, doc_ids)
    1..L     BlockPipe      LayerSpec                     (x, tokens, doc_ids) → (x, tokens, doc_ids)
    L+1      EmbeddingPipe  TiedLayerSpec("embed", forward_fn=append_embedding)
                                                          (z, tokens, doc_ids) → (z, tokens, doc_ids, E)
    L+2      HeadsPipe      LayerSpec                     (z, tokens, doc_ids, E) → (h, [ĥ, [Pĥ,]] U, E)
    loss     PipelineLoss   (outputs, labels=(tokens, doc_ids[, targets[, mask]])) → ds_mtp.objective.lse_mtp_loss

The tokens ride along the activations because the sequential heads embed x_{t+k-1} on the last
stage, and the document ids because every block's attention (and the embedding's positions) stays
inside a document of a packed window (model.attention = "document"); each stage builds the batch's
AttentionLayout once and its blocks share it. The labels (tokens and document ids) reach the loss through DeepSpeed's label path, and so do
a teacher's latent targets (ds_mtp.teacher): only the last stage reads labels, so only it asks a
teacher. Pĥ is ĥ through the heads' projection to a teacher of another width. DeepSpeed
all-reduces the tied embedding's gradient between the first and the last stage, so both copies take
the same optimizer step, and re-broadcasts it from the first stage after a checkpoint load.

Checkpoints are DeepSpeed's pipeline format: one ``layer_XX-model_states.pt`` per layer (the last
stage's embedding copy is not written: it is a function of layer 00) plus the ZeRO-1 optimizer
partitions. ``pipeline_state_dict`` turns the layer files back into MTPModel's state dict.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn as nn

from ds_mtp import safe_load
from ds_mtp.config import ModelConfig, RunConfig
from ds_mtp.errors import UserError
from ds_mtp.model import AttentionLayout, MTPModel, attention_layout
from ds_mtp.objective import head_sums, lse_mtp_loss, pack_terms


class LayerSource:
    """Holds a freshly initialised MTPModel while PipelineModule builds its stage, then lets it go.

    Building the whole model first (same seed, same init as the ZeRO path) makes a pipeline run start
    from exactly the weights a single-process run starts from; each stage keeps only its own layers.
    """

    def __init__(self, model: MTPModel):
        self.model = model
        self.stage_layout = StageLayout(model.cfg)  # shared by this stage's layers

    def layer(self, name: str, index: int = 0) -> nn.Module:
        if self.model is None:
            raise RuntimeError("the pipeline's layer source was already released")
        return self.model.blocks[index] if name == "block" else getattr(self.model, name)

    def release(self) -> None:
        self.model = None


class StageLayout:
    """The AttentionLayout of the micro-batch a stage is processing, built once from its doc_ids and shared
    by the stage's layers (they see the same doc_ids tensor object, which rides along the activations)."""

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        self._doc_ids: torch.Tensor | None = None
        self._layout: AttentionLayout | None = None

    def __call__(self, doc_ids: torch.Tensor) -> AttentionLayout:
        if doc_ids is not self._doc_ids:
            self._doc_ids, self._layout = doc_ids, attention_layout(self.cfg, doc_ids)
        return self._layout


class EmbeddingPipe(nn.Module):
    """(tokens, doc_ids) [B, T] → (x [B, T, d], tokens, doc_ids). The tied module of the first and last stage."""

    def __init__(self, source: LayerSource):
        super().__init__()
        self.embed = source.layer("embed")
        self.layout = source.stage_layout

    def forward(self, inputs):
        tokens, doc_ids = inputs
        return self.embed(tokens, self.layout(doc_ids)), tokens, doc_ids


def append_embedding(module: EmbeddingPipe, inputs):
    """Last stage's use of the tied embedding: (z, tokens, doc_ids) → (z, tokens, doc_ids, E [V, d])."""
    z, tokens, doc_ids = inputs
    return z, tokens, doc_ids, module.embed.weight


class BlockPipe(nn.Module):
    """(x [B, T, d], tokens, doc_ids) → (block(x), tokens, doc_ids)."""

    def __init__(self, source: LayerSource, index: int):
        super().__init__()
        self.block = source.layer("block", index)
        self.layout = source.stage_layout

    def forward(self, inputs):
        x, tokens, doc_ids = inputs
        return self.block(x, self.layout(doc_ids)), tokens, doc_ids


class HeadsPipe(nn.Module):
    """(z, tokens, doc_ids, E) → (h [B, T, d], ĥ [B, K−1, T, d] when K > 1, Pĥ [B, K−1, T, D] when the heads
    project to a teacher of width D, unembedding U [V, d], E)."""

    def __init__(self, source: LayerSource):
        super().__init__()
        self.heads = source.layer("heads")
        self.layout = source.stage_layout

    def forward(self, inputs):
        z, tokens, doc_ids, embed_weight = inputs
        h, head_hidden = self.heads(z, self.layout(doc_ids), tokens, embed_weight)
        unembed = embed_weight if self.heads.unembed is None else self.heads.unembed.weight
        if head_hidden is None:
            return h, unembed, embed_weight
        if self.heads.latent_projection is None:
            return h, head_hidden, unembed, embed_weight
        return h, head_hidden, self.heads.latent_projection(head_hidden), unembed, embed_weight


class PipelineLoss:
    """The LSE-MTP objective on the last stage. Returns the scalar loss DeepSpeed back-propagates and
    keeps each micro-batch's terms (ds_mtp.objective.pack_terms) for the metrics.
    While ``eval_sums`` is a list (ds_mtp.validation, around engine.eval_batch) a micro-batch's per-head
    sums go there instead, and the training terms are left alone."""

    __name__ = "lse_mtp_loss"

    def __init__(self, cfg: RunConfig, pad_id: int | None):
        self.objective, self.pad_id = cfg.objective, pad_id
        self.tied = cfg.model.tie_embeddings
        self.terms: list[torch.Tensor] = []
        self.eval_sums: list[torch.Tensor] | None = None
        self.active_heads: int | None = None
        """Heads counted by the loss (objective.curriculum: the training loop sets it every step); None = all K."""

    def __call__(self, outputs, labels):
        h, *head_outputs, unembed, embed = outputs
        head_hidden = head_outputs[0] if head_outputs else None
        tokens, doc_ids, *latent = labels  # latent: a teacher's (targets[, mask]), or nothing (self-anchored)
        targets, mask = (latent + [None, None])[:2]
        # Pĥ counts only against a teacher's targets, as in MTPModel.forward.
        latent_pred = head_outputs[1] if len(head_outputs) > 1 and targets is not None else None
        o = self.objective
        out = lse_mtp_loss(h, head_hidden, tokens, unembed, embed, lambda_latent=o.lambda_latent,
                           lambda_semantic=o.lambda_semantic, pad_id=self.pad_id, doc_ids=doc_ids,
                           head_weights=o.head_weights, distance=o.distance, loss_impl=o.loss_impl,
                           chunk_rows=o.chunk_rows, mse_normalization=o.mse_normalization,
                           active_heads=self.active_heads,
                           latent_targets=targets, latent_mask=mask,
                           latent_pred=latent_pred)
        if self.eval_sums is not None:
            self.eval_sums.append(head_sums(out, tokens, doc_ids, self.pad_id))
            return out["loss"]
        # Kept on the device: copying each micro-batch's terms to the host would stall the schedule.
        self.terms.append(pack_terms(out))
        loss = out["loss"]
        if not self.tied:
            # Untied, the last stage may read its embedding copy only through sg(E) (or not at all):
            # with no gradient there, DeepSpeed would skip its side of the tied all-reduce and the
            # first stage would wait forever. A zero-valued term gives the copy a zero gradient.
            loss = loss + 0.0 * embed.sum()
        return loss


def layer_specs(source: LayerSource, n_layer: int) -> list:
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    tie = dict(tied_weight_attr=["embed.wte.weight"])
    return [TiedLayerSpec("embed", EmbeddingPipe, source, **tie),
            *(LayerSpec(BlockPipe, source, i) for i in range(n_layer)),
            TiedLayerSpec("embed", EmbeddingPipe, source, forward_fn=append_embedding, **tie),
            LayerSpec(HeadsPipe, source)]


def check_layout(cfg: RunConfig, world: int) -> None:
    """The ranks of a launch (teacher ranks included) must form whole pipelines, and every stage needs a layer."""
    from ds_mtp.ranks import layout_of

    P = cfg.train.pipeline_stages
    layout_of(cfg, world)
    if cfg.model.n_layer + 2 < P:
        raise UserError(f"train.pipeline_stages={P} exceeds the model's {cfg.model.n_layer + 2} pipeline units "
                        "(the embedding, each block, and the output heads with their embedding copy)")


def partition(specs: list, stages: int) -> list[int]:
    """Stage boundaries as PipelineModule(partition_method="parameters") computes them.

    The heads must share a stage with the embedding copy, which hands them its weight. And every stage
    must hold both weight-decayed and undecayed parameters (ds_mtp.engine.param_groups): ZeRO-1 all-reduces
    the gradient norm once per non-empty parameter group, so a stage with one group (the embedding alone) leaves the
    others waiting forever in the first optimizer step (seen with 3 and 4 stages).
    """
    from deepspeed.runtime.utils import partition_balanced

    from ds_mtp.engine import decayed_parameters

    layers = [spec.build() for spec in specs]
    counts = [sum(p.numel() for p in layer.parameters() if p.requires_grad) for layer in layers]
    kinds = [{id(p) in decayed for p in layer.parameters() if p.requires_grad}
             for layer, decayed in ((layer, decayed_parameters(layer)) for layer in layers)]

    copy = len(specs) - 2  # the embedding copy; the heads are the layer after it

    def parts_for(n: int) -> list[int]:
        return [int(b) for b in partition_balanced(weights=counts, num_parts=n)]

    def together(parts: list[int]) -> bool:
        stages = range(len(parts) - 1)
        both_groups = all(set().union(*kinds[parts[s]:parts[s + 1]]) == {True, False} for s in stages)
        return both_groups and any(parts[s] <= copy and copy + 1 < parts[s + 1] for s in stages)

    parts = parts_for(stages)
    if not together(parts):
        fits = [n for n in range(stages - 1, 1, -1) if together(parts_for(n))]
        raise UserError(f"train.pipeline_stages={stages}: balancing the {len(specs)} pipeline layers by parameter count "
                        "leaves a stage with only the embedding, or the heads apart from the embedding copy they read; "
                        "use fewer stages"
                        + (f" (at most {fits[0]})" if fits else ""))
    return parts


def build_pipeline_engine(cfg: RunConfig, pad_id: int | None):
    """The PipelineModule and its DeepSpeed engine. Returns (engine, loss_fn, total parameter count)."""
    import deepspeed.comm as dist
    from deepspeed.pipe import PipelineModule

    from ds_mtp.engine import initialize
    from ds_mtp.model import count_parameters

    t = cfg.train
    world = dist.get_world_size()  # the trainers' own world: teacher ranks were split off before DeepSpeed
    check_layout(cfg, world + cfg.teacher.ranks)
    # DeepSpeed's CPU point-to-point goes through broadcast_, which torch warns has no autograd kernel;
    # the pipeline detaches what it receives, and tests/test_pipeline.py checks the gradients.
    warnings.filterwarnings("ignore", message=r"c10d::broadcast_: an autograd kernel")
    torch.manual_seed(t.seed)
    source = LayerSource(MTPModel(cfg.model, cfg.objective, pad_id))
    total = count_parameters(source.model)
    loss_fn = PipelineLoss(cfg, pad_id)
    specs = layer_specs(source, cfg.model.n_layer)
    parts = partition(specs, t.pipeline_stages)
    module = PipelineModule(
        layers=specs, num_stages=t.pipeline_stages, loss_fn=loss_fn,
        partition_method="parameters",
        activation_checkpoint_interval=1 if t.activation_checkpointing else 0,
        checkpointable_layers=["BlockPipe"])
    source.release()
    assert [int(b) for b in module.parts] == parts, (module.parts, parts)
    return initialize(cfg, module, world // t.pipeline_stages), loss_fn, total


def describe_stages(engine) -> str:
    """One line with each stage's layers and parameter count (a collective: call on every rank)."""
    import deepspeed.comm as dist

    module = engine.module
    stages = module.num_stages
    counts = torch.zeros(stages, dtype=torch.float64, device=engine.device)  # NCCL reduces device tensors only
    if engine.grid.data_parallel_id == 0:
        counts[engine.stage_id] = sum(p.numel() for p in module.parameters())
    dist.all_reduce(counts)
    parts = module.parts
    return ", ".join(f"stage {s}: layers {parts[s]}-{parts[s + 1] - 1}, {int(counts[s]):,} parameters"
                     for s in range(stages)) + " (the last stage's count includes its copy of the embedding)"


def micro_batches(sampler, step: int, grad_accum: int, device, feed=None):
    """The step's micro-batches as DeepSpeed's pipeline expects them: (inputs, labels) pairs. A
    generator, so stages that read no data (the middle ones) never load any. ``feed`` (the last stage's
    teacher feed, ds_mtp.teacher) adds the micro-batch's latent targets, and mask when it has one, to the labels."""
    for micro in range(grad_accum):
        index = step * grad_accum + micro
        batch = sampler.batch(index)
        tokens, doc_ids = batch.tokens.to(device), batch.doc_ids.to(device)
        labels = (tokens, doc_ids)
        if feed is not None:
            targets, mask = feed.targets(index, batch.tokens, batch.doc_ids)
            labels += (targets,) if mask is None else (targets, mask)
        yield (tokens, doc_ids), labels


def layer_names(n_layer: int) -> dict[int, tuple[str, str]]:
    """Pipeline layer index → (prefix in the layer's state dict, prefix in MTPModel's state dict)."""
    names = {0: ("embed.", "embed.")}
    names.update({1 + i: ("block.", f"blocks.{i}.") for i in range(n_layer)})
    names[n_layer + 2] = ("heads.", "heads.")
    return names


def pipeline_state_dict(tag_dir: str | Path, n_layer: int) -> dict[str, torch.Tensor]:
    """MTPModel's state dict from the layer files of one pipeline checkpoint tag."""
    tag_dir = Path(tag_dir)
    state = {}
    for index, (layer_prefix, model_prefix) in layer_names(n_layer).items():
        files = sorted(tag_dir.glob(f"layer_{index:02d}-*model_states.pt"))
        if not files:
            raise UserError(f"{tag_dir} is not a complete pipeline checkpoint: layer_{index:02d} is missing")
        layer_state = safe_load.load(files[0])
        for key, value in layer_state.items():
            if not key.startswith(layer_prefix):
                raise UserError(f"{files[0]}: unexpected entry '{key}' (not an ds-mtp pipeline checkpoint?)")
            state[model_prefix + key[len(layer_prefix):]] = value
    return state
