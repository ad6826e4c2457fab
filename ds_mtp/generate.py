"""Decoding: a batch of prompts continued token by token with a KV cache, greedily or by sampling, and
self-speculative decoding with the model's own MTP heads.

Plain decoding feeds one token per forward pass. With ``speculative=True`` the K−1 extra heads draft the
tokens after the next one (blockwise parallel decoding, Stern et al. 2018; Gloeckle et al. 2024): head k at
the last position t proposes x_{t+k}, and one forward pass of the trunk over [next token, drafts] lets
head 1 verify every draft at once. A draft is kept while head 1 agrees (greedy), or under the
speculative-sampling rule (Leviathan et al. 2023; Chen et al. 2023): draft d drawn from the head's
distribution q is accepted with probability min(1, p(d)/q(d)), and the first rejected one is replaced by a
sample of normalise(max(0, p − q)); when all are accepted head 1's last distribution gives one more token.
The output is then distributed as plain sampling (greedy: token for token the same), and every forward
pass yields 1 + (accepted drafts) tokens. (Token for token up to rounding: the verification pass computes
head 1 at several positions at once, which may round in the last bit otherwise than a one-position pass,
so an argmax tie to the last bit could break differently; no test or benchmark run has met one.)

Head types draft as they were trained (ds_mtp.model):
  linear      ĥ_k = W_k h_t: no state beyond the trunk;
  block       ĥ_k = norm(Block_k(z)): each head block keeps its own KV cache over the committed positions;
  sequential  depth k at position j reads token x_{j+k−1}: its cache holds the positions whose token is
              committed (it lags k−1 positions behind); the later positions are recomputed at each draft
              with the drafts of the earlier depths, as DeepSeek-V3's MTP modules chain.

Batches are decoded in lock-step: a row's prompt is left-padded, pad keys are masked and positions count
from the row's first real token. Under speculation every row advances by the fewest tokens any row
accepted this pass (the tokens a row accepted beyond that are exact samples too, but are decoded again),
so a batch gains less from speculation than one sequence does. Rows that finish leave the batch.

Sequences stop at ``eos_id``, at a caller's ``stop`` rule, after ``max_new_tokens``, or at the model's
context length (model.max_seq_len positions, counted from the longest prompt of the batch).
"""

from __future__ import annotations

