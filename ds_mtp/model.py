"""The decoder-only transformer and its multi-token prediction heads, as an ordered list of layers.

embedding → blocks → output heads (final norm, K−1 extra heads, shared unembedding). Head 1 decodes
the post-norm trunk state h_t; head k ≥ 2 produces ĥ_{t,k}, decoded by the same unembedding:
  linear      ĥ_{t,k} = W_k h_t                          (the LSE-MTP paper; W_k ~ N(0, init_std) as in its
                                                         code, or W_k = I with model.transition_init=identity)
  block       ĥ_{t,k} = norm(Block_k(z_t))               (Gloeckle et al. 2024; z = pre-norm trunk)
  sequential  s_k = Block_k(P_k [rms(s_{k−1}); rms(E x_{t+k−1})]), ĥ_{t,k} = norm(s_k), s_1 = z
                                                         (DeepSeek-V3 MTP modules)
Packed windows (ds_mtp.data) hold several documents per row. With model.attention = "document" and the
batch's doc_ids, a token attends only to earlier tokens of its own document and positions restart at
each document's start (block-diagonal causal attention, as Llama 3 packs): a document's states are
exactly those it gets alone in a row. An ``AttentionLayout`` carries the mask and positions of one
batch; it is built once per forward and shared by every block and head.

With latent targets of another width D (a teacher's states, model.latent_width), the heads also own a
learned projection P: d → D that maps ĥ_{t,k} into the teacher's space for the latent term only.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ds_mtp.config import ModelConfig, ObjectiveConfig
from ds_mtp.objective import lse_mtp_loss


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return self.weight * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.d_model)
    return nn.LayerNorm(cfg.d_model, bias=cfg.bias)


def rope_tables(head_dim: int, max_len: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)  # [L, hd/2]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, hd]; cos/sin [T, hd/2] or [B, 1, T, hd/2]. Rotates feature pairs (x_i, x_{i+hd/2})."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] position of each token within its document: 0 at a document's first token of the row.
    Documents are contiguous runs of equal doc_ids."""
    B, T = doc_ids.shape
    steps = torch.arange(T, device=doc_ids.device).expand(B, T)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return steps - torch.where(starts, steps, 0).cummax(dim=1).values


def flex_attention_available(device: torch.device) -> bool:
    """FlexAttention (block-sparse: it skips the blocks the document mask removes) on CUDA with torch >= 2.5.
    On CPU it has no backward, so CPU training uses SDPA with a boolean mask (faster there than is_causal)."""
    if device.type != "cuda":
        return False
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


class AttentionLayout:
    """Which keys each query sees, and the positions, for one batch.

    ``AttentionLayout.causal()``: plain causal attention, positions 0..T-1 (one document per row, as in
    generation and evaluation). ``AttentionLayout.documents(doc_ids)``: block-diagonal causal attention
    within each run of equal doc_ids, positions restarting at each run's start. ``mask`` is a [B, 1, T, T]
    bool (True = attend) for SDPA, or a FlexAttention BlockMask where flex is used.
    """

    def __init__(self, positions: torch.Tensor | None = None, mask=None):
        self.positions = positions  # [B, T] int64, or None = 0..T-1
        self.mask = mask

    @classmethod
    def causal(cls) -> "AttentionLayout":
        return cls()

    @classmethod
    def documents(cls, doc_ids: torch.Tensor, use_flex: bool | None = None) -> "AttentionLayout":
        B, T = doc_ids.shape
        use_flex = flex_attention_available(doc_ids.device) if use_flex is None else use_flex
        if use_flex:
            from torch.nn.attention.flex_attention import create_block_mask

            def same_document_causal(b, h, q, k):
                return (doc_ids[b, q] == doc_ids[b, k]) & (q >= k)

            mask = create_block_mask(same_document_causal, B, None, T, T, device=doc_ids.device)
        else:
            causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
            mask = (doc_ids[:, None, :, None] == doc_ids[:, None, None, :]) & causal  # [B, 1, T, T]
        return cls(document_positions(doc_ids), mask)

    @property
    def flex(self) -> bool:
        return self.mask is not None and not isinstance(self.mask, torch.Tensor)

    def position_ids(self, T: int, device) -> torch.Tensor:
        """[B, T] or [T] positions."""
        return torch.arange(T, device=device) if self.positions is None else self.positions


