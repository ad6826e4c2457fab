"""The LSE-MTP loss as a pure function of tensors (no DeepSpeed, no model).

Head 1 decodes the final post-norm trunk state h_t; head k >= 2 decodes its prediction ĥ_{t,k}
through the same unembedding. With valid positions V_k = {(b, t): t+k < T, tokens[t+k] != pad,
doc[t] == doc[t+k]}:

    ce[k]       = mean_{V_k} CE(unembed · ĥ_{t,k}, tokens[t+k])          (ĥ_{t,1} = h_t)
    latent[k]   = mean_{V_k} mean_d (ĥ_{t,k} − sg h_{t+k−1})²               k >= 2
    semantic[k] = mean_{V_k} mean_d (ĥ_{t,k} − sg embed[tokens[t+k]])²      k >= 2
    loss        = Σ_k w_k ce[k] + λ_l Σ_k latent[k] + λ_s Σ_k semantic[k]

Unlike the paper's code, padding and cross-document positions are masked out of the latent and
semantic terms too. ``mse_normalization`` says what those two sums are divided by: "valid" (the
default, |V_k| as above) or "official", the number of positions the paper's code averages over (its
model.py, F.mse_loss over the whole batch, padding included). Its rows are block_size + 1 tokens, of
which the first block_size are inputs; for a row of T tokens that is B × (T − k) for the latent term
(every input position t whose h_{t+k−1} is an input's state too) and B × (T − 1) for the semantic one
(every input position: its targets past the row are padding, still averaged). Masked positions still
add nothing, so with "official" λ weighs each real position as the paper's code does, about
|V_k| / (B·T) of "valid"'s weight on padded path data. The cross-entropy over the heads is computed
either materialised (every head's logits kept for backward) or chunked (ds_mtp.fused_ce: one chunk of logits at a time, gradients formed
in the forward pass); both give the same loss and gradients.

External latent targets (ds_mtp.teacher): ``latent_targets`` [B, K−1, T, D] replaces sg h_{t+k−1}
by sg latent_targets[:, k−2, t] (still a stop-gradient: the teacher is never trained through this
loss), and ``latent_mask`` [B, T] keeps only the positions the teacher sampled in V_k of the latent
term. A teacher of another width D ≠ d comes with ``latent_pred`` [B, K−1, T, D], the model's learned
projection P ĥ_{t,k}, which then takes ĥ_{t,k}'s place in the latent term only:

    latent[k]   = mean_{V_k ∩ mask} mean_D (P ĥ_{t,k} − sg latent_targets[:, k−2, t])²

(the CE and semantic terms always use ĥ_{t,k} of width d).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ds_mtp.fused_ce import linear_cross_entropy


def valid_mask(tokens: torch.Tensor, k: int, pad_id: int | None = None,
               doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """[B, T-k] bool: position t may predict tokens[t+k]."""
    target = tokens[:, k:]
    valid = torch.ones_like(target, dtype=torch.bool)
    if pad_id is not None:
        valid &= target != pad_id
    if doc_ids is not None:
        valid &= doc_ids[:, :-k] == doc_ids[:, k:]
    return valid


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _hit_rate(hits: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Share of valid rows whose argmax is the target; counted in float32, which bf16 could not count exactly."""
    return hits.sum(dtype=torch.float32) / count.float()