import sys
import time
import types
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass
class Sampling:
    """How a next token is chosen from head 1's logits."""

    temperature: float = 0.0
    """0 = greedy (argmax); > 0 samples from softmax(logits / temperature)."""
    top_k: int = 0
    """Sample only among the k most likely tokens (0 = all)."""
    top_p: float = 1.0
    """Sample only among the most likely tokens whose probabilities sum to top_p (nucleus; 1 = all)."""
    epsilon: float = 0.0
    """Drop tokens whose probability is below epsilon, unless they tie the most likely one (Hugging Face's
    epsilon_cutoff; Vafa et al.'s sampler); 0 = keep all."""

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def check(self) -> None:
        from ds_mtp.errors import UserError

        if self.temperature < 0:
            raise UserError(f"--temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise UserError(f"--top-k must be >= 0 (0 = all tokens), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.epsilon < 1:
            raise UserError(f"epsilon must be in [0, 1), got {self.epsilon}")


def token_probs(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """[..., V] logits → the float32 distribution that ``sampling`` draws from (one-hot argmax when greedy)."""
    if sampling.greedy:
        return F.one_hot(logits.argmax(dim=-1), logits.shape[-1]).float()
    logits = logits.float() / sampling.temperature
    if sampling.top_k and sampling.top_k < logits.shape[-1]:
        kth = logits.topk(sampling.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if sampling.top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the more likely tokens
        sorted_probs = sorted_probs.masked_fill(before >= sampling.top_p, 0.0)  # the most likely always stays
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    if sampling.epsilon > 0:
        keep = (probs >= sampling.epsilon) | (probs >= probs.max(dim=-1, keepdim=True).values)
        probs = torch.where(keep, probs, torch.zeros_like(probs))
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """[B, V] distributions → [B] tokens, drawn on CPU with ``generator`` (reproducible on any device)."""
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(probs.device)


def choose_tokens(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """[B, V] logits → [B] tokens: argmax when greedy, else a draw from ``token_probs``."""
    if sampling.greedy:
        return logits.argmax(dim=-1)
    return draw(token_probs(logits, sampling), generator)


@dataclass
class DecodeStats:
    """What a decoding run cost."""

    tokens: int = 0
    """Tokens generated, over all rows."""
    forward_passes: int = 0
    """Forward passes of the trunk, the prompt's included (each yields at least one token per row)."""
    row_steps: int = 0
    """Sum over forward passes of the rows in the batch (= forward_passes for one prompt)."""
    drafted: int = 0
    """Draft tokens proposed by the extra heads, over all rows (speculative only)."""
    accepted: int = 0
    """Draft tokens accepted and emitted, over all rows (speculative only)."""
    seconds: float = 0.0
    """Wall-clock time of the whole decode, prompt included."""

    @property
    def tokens_per_forward(self) -> float:
        """Mean tokens a row gains per forward pass: 1 for plain decoding, up to K with speculation."""
        return self.tokens / self.row_steps if self.row_steps else float("nan")

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else float("nan")

    def summary(self) -> str:
        line = (f"{self.tokens} tokens in {self.seconds:.2f} s ({self.tokens / max(self.seconds, 1e-9):.1f} tokens/s), "
                f"{self.tokens_per_forward:.2f} tokens per forward pass")
        return line + (f", {self.accepted}/{self.drafted} drafts accepted" if self.drafted else "")


@dataclass
class Generation:
    tokens: list[list[int]]
    """The generated tokens of each prompt (the prompt excluded; EOS included when it stopped the row)."""
    stats: DecodeStats = field(default_factory=DecodeStats)
    """What decoding cost: forward passes, tokens per pass, drafts accepted, seconds."""


def context_length(model) -> int | None:
    cfg = getattr(model, "cfg", None)
    return int(cfg.max_seq_len) if cfg is not None else None


class CachedDecoder:
    """The trunk of an MTPModel decoding a batch: left-padded token buffer, one KV cache per block."""

    def __init__(self, model, prompts: list[list[int]], max_new_tokens: int):
        from ds_mtp.model import new_caches

        self.model, cfg = model, model.cfg
        param = next(model.parameters())
        self.device, dtype = param.device, param.dtype
        self.limit = cfg.max_seq_len  # positions per row (learned positions, RoPE tables)
        width = max(len(p) for p in prompts)
        self.capacity = width + max_new_tokens  # buffer slots: the left padding shifts shorter prompts
        B = len(prompts)
        self.tokens = torch.zeros(B, self.capacity, dtype=torch.long, device=self.device)
        self.pad = torch.tensor([width - len(p) for p in prompts], device=self.device)
        for i, p in enumerate(prompts):
            self.tokens[i, width - len(p):width] = torch.as_tensor(p, dtype=torch.long)
        self.committed = width  # tokens in the buffer, prompt included
        self.caches = new_caches(cfg, cfg.n_layer, B, self.capacity, self.device, dtype)

    @property
    def cached(self) -> int:
        return self.caches[0].length

    def room(self) -> int:
        """Tokens that can still be fed before some live row's position reaches the model's context."""
        return self.limit + int(self.pad.min()) - self.cached

    def layout(self, start: int, n: int):
        """The AttentionLayout of positions [start, start + n) over keys [0, start + n)."""
        from ds_mtp.model import AttentionLayout

        steps = torch.arange(start + n, device=self.device)
        real = steps[None, :] >= self.pad[:, None]  # [B, start + n]: keys that are not left padding
        query = steps[start:, None]  # [n, 1]
        # A padding query attends to itself only, so that its (unused) row stays finite.
        mask = (real[:, None, :] | (steps[None, None, :] == query[None])) & (steps[None, None, :] <= query[None])
        positions = (query[None, :, 0] - self.pad[:, None]).clamp(min=0)  # [B, n]
        return AttentionLayout(positions, mask[:, None])

    def extend(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed tokens [B, n] after the cached positions → their pre-norm trunk states z [B, n, d]."""
        return self.model.extend(tokens, self.layout(self.cached, tokens.shape[1]), self.caches)

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        return self.model.heads.norm(z) @ self.model.unembed_weight.t()

    def commit(self, tokens: torch.Tensor) -> None:
        """Append tokens [B, n] to the committed buffer."""
        self.tokens[:, self.committed:self.committed + tokens.shape[1]] = tokens
        self.committed += tokens.shape[1]

    def crop(self, length: int) -> None:
        for cache in self.caches:
            cache.crop(length)

    def select(self, rows: torch.Tensor) -> None:
        self.tokens, self.pad = self.tokens[rows], self.pad[rows]
        for cache in self.caches:
            cache.select(rows)


class HeadDrafter:
    """The K−1 extra heads of an MTPModel proposing the tokens after the next one (see the module docstring).

    ``draft`` is called after every pass with the trunk states of the positions just committed; the
    committed tokens (the next, not yet fed token included) are in ``decoder.tokens``."""

    def __init__(self, model, decoder: CachedDecoder):
        from ds_mtp.model import new_caches

        self.model, self.decoder, heads = model, decoder, model.heads
        self.kind, self.extra = heads.head_type, heads.extra
        B, cap, d = decoder.tokens.shape[0], decoder.capacity, model.cfg.d_model
        dtype = decoder.caches[0].keys.dtype
        self.caches = [] if self.kind == "linear" else \
            new_caches(model.cfg, self.extra, B, cap, decoder.device, dtype)
        self.final = [0] * self.extra  # per extra head: positions held in its cache, whose inputs are all known
        # Pre-norm states per level: [0] the trunk's z; [i] (sequential) depth i+1's output s_{i+1}.
        levels = 1 if self.kind == "block" else self.extra if self.kind == "sequential" else 0
        self.states = [torch.zeros(B, cap, d, device=decoder.device, dtype=dtype) for _ in range(levels)]

    def select(self, rows: torch.Tensor) -> None:
        for cache in self.caches:
            cache.select(rows)
        self.states = [s[rows] for s in self.states]

    def lag(self, head: int) -> int:
        """Positions at the end of the committed tokens that head ``head`` (2..K) cannot finalise yet: block
        heads only the drafting position itself; sequential depth k reads x_{j+k−1}, so the last k−1."""
        return 1 if self.kind == "block" else head - 1

    def draft(self, z_new: torch.Tensor, start: int, count: int,
              choose: Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor | None]]):
        """z_new [B, n, d]: pre-norm trunk states of positions [start, start + n), now in the trunk cache; the
        committed tokens end one position later (the next token). Drafts ``count`` ≤ K−1 tokens at the last
        position: ``choose(logits [B, V], head)`` picks head ``head``'s draft and returns (tokens [B], their
        distribution [B, V] or None when greedy). Returns (drafts [B, count], distributions [B, count, V] or
        None)."""
        model, dec = self.model, self.decoder
        heads, unembed = model.heads, model.unembed_weight.t()
        last = start + z_new.shape[1] - 1  # the drafting position; dec.committed == last + 2
        if self.states:
            self.states[0][:, start:last + 1] = z_new
        drafts, dists = [], []
        if self.kind == "linear":
            h = heads.norm(z_new[:, -1])
            for i in range(count):
                token, dist = choose(heads.transitions[i](h) @ unembed, i + 2)
                drafts.append(token)
                dists.append(dist)
        else:
            # Tokens with the drafts appended: sequential depth k at position j reads x_{j+k−1}.
            tokens = dec.tokens[:, :dec.committed]
            for i in range(count):
                head, cache = i + 2, self.caches[i]
                a = self.final[i]
                cache.crop(a)
                layout = dec.layout(a, last + 1 - a)
                if self.kind == "block":
                    out = heads.blocks[i](self.states[0][:, a:last + 1], layout, cache)
                else:
                    ahead = torch.cat([tokens, *(d[:, None] for d in drafts)], dim=1) if drafts else tokens
                    nxt = ahead[:, a + head - 1:last + head]
                    out = heads.depths[i](self.states[i][:, a:last + 1], model.embed.wte(nxt), layout, cache)
                    if i + 1 < len(self.states):
                        self.states[i + 1][:, a:last + 1] = out
                self.final[i] = max(a, dec.committed - self.lag(head))
                token, dist = choose(heads.norm(out[:, -1]) @ unembed, head)
                drafts.append(token)
                dists.append(dist)
        if not drafts:
            return None, None
        return torch.stack(drafts, dim=1), (None if dists[0] is None else torch.stack(dists, dim=1))


class RecomputeDecoder:
    """Any model with ``logits(tokens [B, T]) → [B, T, V]`` (the evaluation's PathModel protocol: oracles,
    reference models): every step recomputes the whole prefix, right-padded (the protocol's models are
    causal, so the padding after a row never changes its scores)."""

    def __init__(self, model, prompts: list[list[int]], device):
        self.model, self.device = model, device
        self.rows = [list(p) for p in prompts]

    def next_logits(self, new: torch.Tensor | None = None) -> torch.Tensor:
        if new is not None:
            for row, token in zip(self.rows, new[:, 0].tolist()):
                row.append(token)
        lengths = [len(r) for r in self.rows]
        tokens = torch.zeros(len(self.rows), max(lengths), dtype=torch.long)
        for i, row in enumerate(self.rows):
            tokens[i, :len(row)] = torch.as_tensor(row)
        logits = self.model.logits(tokens.to(self.device))
        last = torch.tensor(lengths, device=logits.device) - 1
        return logits[torch.arange(len(self.rows), device=logits.device), last]

    def select(self, rows: torch.Tensor) -> None:
        self.rows = [self.rows[i] for i in rows.tolist()]


def input_device(model) -> torch.device:
    """Where a cache-less model takes its tokens: its ``device`` attribute, else its first parameter's, else CPU
    (the evaluation's protocol models)."""
    device = getattr(model, "device", None)
    if device is not None:
        return torch.device(device)
    for p in getattr(model, "parameters", lambda: [])():
        return p.device
    return torch.device("cpu")


def supports_cache(model) -> bool:
    from ds_mtp.model import MTPModel

    return isinstance(model, MTPModel)


@torch.no_grad()
def generate(model, prompts: list[list[int]], max_new_tokens: int = 128, *, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, epsilon: float = 0.0, seed: int | None = 0,
             generator: torch.Generator | None = None,
             eos_id: int | None = None, speculative: bool = False,
             stop: Callable[[int, int], bool] | None = None,
             on_token: Callable[[int, int], None] | None = None) -> Generation:
    """Continue each prompt (a list of token ids) by up to ``max_new_tokens`` tokens.

    ``model``: an MTPModel (KV cache; ``speculative`` drafts with its extra heads), or any model with
    ``logits(tokens)`` (recomputed at every step). Sampling: greedy at ``temperature`` 0, else softmax(logits /
    temperature) cut to ``top_k`` / ``top_p`` / ``epsilon``, drawn from ``generator`` (default: a CPU generator
    seeded with ``seed``). A row stops after ``eos_id`` (included in its tokens), when ``stop(row, token)`` is
    true, or at the model's context (a prompt of n tokens gets at most max_seq_len − n + 1 new ones).
    ``on_token(row, token)`` sees every token as it is decided (streaming). Rows are indices into ``prompts``."""
    sampling = Sampling(temperature, top_k, top_p, epsilon)
    sampling.check()
    if not prompts:
        return Generation([])
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if generator is None and not sampling.greedy:
        generator = torch.Generator().manual_seed(0 if seed is None else seed)
    limit = context_length(model)
    budgets = [max_new_tokens] * len(prompts)
    if limit is not None:
        from ds_mtp.errors import UserError

        longest = max(len(p) for p in prompts)
        if longest > limit:
            raise UserError(f"a prompt of {longest} tokens does not fit the model's context of {limit} tokens")
        budgets = [min(max_new_tokens, limit - len(p) + 1) for p in prompts]  # the last token is never fed
        max_new_tokens = max(budgets)
    if speculative and not supports_cache(model):
        raise ValueError("speculative decoding needs an MTPModel")
    run = _Run(budgets, eos_id, stop, on_token)
    start = time.perf_counter()
    if max_new_tokens > 0:
        if speculative and model.heads.extra:
            _speculative(model, prompts, max_new_tokens, sampling, generator, run)
        else:
            _plain(model, prompts, max_new_tokens, sampling, generator, run)
    run.stats.seconds = time.perf_counter() - start
    return Generation(run.generated, run.stats)


class _Run:
    """Bookkeeping shared by both loops: which rows are live, what each generated, the stop rules."""

    def __init__(self, budgets: list[int], eos_id, stop, on_token):
        self.budgets = budgets  # most tokens each row may generate
        self.generated: list[list[int]] = [[] for _ in budgets]
        self.live = list(range(len(budgets)))  # original row index of each batch row
        self.eos_id, self.stop, self.on_token = eos_id, stop, on_token
        self.stats = DecodeStats()

    def emit(self, batch_row: int, token: int) -> bool:
        """Record one token of a batch row; True when the row is finished."""
        row = self.live[batch_row]
        self.generated[row].append(token)
        self.stats.tokens += 1
        if self.on_token is not None:
            self.on_token(row, token)
        finished = token == self.eos_id or len(self.generated[row]) >= self.budgets[row]
        if self.stop is not None:
            finished = self.stop(row, token) or finished
        return finished

    def keep(self, still: list[int]) -> None:
        self.live = [self.live[r] for r in still]


def _plain(model, prompts, max_new_tokens, sampling, generator, run: _Run) -> None:
    if supports_cache(model):
        decoder = CachedDecoder(model, prompts, max_new_tokens)
        logits = decoder.logits(decoder.extend(decoder.tokens[:, :decoder.committed]))[:, -1]
    else:
        decoder = RecomputeDecoder(model, prompts, input_device(model))
        logits = decoder.next_logits()
    for step in range(max_new_tokens):
        run.stats.forward_passes += 1
        run.stats.row_steps += len(run.live)
        nxt = choose_tokens(logits, sampling, generator)
        still = [r for r, token in enumerate(nxt.tolist()) if not run.emit(r, token)]
        if not still or step == max_new_tokens - 1:
            break
        if len(still) < len(run.live):
            keep = torch.tensor(still, device=nxt.device)
            decoder.select(keep)
            nxt = nxt[keep]
            run.keep(still)
        if isinstance(decoder, CachedDecoder):
            decoder.commit(nxt[:, None])
            logits = decoder.logits(decoder.extend(nxt[:, None]))[:, -1]
        else:
            logits = decoder.next_logits(nxt[:, None])


def _speculative(model, prompts, max_new_tokens, sampling, generator, run: _Run) -> None:
    decoder = CachedDecoder(model, prompts, max_new_tokens)
    drafter = HeadDrafter(model, decoder)
    extra = model.heads.extra

    def choose(logits, head):
        if sampling.greedy:
            return logits.argmax(dim=-1), None
        probs = token_probs(logits, sampling)
        return draw(probs, generator), probs

    z = decoder.extend(decoder.tokens[:, :decoder.committed])
    run.stats.forward_passes += 1
    run.stats.row_steps += len(run.live)
    start = 0
    nxt = choose_tokens(decoder.logits(z[:, -1]), sampling, generator)
    produced = 1
    still = [r for r, token in enumerate(nxt.tolist()) if not run.emit(r, token)]
    while still and produced < max_new_tokens:
        if len(still) < len(run.live):
            keep = torch.tensor(still, device=nxt.device)
            decoder.select(keep)
            drafter.select(keep)
            nxt, z = nxt[keep], z[keep]
            run.keep(still)
        decoder.commit(nxt[:, None])
        # Drafts beyond the token budget would be thrown away; the verification pass must fit the context.
        count = min(extra, max_new_tokens - produced - 1, decoder.room() - 1)
        drafts, draft_probs = drafter.draft(z, start, count, choose) if count > 0 else (None, None)
        fed = nxt[:, None] if drafts is None else torch.cat([nxt[:, None], drafts], dim=1)  # [B, 1 + m]
        start = decoder.cached
        z = decoder.extend(fed)
        run.stats.forward_passes += 1
        run.stats.row_steps += len(run.live)
        logits = decoder.logits(z)  # head 1 at each fed position: [B, 1 + m, V]
        m = fed.shape[1] - 1
        if m:
            target = token_probs(logits[:, :m], sampling)  # [B, m, V]
            picked = drafts[..., None]
            if sampling.greedy:
                agree = target.gather(-1, picked)[..., 0] > 0
            else:
                p = target.gather(-1, picked)[..., 0]
                q = draft_probs.gather(-1, picked)[..., 0]
                u = torch.rand(drafts.shape, generator=generator).to(p.device)
                agree = u * q < p  # u < p / q, accepted with probability min(1, p/q)
            accepted = agree.long().cumprod(dim=1).sum(dim=1)  # [B] leading accepted drafts
            n = int(accepted.min())
        else:
            accepted, n = torch.zeros(fed.shape[0], dtype=torch.long, device=fed.device), 0
        run.stats.drafted += m * len(run.live)
        run.stats.accepted += n * len(run.live)
        # The token after the n accepted drafts: a row's own accepted draft, else head 1's correction.
        if n == m:
            final = choose_tokens(logits[:, m], sampling, generator)
        elif sampling.greedy:
            final = logits[:, n].argmax(dim=-1)
        else:
            residual = (target[:, n] - draft_probs[:, n]).clamp(min=0)
            total = residual.sum(dim=-1, keepdim=True)
            # p == q up to rounding leaves no residual mass: p itself is then the right distribution
            residual = torch.where(total > 0, residual / total.clamp(min=1e-30), target[:, n])
            rejected = accepted == n
            final = torch.where(rejected, draw(residual, generator), drafts[:, n])
        new = torch.cat([fed[:, 1:n + 1], final[:, None]], dim=1)  # [B, n + 1]
        decoder.crop(start + n + 1)
        z = z[:, :n + 1]
        # count kept n + 1 <= max_new_tokens - produced: every token decided here is within the budget.
        still = [r for r, row in enumerate(new.tolist()) if not any(run.emit(r, token) for token in row)]
        produced += n + 1
        if n:
            decoder.commit(new[:, :n])
        nxt = final


class _CallableModule(types.ModuleType):
    """``ds_mtp.generate(model, prompts, ...)`` calls ``generate`` above: the package's public entry point
    has the module's name, and a module attribute cannot be both (importing the submodule would rebind it)."""

    def __call__(self, *args, **kwargs) -> Generation:
        return generate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