def attention_layout(cfg: ModelConfig, doc_ids: torch.Tensor | None) -> AttentionLayout:
    """A batch's attention: within documents when model.attention is "document" and doc_ids are given, else
    plain causal over the row."""
    if doc_ids is None or cfg.attention != "document":
        return AttentionLayout.causal()
    # FlexAttention has no dropout: with dropout the masked SDPA path is used on every device.
    return AttentionLayout.documents(doc_ids, use_flex=flex_attention_available(doc_ids.device) and cfg.dropout == 0)


_compiled_flex = None


def flex_attention(q, k, v, block_mask):
    global _compiled_flex
    if _compiled_flex is None:
        from torch.nn.attention.flex_attention import flex_attention as flex

        _compiled_flex = torch.compile(flex, dynamic=False)  # uncompiled flex falls back to dense math
    return _compiled_flex(q, k, v, block_mask=block_mask)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.d_model // cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.proj.residual_branch = True
        self.dropout = cfg.dropout
        self.rope = cfg.positions == "rope"
        if self.rope:
            cos, sin = rope_tables(self.head_dim, cfg.max_seq_len)
            self.register_buffer("cos", cos, persistent=False)
            self.register_buffer("sin", sin, persistent=False)

    def forward(self, x, layout: AttentionLayout, cache: "KVCache | None" = None):
        """x [B, T, d] → [B, T, d]. With a ``cache`` (decoding), x holds the new positions only: their keys and
        values are appended to the cache and the queries attend over everything cached, as ``layout.mask``
        ([B, 1, T, cached + T]) allows; ``layout.positions`` are then the new positions' absolute positions."""
        B, T, d = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 × [B, H, T, hd]
        if self.rope:
            if layout.positions is None:
                cos, sin = self.cos[:T], self.sin[:T]  # [T, hd/2]
            else:
                cos, sin = self.cos[layout.positions][:, None], self.sin[layout.positions][:, None]  # [B, 1, T, hd/2]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.append(k, v)
        if layout.flex:
            y = flex_attention(q, k, v, layout.mask)  # [B, H, T, hd]; the model uses flex only without dropout
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=layout.mask, is_causal=layout.mask is None,
                                               dropout_p=self.dropout if self.training else 0.0)  # [B, H, T, hd]
        return self.proj(y.transpose(1, 2).reshape(B, T, d))


class MLP(nn.Module):
    """up → activation → down. "gelu" is the exact GELU; "gelu_tanh" its tanh approximation (the paper's code),
    kept a separate choice so that models exported with "gelu" still compute what they were trained with."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        self.gelu_approximate = "tanh" if cfg.mlp == "gelu_tanh" else "none"
        width = cfg.ff_width
        self.up = nn.Linear(cfg.d_model, (2 if self.swiglu else 1) * width, bias=cfg.bias)
        self.down = nn.Linear(width, cfg.d_model, bias=cfg.bias)
        self.down.residual_branch = True

    def forward(self, x):
        if self.swiglu:
            gate, up = self.up(x).chunk(2, dim=-1)
            return self.down(F.silu(gate) * up)
        return self.down(F.gelu(self.up(x), approximate=self.gelu_approximate))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)). [B, T, d] → [B, T, d]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm1, self.attn = make_norm(cfg), CausalSelfAttention(cfg)
        self.norm2, self.mlp = make_norm(cfg), MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, layout: AttentionLayout, cache: "KVCache | None" = None):
        x = x + self.drop(self.attn(self.norm1(x), layout, cache))
        return x + self.drop(self.mlp(self.norm2(x)))


class KVCache:
    """The keys and values one attention layer has computed for a batch being decoded, so that a decoding step
    computes only its new positions. Pre-allocated to ``capacity`` positions; ``crop`` forgets positions
    (rejected draft tokens) and ``select`` keeps some rows (finished sequences leave the batch)."""

    def __init__(self, batch: int, n_head: int, head_dim: int, capacity: int, device, dtype):
        self.keys = torch.empty(batch, n_head, capacity, head_dim, device=device, dtype=dtype)
        self.values = torch.empty_like(self.keys)
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, H, T, hd] after the cached positions; returns all cached keys and values."""
        end = self.length + k.shape[2]
        if end > self.keys.shape[2]:
            raise ValueError(f"KV cache holds {self.keys.shape[2]} positions, {end} requested")
        self.keys[:, :, self.length:end] = k
        self.values[:, :, self.length:end] = v
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def crop(self, length: int) -> None:
        self.length = min(self.length, length)

    def select(self, rows: torch.Tensor) -> None:
        self.keys, self.values = self.keys[rows], self.values[rows]


