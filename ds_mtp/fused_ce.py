"""Linear + cross-entropy without keeping a [rows, V] logit matrix alive.

``linear_cross_entropy(x, weight, target, row_scale)`` returns Σ_i row_scale_i · CE(weight · x_i, target_i)
as the materialised ``(x @ weight.T)`` → ``F.cross_entropy`` would, but walks the rows in chunks and
forms both gradients (w.r.t. x and weight) in the forward pass, as fused linear + cross-entropy kernels
do. Only one chunk's logits exist at a time, and backward only scales the stored gradients by the
incoming scalar, so nothing is recomputed: the arithmetic is the materialised forward + backward.

Why forward-time gradients instead of recomputing in backward (torch.utils.checkpoint): recomputation
costs a third more matmul work, and under ZeRO-3 the (tied) unembedding is a gathered parameter that
may be released again before backward; storing its gradient needs no second gather.

The result is differentiable as one scalar. Per-row losses and top-1 hits come back detached (for metrics).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MIN_AUTO_CHUNK = 256


def auto_chunk_rows(rows: int, dim: int, vocab_size: int) -> int:
    """Rows per chunk when the config says 0: a chunk's logits [n, V] hold about as many numbers as the
    input x [rows, d], so the loss never needs much more memory than its input (and at least 256 rows,
    so each matmul stays large enough to run efficiently)."""
    return max(MIN_AUTO_CHUNK, -(-rows * dim // max(1, vocab_size)))


def _accumulation_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _chunk(x, weight, target, scale, need_grad: bool):
    """One chunk of n rows: per-row CE [n], top-1 hits [n] and, if asked, d(Σ scale·CE)/dlogits [n, V]
    in x's dtype."""
    acc = _accumulation_dtype(x)
    logits = (x @ weight.t()).to(acc)  # [n, V]
    lse = torch.logsumexp(logits, dim=-1)  # [n]
    ce_rows = lse - logits.gather(1, target[:, None]).squeeze(1)
    hits = logits.argmax(-1) == target  # before the in-place softmax below
    if not need_grad:
        return ce_rows, hits, None
    # softmax − onehot, built in place on the logits buffer so one [n, V] tensor is alive.
    grad_logits = logits.sub_(lse[:, None]).exp_()
    grad_logits[torch.arange(len(target), device=target.device), target] -= 1.0
    return ce_rows, hits, grad_logits.mul_(scale.to(acc)[:, None]).to(x.dtype)


_chunk_kernel = _chunk


def compile_chunk_kernel(enabled: bool = True) -> None:
    """Run each chunk's softmax/one-hot/scale through torch.compile (fuses the passes; pays on GPU)."""
    global _chunk_kernel
    _chunk_kernel = torch.compile(_chunk, dynamic=True) if enabled else _chunk


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, target, row_scale, chunk_rows: int, need_x: bool, need_weight: bool):
        n, acc = x.shape[0], _accumulation_dtype(x)
        ce_rows = torch.empty(n, dtype=acc, device=x.device)
        hits = torch.empty(n, dtype=torch.bool, device=x.device)
        grad_x = torch.empty_like(x) if need_x else None
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_weight else None
        for start in range(0, n, chunk_rows):
            rows = slice(start, min(n, start + chunk_rows))
            ce_rows[rows], hits[rows], grad_logits = _chunk_kernel(x[rows], weight, target[rows], row_scale[rows],
                                                       need_x or need_weight)
            if need_x:
                torch.mm(grad_logits, weight, out=grad_x[rows])  # [n, d]
            if need_weight and grad_weight.dtype == x.dtype:
                grad_weight.addmm_(grad_logits.t(), x[rows])  # [V, d]
            elif need_weight:  # low-precision products, summed over chunks in fp32
                grad_weight += grad_logits.t() @ x[rows]
        # Saved (not kept as attributes) so autograd frees them after backward unless retain_graph is set:
        # the loss tensor, and with it this node, may outlive the step.
        ctx.save_for_backward(grad_x, grad_weight.to(weight.dtype) if need_weight else None)
        ctx.mark_non_differentiable(ce_rows, hits)
        return (ce_rows * row_scale.to(acc)).sum(), ce_rows, hits

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce_rows, _grad_hits):
        grad_x, grad_weight = ctx.saved_tensors
        if grad_x is not None:
            grad_x = grad_x * grad_loss.to(grad_x.dtype)
        if grad_weight is not None:
            grad_weight = grad_weight * grad_loss.to(grad_weight.dtype)
        return grad_x, grad_weight, None, None, None, None, None


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                         row_scale: torch.Tensor, chunk_rows: int = 0
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [N, d], weight [V, d], target [N] (ids), row_scale [N] →
    (Σ row_scale·CE as a 0-dim tensor, CE [N], top-1 hit [N] bool).

    chunk_rows: rows whose logits exist at once (0 = auto_chunk_rows(N, d, V)). Gradients are formed in the
    forward pass only when autograd will need them (grad mode on and x or weight requiring grad).
    """
    if chunk_rows < 0:
        raise ValueError(f"chunk_rows must be >= 0, got {chunk_rows}")
    chunk_rows = chunk_rows or auto_chunk_rows(x.shape[0], x.shape[1], weight.shape[0])
    grad_on = torch.is_grad_enabled()
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        # Cast here (differentiably) and run the chunks without autocast, whose dtype rules skip out= matmuls.
        dtype = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, enabled=False):
            return linear_cross_entropy(x.to(dtype), weight.to(dtype), target, row_scale, chunk_rows)
    if x.shape[0] == 0:  # keep the graph connected so backward still reaches x and weight (with zeros)
        acc = _accumulation_dtype(x)
        return (x.sum() + weight.sum()).to(acc) * 0.0, x.new_zeros(0, dtype=acc), target.new_zeros(0, dtype=torch.bool)
    return _LinearCrossEntropy.apply(x, weight, target, row_scale.detach(), chunk_rows,
                                     grad_on and x.requires_grad, grad_on and weight.requires_grad)


def materialized_cross_entropy(x, weight, target, row_scale):
    """The reference: all logits at once, autograd keeps them for backward. Same signature and result."""
    acc = _accumulation_dtype(x)
    logits = (x @ weight.t()).to(acc)
    ce_rows = F.cross_entropy(logits, target, reduction="none")
    return (ce_rows * row_scale.to(acc)).sum(), ce_rows.detach(), (logits.argmax(-1) == target).detach()