def _distance(pred: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-position distance [N] between rows of pred and target [N, d]."""
    if kind == "mse":
        return (pred - target).pow(2).mean(-1)
    return 1.0 - F.cosine_similarity(pred, target, dim=-1)


LOSS_IMPLS = ("materialized", "chunked")


def active_heads(curriculum: int, K: int, step: int) -> int:
    """Heads switched on at optimizer step ``step`` (0-based) under a forward curriculum of ``curriculum`` steps
    (objective.curriculum; Aynaou et al., ACL 2025): head 1 always, then one more head every curriculum / (K−1)
    steps, so head k switches on at step ⌈(k−1) · curriculum / (K−1)⌉ and head K at ``curriculum``. 0 = all K."""
    if curriculum <= 0 or K == 1:
        return K
    return 1 + min(K - 1, step * (K - 1) // curriculum)
MSE_NORMALIZATIONS = ("valid", "official")


def lse_mtp_loss(hidden: torch.Tensor, head_hidden: torch.Tensor | None, tokens: torch.Tensor,
                 unembed: torch.Tensor, embed: torch.Tensor, *, lambda_latent: float = 0.1,
                 lambda_semantic: float = 0.1, pad_id: int | None = None,
                 doc_ids: torch.Tensor | None = None, head_weights=None, distance: str = "mse",
                 loss_impl: str = "materialized", chunk_rows: int = 0, mse_normalization: str = "valid",
                 active_heads: int | None = None,
                 latent_targets: torch.Tensor | None = None, latent_mask: torch.Tensor | None = None,
                 latent_pred: torch.Tensor | None = None) -> dict:
    """LSE-MTP loss over K heads.

    hidden [B, T, d] final post-norm trunk states; head_hidden [B, K-1, T, d] (None when K = 1);
    tokens [B, T]; unembed [V, d]; embed [V, d]. Returns {"loss": scalar, "ce": [K], "latent": [K-1],
    "semantic": [K-1], "acc": [K]} (each a 0-dim tensor; a term without valid positions is 0). acc[k] is
    head k's top-1 accuracy on V_k, a detached float32 for monitoring.

    loss_impl "materialized" decodes each head's valid rows into a [N_k, V] logit matrix that autograd
    keeps until backward (K of them alive at once); "chunked" decodes all heads' rows together in
    chunks of chunk_rows (0 = auto) with gradients formed in the forward pass (ds_mtp.fused_ce), so
    at most one chunk of logits exists. Both give the same loss and gradients; with "chunked" the
    "ce" entries are detached values (only "loss" is differentiable).

    latent_targets [B, K-1, T, D] (None = the model's own sg h_{t+k-1}) and latent_mask [B, T] bool
    (None = every position) select the latent term's anchors; latent_pred [B, K-1, T, D] (None = head_hidden,
    then D = d) is what the latent term compares with them, see the module docstring.

    mse_normalization "valid" divides the latent and semantic sums by the valid positions (by the kept ones for
    the latent term under latent_mask); "official" by B × (T − k) and B × (T − 1), as the paper's code does
    (module docstring).

    active_heads (None = K): only heads 1..active_heads count in the loss (a forward curriculum, ``active_heads``); the
    terms of the others are still computed and returned, with weight 0.
    """
    if distance not in ("mse", "cosine"):
        raise ValueError(f"distance must be 'mse' or 'cosine', got {distance!r}")
    if loss_impl not in LOSS_IMPLS:
        raise ValueError(f"loss_impl must be one of {LOSS_IMPLS}, got {loss_impl!r}")
    if mse_normalization not in MSE_NORMALIZATIONS:
        raise ValueError(f"mse_normalization must be one of {MSE_NORMALIZATIONS}, got {mse_normalization!r}")
    B, T, d = hidden.shape
    K = 1 + (head_hidden.shape[1] if head_hidden is not None else 0)
    weights = list(head_weights if head_weights is not None else [1.0] * K)
    active = K if active_heads is None else active_heads
    if not 1 <= active <= K:
        raise ValueError(f"active_heads must be in 1..K={K}, got {active_heads}")
    weights = [w if k <= active else 0.0 for k, w in enumerate(weights, start=1)]
    sg_hidden = hidden.detach()
    latent_width = d if latent_pred is None else latent_pred.shape[-1]
    if latent_pred is not None:
        if latent_targets is None:
            raise ValueError("latent_pred needs latent_targets (the model's own states have width d)")
        if latent_pred.shape != (B, K - 1, T, latent_width):
            raise ValueError(f"latent_pred must be [B, K-1, T, D] = {[B, K - 1, T, latent_width]}, "
                             f"got {list(latent_pred.shape)}")
    if latent_targets is not None:
        if latent_targets.shape != (B, K - 1, T, latent_width):
            raise ValueError(f"latent_targets must be [B, K-1, T, D] = {[B, K - 1, T, latent_width]} "
                             f"(D = {'the width of latent_pred' if latent_pred is not None else 'd'}), "
                             f"got {list(latent_targets.shape)}")
        latent_targets = latent_targets.detach()
    sg_embed = embed.detach()
    latent, semantic = [], []
    loss = hidden.new_zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32))
    preds, targets, counts = [], [], []
    for k in range(1, K + 1):
        pred = (hidden if k == 1 else head_hidden[:, k - 2])[:, : T - k]  # [B, T-k, d]
        valid = valid_mask(tokens, k, pad_id, doc_ids)  # [B, T-k]
        count = valid.sum().clamp(min=1).to(loss.dtype)
        # Only the valid rows are decoded: invalid positions never cost a V-wide logit row.
        rows = valid.reshape(-1).nonzero().squeeze(1)
        flat_pred = pred.reshape(-1, d).index_select(0, rows)  # [N_k, d]
        target = tokens[:, k:].reshape(-1).index_select(0, rows)  # [N_k]
        preds.append(flat_pred)
        targets.append(target)
        counts.append(count)
        if k == 1:
            continue
        if latent_targets is None:
            future = sg_hidden[:, k - 1: T - 1].reshape(-1, d).index_select(0, rows)  # h_{t+k-1}  [N_k, d]
        else:
            future = latent_targets[:, k - 2, : T - k].reshape(-1, latent_width).index_select(0, rows)  # [N_k, D]
        latent_in = flat_pred if latent_pred is None else \
            latent_pred[:, k - 2, : T - k].reshape(-1, latent_width).index_select(0, rows)  # P ĥ_{t,k}  [N_k, D]
        anchor = F.embedding(target, sg_embed)  # E[x_{t+k}]  [N_k, d]
        latent_dist = _distance(_at_least_fp32(latent_in), _at_least_fp32(future), distance)  # [N_k]
        semantic_sum = _distance(_at_least_fp32(flat_pred), _at_least_fp32(anchor), distance).sum()
        if latent_mask is not None:
            keep = latent_mask[:, : T - k].reshape(-1).index_select(0, rows)  # [N_k]
            latent_dist = latent_dist * keep
        if mse_normalization == "official":
            latent_k = latent_dist.sum() / (B * (T - k))
            semantic_k = semantic_sum / (B * (T - 1))
        else:
            latent_k = latent_dist.sum() / (count if latent_mask is None else keep.sum().clamp(min=1))
            semantic_k = semantic_sum / count
        latent.append(latent_k)
        semantic.append(semantic_k)
        if k <= active:
            loss = loss + lambda_latent * latent_k + lambda_semantic * semantic_k
    if loss_impl == "materialized":
        ce, acc = [], []
        for p, y, n in zip(preds, targets, counts):
            logits = p @ unembed.t()  # [N_k, V]
            ce.append(F.cross_entropy(_at_least_fp32(logits), y, reduction="sum") / n)
            acc.append(_hit_rate(logits.detach().argmax(-1) == y, n))
        loss = loss + sum(w * c for w, c in zip(weights, ce))
    else:
        # One pass over every head's rows; row i of head k weighs w_k / N_k so the sum is Σ_k w_k ce[k].
        sizes = [len(y) for y in targets]
        row_scale = torch.cat([torch.full((n,), w, dtype=loss.dtype, device=hidden.device) / c
                               for n, w, c in zip(sizes, weights, counts)])
        weighted_ce, ce_rows, hits = linear_cross_entropy(torch.cat(preds), unembed, torch.cat(targets),
                                                          row_scale, chunk_rows)
        ce = [rows_k.sum() / c for rows_k, c in zip(ce_rows.split(sizes), counts)]
        acc = [_hit_rate(hits_k, c) for hits_k, c in zip(hits.split(sizes), counts)]
        loss = loss + weighted_ce
    return {"loss": loss, "ce": ce, "latent": latent, "semantic": semantic, "acc": acc}


def term_names(K: int) -> list[str]:
    """The monitored terms of lse_mtp_loss, in the one order they travel in: loss, ce_1..K, latent_2..K,
    semantic_2..K, acc_1..K (the metrics rows' keys)."""
    return ["loss", *(f"ce_{k}" for k in range(1, K + 1)), *(f"latent_{k}" for k in range(2, K + 1)),
            *(f"semantic_{k}" for k in range(2, K + 1)), *(f"acc_{k}" for k in range(1, K + 1))]


def pack_terms(out: dict) -> torch.Tensor:
    """lse_mtp_loss's result as one detached float32 vector in term_names order (cheap to sum and all-reduce)."""
    return torch.stack([out["loss"], *out["ce"], *out["latent"], *out["semantic"], *out["acc"]]).detach().float()


def unpack_terms(vector: torch.Tensor, K: int) -> dict[str, float]:
    """A (summed, averaged) pack_terms vector back to {name: value}."""
    return dict(zip(term_names(K), vector.tolist()))


def head_sums(out: dict, tokens: torch.Tensor, doc_ids: torch.Tensor | None, pad_id: int | None) -> torch.Tensor:
    """One micro-batch's [CE_k · n_k for k=1..K, hits_k, n_k] (float64, on the loss's device) from the
    objective's output: its per-head means times the number of valid positions they were taken over."""
    K = len(out["ce"])
    counts = torch.stack([valid_mask(tokens, k, pad_id, doc_ids).sum() for k in range(1, K + 1)]).double()
    ce = torch.stack([c.detach() for c in out["ce"]]).double()
    acc = torch.stack([a.detach() for a in out["acc"]]).double()
    return torch.cat([ce * counts, (acc * counts).round(), counts])


def head_sums_size(K: int) -> int:
    return 3 * K


def heldout_metrics(sums: torch.Tensor, K: int) -> tuple[dict, int]:
    """Summed head_sums (over micro-batches and ranks) → ({eval_ce_k, eval_acc_k: mean per valid position, None
    for a head without one}, head 1's positions)."""
    ce, hits, counts = sums[:K].tolist(), sums[K:2 * K].tolist(), sums[2 * K:].tolist()
    row = {f"eval_ce_{k}": ce[k - 1] / counts[k - 1] if counts[k - 1] else None for k in range(1, K + 1)}
    row.update({f"eval_acc_{k}": hits[k - 1] / counts[k - 1] if counts[k - 1] else None for k in range(1, K + 1)})
    return row, int(counts[0])