def new_caches(cfg: ModelConfig, count: int, batch: int, capacity: int, device, dtype) -> list[KVCache]:
    """One KVCache per attention layer (``count`` of them) of a model with config ``cfg``."""
    return [KVCache(batch, cfg.n_head, cfg.d_model // cfg.n_head, capacity, device, dtype) for _ in range(count)]


class TokenEmbedding(nn.Module):
    """tokens [B, T] → x [B, T, d]; holds the (possibly tied) embedding and learned positions."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.positions == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)

    @property
    def weight(self) -> torch.Tensor:
        return self.wte.weight

    def forward(self, tokens, layout: AttentionLayout):
        x = self.wte(tokens)
        if self.wpe is not None:
            x = x + self.wpe(layout.position_ids(tokens.shape[1], tokens.device))
        return self.drop(x)


class SequentialDepth(nn.Module):
    """One DeepSeek-V3 MTP module: combines the previous depth's state with the next token's embedding."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm_state, self.norm_embed = RMSNorm(cfg.d_model), RMSNorm(cfg.d_model)
        self.combine = nn.Linear(2 * cfg.d_model, cfg.d_model, bias=False)
        self.block = Block(cfg)

    def forward(self, state, next_embed, layout: AttentionLayout, cache: KVCache | None = None):
        return self.block(self.combine(torch.cat([self.norm_state(state), self.norm_embed(next_embed)], dim=-1)),
                          layout, cache)


def latent_projection_width(cfg: ModelConfig) -> int | None:
    """D when the latent targets have another width than d_model (the heads then own P: d → D), else None."""
    return cfg.latent_width if cfg.latent_width not in (0, cfg.d_model) else None


class OutputHeads(nn.Module):
    """Final norm and the K−1 extra heads. z [B, T, d] → (h [B, T, d], ĥ [B, K−1, T, d] or None).

    ``latent_projection`` (P: d → D, only with model.latent_width = D ≠ d) is not used by forward: the
    model applies it to ĥ for the latent term when a teacher's targets are given.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.head_type, self.extra = cfg.head_type, cfg.mtp_k - 1
        self.norm = make_norm(cfg)
        if cfg.head_type == "linear":
            self.transitions = nn.ModuleList(nn.Linear(cfg.d_model, cfg.d_model, bias=False) for _ in range(self.extra))
        elif cfg.head_type == "block":
            self.blocks = nn.ModuleList(Block(cfg) for _ in range(self.extra))
        else:
            self.depths = nn.ModuleList(SequentialDepth(cfg) for _ in range(self.extra))
        self.unembed = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if self.unembed is not None:
            self.unembed.unembedding = True  # the paper's lm_head: ds_mtp.engine.param_groups does not decay it
        width = latent_projection_width(cfg)
        self.latent_projection = None if width is None else nn.Linear(cfg.d_model, width, bias=False)

    def forward(self, z, layout: AttentionLayout, tokens=None, embed_weight=None):
        h = self.norm(z)
        if not self.extra:
            return h, None
        if self.head_type == "linear":
            preds = [w(h) for w in self.transitions]
        elif self.head_type == "block":
            preds = [self.norm(block(z, layout)) for block in self.blocks]
        else:
            preds, state = [], z
            for k, depth in enumerate(self.depths, start=2):
                # x_{t+k-1}; the tail is never a valid target (padded to T also when T < k - 1)
                shifted = F.pad(tokens[:, k - 1:], (0, min(k - 1, tokens.shape[1])))
                state = depth(state, F.embedding(shifted, embed_weight), layout)
                preds.append(self.norm(state))
        return h, torch.stack(preds, dim=1)


class MTPModel(nn.Module):
    """The whole model. ``forward(tokens, doc_ids)`` returns the LSE-MTP loss dict."""

    def __init__(self, cfg: ModelConfig, objective: ObjectiveConfig | None = None, pad_id: int | None = None):
        super().__init__()
        self.cfg, self.objective, self.pad_id = cfg, objective or ObjectiveConfig(), pad_id
        self.active_heads: int | None = None
        """Heads counted by the loss (objective.curriculum: the training loop sets it every step); None = all K."""
        self.embed = TokenEmbedding(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.heads = OutputHeads(cfg)
        self.apply(self._init_weights)
        if cfg.head_type == "linear" and cfg.transition_init == "identity":
            for w in self.heads.transitions:
                nn.init.eye_(w.weight)
        if self.heads.latent_projection is not None:
            # Semi-orthogonal, scaled so that P ĥ keeps ĥ's per-coordinate RMS (the teacher's states are normed
            # too): the latent term starts at the teacher's scale instead of pulling ĥ towards zero.
            d, D = cfg.d_model, cfg.latent_width
            nn.init.orthogonal_(self.heads.latent_projection.weight, gain=math.sqrt(max(D, d) / d))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            std = self.cfg.init_std
            if getattr(module, "residual_branch", False):
                std /= math.sqrt(2 * self.cfg.n_layer)  # GPT-2: keep the residual stream's variance flat
            nn.init.normal_(module.weight, 0.0, std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, 0.0, self.cfg.init_std)

    def layers(self) -> list[nn.Module]:
        """The model in execution order, for pipeline partitioning."""
        return [self.embed, *self.blocks, self.heads]

    @property
    def unembed_weight(self) -> torch.Tensor:
        return self.embed.weight if self.heads.unembed is None else self.heads.unembed.weight

    def external_parameters(self) -> list[nn.Parameter]:
        """Parameters this module's own forward uses outside their owners' forward (for ZeRO-3)."""
        params = [self.embed.weight]
        if self.heads.unembed is not None:
            params.append(self.heads.unembed.weight)
        return params

    def states(self, tokens, doc_ids=None):
        """tokens [B, T], doc_ids [B, T] or None → (h [B, T, d], ĥ [B, K−1, T, d] or None)."""
        layout = attention_layout(self.cfg, doc_ids)
        x = self.embed(tokens, layout)
        for block in self.blocks:
            x = block(x, layout)
        return self.heads(x, layout, tokens, self.embed.weight)

    def forward(self, tokens, doc_ids=None, latent_targets=None, latent_mask=None):
        """tokens / doc_ids [B, T] (doc_ids: which document each position belongs to; they bound the
        targets, and the attention with model.attention = "document"). latent_targets [B, K−1, T, D] /
        latent_mask [B, T]: a teacher's anchors (ds_mtp.teacher); D is model.latent_width when set (ĥ is
        then projected by heads.latent_projection for the latent term), else d."""
        h, head_hidden = self.states(tokens, doc_ids)
        latent_pred = None
        if latent_targets is not None and head_hidden is not None and self.heads.latent_projection is not None:
            # Called here as a module (not through its weight) so that ZeRO-3 gathers P for this forward.
            latent_pred = self.heads.latent_projection(head_hidden)  # [B, K−1, T, D]
        o = self.objective
        return lse_mtp_loss(h, head_hidden, tokens, self.unembed_weight, self.embed.weight,
                            lambda_latent=o.lambda_latent, lambda_semantic=o.lambda_semantic,
                            pad_id=self.pad_id, doc_ids=doc_ids, head_weights=o.head_weights,
                            distance=o.distance, loss_impl=o.loss_impl, chunk_rows=o.chunk_rows,
                            mse_normalization=o.mse_normalization, active_heads=self.active_heads,
                            latent_targets=latent_targets,
                            latent_mask=latent_mask, latent_pred=latent_pred)

    @torch.no_grad()
    def extend(self, tokens: torch.Tensor, layout: AttentionLayout, caches: list[KVCache]) -> torch.Tensor:
        """Decoding: the pre-norm trunk states z [B, T, d] of ``tokens`` [B, T], the positions that follow those in
        ``caches`` (one per block, extended here). ``layout`` holds the new positions and the mask over cached +
        new keys. Head 1's logits are ``self.heads.norm(z) @ self.unembed_weight.t()``."""
        x = self.embed(tokens, layout)
        for block, cache in zip(self.blocks, caches):
            x = block(x, layout, cache)
        return x

    @torch.no_grad()
    def hidden(self, tokens, doc_ids=None):
        """Final post-norm trunk states h [B, T, d]."""
        return self.states(tokens, doc_ids)[0]

    @torch.no_grad()
    def logits(self, tokens, doc_ids=None):
        """Next-token logits [B, T, V] (head 1)."""
        return self.states(tokens, doc_ids)[0] @ self.unembed_weight.t()

    @torch.no_grad()
    def head_logits(self, tokens, doc_ids=None):
        """Logits of every head [B, K, T, V]: head k at position t scores token t+k."""
        h, head_hidden = self.states(tokens, doc_ids)
        all_states = h[:, None] if head_hidden is None else torch.cat([h[:, None], head_hidden], dim=1)
        return all_states @ self.unembed_weight.t()


def count_parameters(model: nn.Module) -> int:
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


def save_exported(model: MTPModel, state_dict: dict, out_dir: str | Path, extra: dict | None = None) -> Path:
    """Write model.safetensors (full, consolidated weights) and config.json loadable without DeepSpeed."""
    from safetensors.torch import save_file

    from ds_mtp.data import write_atomic

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().to(torch.float32).contiguous().clone() for name, t in state_dict.items()}
    if model.cfg.tie_embeddings:
        tensors.pop("heads.unembed.weight", None)
    tmp = out_dir / "model.safetensors.tmp"
    save_file(tensors, str(tmp))
    tmp.replace(out_dir / "model.safetensors")
    config = {"model": model.cfg.__dict__, "objective": model.objective.__dict__, "pad_id": model.pad_id,
              **(extra or {})}
    write_atomic(out_dir / "config.json", (json.dumps(config, indent=2) + "\n").encode())
    return out_dir


def _unreadable_weights(weights: Path, e: Exception) -> str:
    return (f"{weights} cannot be read as safetensors ({str(e).splitlines()[0] if str(e) else type(e).__name__}): "
            "truncated or not an exported model")


def check_exported_weights(model_dir: str | Path) -> None:
    """Refuse an exported model whose model.safetensors is truncated or foreign, reading only its header (safetensors
    checks that the header's tensors cover the file exactly): a teacher is checked so before any rank starts."""
    from safetensors import SafetensorError, safe_open

    from ds_mtp.errors import UserError

    weights = Path(model_dir) / "model.safetensors"
    try:
        with safe_open(str(weights), framework="pt"):
            pass
    except (SafetensorError, OSError) as e:
        raise UserError(_unreadable_weights(weights, e)) from None


def load_exported(model_dir: str | Path, device: str | torch.device = "cpu") -> MTPModel:
    """Load an exported model directory (model.safetensors + config.json); no DeepSpeed needed."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ds_mtp.errors import UserError

    model_dir = Path(model_dir)
    if not (model_dir / "model.safetensors").is_file() or not (model_dir / "config.json").is_file():
        raise UserError(f"{model_dir} is not an exported model (needs model.safetensors and config.json)")
    try:
        config = json.loads((model_dir / "config.json").read_text())
        model = MTPModel(ModelConfig(**config["model"]), ObjectiveConfig(**config["objective"]), config.get("pad_id"))
    except (ValueError, TypeError, KeyError) as e:  # JSON errors are ValueErrors; a field too many is a TypeError
        raise UserError(f"{model_dir / 'config.json'} is not an exported model's config ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else e!r})") from None
    weights = model_dir / "model.safetensors"
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as e:  # a truncated or foreign file
        raise UserError(_unreadable_weights(weights, e)) from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise UserError(f"{weights} does not hold the weights its config.json describes: "
                        f"{' '.join(str(e).split())[:300]}") from None
    return model.to(device).eval()
