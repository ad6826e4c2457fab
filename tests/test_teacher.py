import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, make_token_data, run_cli
from ds_mtp.config import ModelConfig, load_config
from ds_mtp.data import TokenShards, WindowSampler, read_meta, write_documents
from ds_mtp.ranks import free_port
from ds_mtp.errors import UserError
from ds_mtp.model import AttentionLayout, MTPModel, load_exported, save_exported
from ds_mtp.monitor import read_metrics
from ds_mtp.objective import lse_mtp_loss
from ds_mtp.ranks import RankLayout
from ds_mtp.teacher import CheckpointTeacher, LocalFeed, RemoteFeed, fill_latent_width, head_targets
from ds_mtp.run_data import resolve_data


def run_config(data, teacher_dir, *extra):
    return resolve_data(load_config(None, [
        f"data.path={data}", "model.preset=tiny", "model.d_model=32", "model.n_layer=1", "model.mtp_k=3",
        "train.seq_len=32", "train.micro_batch=4", f"teacher.source=checkpoint:{teacher_dir}", *extra]))


def test_checkpoint_teacher_states_are_the_models_hidden_states(token_data, teacher_dir):
    tokens = torch.randint(0, 64, (3, 32))
    frozen = load_exported(teacher_dir)
    teacher = CheckpointTeacher(run_config(token_data, teacher_dir), "cpu")
    assert torch.equal(teacher.states(tokens), frozen.hidden(tokens))
    # a packed window: each document's states are the model's on that document alone
    doc_ids = torch.tensor([0] * 10 + [1] * 22).expand(3, 32)
    packed = teacher.states(tokens, doc_ids)
    torch.testing.assert_close(packed[:, 10:], frozen.hidden(tokens[:, 10:]), rtol=1e-5, atol=1e-5)
    # an inner layer: block 1's output through the teacher's final norm
    inner = CheckpointTeacher(run_config(token_data, teacher_dir, "teacher.layer=1"), "cpu")
    with torch.no_grad():
        layout = AttentionLayout.causal()
        expected = frozen.heads.norm(frozen.blocks[0](frozen.embed(tokens, layout), layout))
    assert torch.equal(inner.states(tokens), expected)
    assert not torch.allclose(inner.states(tokens), teacher.states(tokens))
    # a wider student: the targets stay the teacher's own width-32 states; the student gets P: 48 → 32
    wide_cfg = run_config(token_data, teacher_dir, "model.d_model=48", "model.n_head=2")
    assert torch.equal(CheckpointTeacher(wide_cfg, "cpu").states(tokens), frozen.hidden(tokens))
    meta = read_meta(token_data)
    assert fill_latent_width(wide_cfg, meta).model.latent_width == 32
    assert fill_latent_width(run_config(token_data, teacher_dir), meta).model.latent_width == 0  # same width
    assert fill_latent_width(run_config(token_data, teacher_dir, "model.latent_width=32"), meta).model.latent_width == 0
    with pytest.raises(UserError, match="model.latent_width=40, but the teacher checkpoint:.* has width 32"):
        fill_latent_width(run_config(token_data, teacher_dir, "model.d_model=48", "model.latent_width=40"), meta)
    # trainers receive buffers of the teacher's width from teacher ranks
    feed = RemoteFeed(wide_cfg, RankLayout(2, 1), None, "cpu", 0)
    assert feed.shape == (4, 32, 32)


def test_teacher_config_errors(token_data, teacher_dir, tmp_path):
    bad = [("teacher.source=bert", "teacher.source must be"),
           ("teacher.source=checkpoint:", "teacher.source must be"),
           ("teacher.ranks=1", "teacher ranks need"),
           ("teacher.prefetch=0", "teacher.prefetch must be at least 1"),
           ("teacher.timeout=0", "teacher.timeout and teacher.startup_timeout must be positive"),
           ("teacher.startup_timeout=-1", "teacher.timeout and teacher.startup_timeout must be positive"),
           ("model.latent_width=40", "model.latent_width=40: a latent width other than d_model"),
           ("model.latent_width=-1", "model.latent_width=-1: a latent width")]
    for override, message in bad:
        with pytest.raises(UserError, match=message):
            load_config(None, [override])
    with pytest.raises(UserError, match="mtp_k=1"):
        load_config(None, [f"teacher.source=checkpoint:{teacher_dir}"])
    assert load_config(None, [f"teacher.source=checkpoint:{teacher_dir}", "model.mtp_k=2", "train.pipeline_stages=2",
                              "teacher.ranks=1"]).train.pipeline_stages == 2  # teachers feed a pipeline's last stage
    from ds_mtp.teacher import check_teacher

    meta = read_meta(token_data)
    with pytest.raises(UserError, match="not an exported ds-mtp model"):
        check_teacher(run_config(token_data, tmp_path), meta)
    with pytest.raises(UserError, match="teacher.layer=5 is not a block"):
        check_teacher(run_config(token_data, teacher_dir, "teacher.layer=5"), meta)
    with pytest.raises(UserError, match="must share the tokenizer"):
        check_teacher(run_config(token_data, teacher_dir, "model.vocab_size=100"), meta)


def _reference_loss(hidden, head_hidden, tokens, unembed, embed, targets, mask, lam_l, lam_s):
    """The LSE-MTP loss written out position by position, anchored to the given targets."""
    B, T, d = hidden.shape
    K = 1 + head_hidden.shape[1]
    loss = 0.0
    for k in range(1, K + 1):
        ce_sum, lat_sum, sem_sum, n, n_lat = 0.0, 0.0, 0.0, 0, 0
        for b in range(B):
            for t in range(T - k):
                pred = hidden[b, t] if k == 1 else head_hidden[b, k - 2, t]
                ce_sum = ce_sum + torch.nn.functional.cross_entropy((pred @ unembed.t())[None], tokens[b, t + k][None])
                n += 1
                if k >= 2:
                    sem_sum = sem_sum + (pred - embed[tokens[b, t + k]]).pow(2).mean()
                    if mask is None or mask[b, t]:
                        lat_sum = lat_sum + (pred - targets[b, k - 2, t]).pow(2).mean()
                        n_lat += 1
        loss = loss + ce_sum / n
        if k >= 2:
            loss = loss + lam_l * lat_sum / max(n_lat, 1) + lam_s * sem_sum / n
    return loss


def test_objective_with_external_latent_targets():
    torch.manual_seed(1)
    B, T, d, V, K = 2, 7, 8, 11, 3
    hidden = torch.randn(B, T, d, requires_grad=True)
    head_hidden = torch.randn(B, K - 1, T, d, requires_grad=True)
    tokens = torch.randint(0, V, (B, T))
    unembed, embed = torch.randn(V, d), torch.randn(V, d)
    # self-anchoring expressed as external targets is exactly the default objective
    default = lse_mtp_loss(hidden, head_hidden, tokens, unembed, embed, lambda_latent=0.3)
    as_targets = lse_mtp_loss(hidden, head_hidden, tokens, unembed, embed, lambda_latent=0.3,
                              latent_targets=head_targets(hidden, K, shifted=True))
    assert torch.allclose(default["loss"], as_targets["loss"], atol=1e-6)
    # arbitrary targets and a stride mask against the written-out reference
    targets = torch.randn(B, K - 1, T, d, requires_grad=True)
    mask = (torch.arange(T) % 2 == 0).expand(B, T)
    for m in (None, mask):
        out = lse_mtp_loss(hidden, head_hidden, tokens, unembed, embed, lambda_latent=0.3, lambda_semantic=0.2,
                           latent_targets=targets, latent_mask=m)
        ref = _reference_loss(hidden, head_hidden, tokens, unembed, embed, targets, m, 0.3, 0.2)
        assert torch.allclose(out["loss"], ref, atol=1e-5)
    # stop-gradient: the teacher's targets never receive a gradient; the predictions do
    out["loss"].backward()
    assert targets.grad is None and head_hidden.grad is not None
    with pytest.raises(ValueError, match="latent_targets must be"):
        lse_mtp_loss(hidden, head_hidden, tokens, unembed, embed, latent_targets=targets[:, :1])
    # a per-position (unshifted) source gives every head the same anchor
    states = torch.randn(B, T, d)
    per_head = head_targets(states, K, shifted=False)
    assert torch.equal(per_head[:, 0], states) and torch.equal(per_head[:, 1], states)


def test_objective_projected_latent_term_against_a_hand_computation():
    torch.manual_seed(2)
    B, T, d, D, V, K, pad = 2, 10, 4, 6, 11, 3, 10
    hidden = torch.randn(B, T, d, requires_grad=True)
    head_hidden = torch.randn(B, K - 1, T, d, requires_grad=True)
    projection = torch.randn(D, d, requires_grad=True)
    tokens = torch.randint(0, V - 1, (B, T))
    tokens[0, 5] = tokens[1, 3] = pad  # padded targets leave V_k
    unembed, embed = torch.randn(V, d), torch.randn(V, d)
    targets = torch.randn(B, K - 1, T, D, requires_grad=True)
    mask = (torch.arange(T) % 2 == 0).expand(B, T)
    latent_pred = head_hidden @ projection.t()  # [B, K−1, T, D]
    out = lse_mtp_loss(hidden, head_hidden, tokens, unembed, embed, lambda_latent=0.5, lambda_semantic=0.2,
                       pad_id=pad, latent_targets=targets, latent_mask=mask, latent_pred=latent_pred,
                       loss_impl="materialized")
    for k in range(2, K + 1):
        dists = [sum((sum(projection[i, j] * head_hidden[b, k - 2, t, j] for j in range(d)) - targets[b, k - 2, t, i])
                     ** 2 for i in range(D)) / D
                 for b in range(B) for t in range(T - k) if tokens[b, t + k] != pad and mask[b, t]]
        assert len(dists) >= 3 and torch.allclose(out["latent"][k - 2], sum(dists) / len(dists), atol=1e-5)
    # the CE and semantic terms still read ĥ of width d: the same as with targets of width d
    plain = lse_mtp_loss(hidden, head_hidden, tokens, unembed, embed, lambda_latent=0.5, lambda_semantic=0.2,
                         pad_id=pad, latent_targets=torch.randn(B, K - 1, T, d), latent_mask=mask,
                         loss_impl="materialized")
    for name in ("ce", "semantic"):
        assert all(torch.allclose(a, b) for a, b in zip(out[name], plain[name]))
    expected = sum(out["ce"]) + 0.5 * sum(out["latent"]) + 0.2 * sum(out["semantic"])
    assert torch.allclose(out["loss"], expected, atol=1e-5)
    out["loss"].backward()
    assert projection.grad is not None and projection.grad.abs().sum() > 0 and targets.grad is None
    with pytest.raises(ValueError, match="latent_targets must be .B, K-1, T, D. = .2, 2, 10, 6."):
        lse_mtp_loss(hidden, head_hidden, tokens, unembed, embed, latent_targets=targets[..., :d],
                     latent_pred=latent_pred)
    with pytest.raises(ValueError, match="latent_pred needs latent_targets"):
        lse_mtp_loss(hidden, head_hidden, tokens, unembed, embed, latent_pred=latent_pred)


def test_student_learns_a_projection_to_a_teacher_of_another_width(tmp_path):
    torch.manual_seed(3)
    d, D, K = 32, 24, 3
    # identity transitions: ĥ starts at h's scale, which P keeps, so the latent term starts at the teacher's
    cfg = ModelConfig(vocab_size=64, n_layer=1, n_head=2, d_model=d, max_seq_len=64, mtp_k=K, latent_width=D,
                      transition_init="identity")
    model = MTPModel(cfg, pad_id=62)
    P = model.heads.latent_projection.weight  # [D, d], rows orthonormal: keeps the per-coordinate RMS of ĥ
    assert P.shape == (D, d) and torch.allclose(P @ P.t(), torch.eye(D), atol=1e-5)
    assert "heads.latent_projection.weight" not in MTPModel(ModelConfig(vocab_size=64, mtp_k=K)).state_dict()
    tokens = torch.randint(0, 60, (4, 32))
    teacher_states = torch.nn.functional.rms_norm(torch.randn(4, 32, D), (D,))  # a normed trajectory [B, T, D]
    targets = head_targets(teacher_states, K, shifted=True).clone().requires_grad_(True)
    out = model(tokens, latent_targets=targets)
    with pytest.raises(ValueError, match="latent_targets must be"):  # width-d targets for a width-D model
        model(tokens, latent_targets=torch.zeros(4, K - 1, 32, d))
    out["loss"].backward()
    assert P.grad is not None and P.grad.abs().sum() > 0 and targets.grad is None
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    latent = []
    for _ in range(8):
        optimizer.zero_grad()
        out = model(tokens, latent_targets=targets)
        (out["loss"] + sum(out["latent"])).backward()
        optimizer.step()
        latent.append(sum(out["latent"]).item())
    assert latent[-1] < 0.8 * latent[0], latent
    # exported with the projection and reloaded with it: the same loss
    exported = load_exported(save_exported(model, model.state_dict(), tmp_path / "model"))
    assert exported.cfg.latent_width == D and torch.equal(exported.heads.latent_projection.weight, P.detach())
    with torch.no_grad():
        assert torch.allclose(exported(tokens, latent_targets=targets)["loss"],
                              model.eval()(tokens, latent_targets=targets)["loss"], atol=1e-6)


@pytest.mark.slow
def test_train_with_a_teacher_of_another_width(token_data, teacher_dir, tmp_path):
    """One process through DeepSpeed (ZeRO-3, so the projection must be gathered): width-48 student, width-32
    teacher; the projection is in the checkpoint (resume) and in the exported model."""
    run_dir = tmp_path / "run"
    args = ["--run-dir", str(run_dir), "--lse-target", f"checkpoint:{teacher_dir}", f"data.path={token_data}",
            "model.preset=tiny", "model.d_model=48", "model.n_head=2", "model.n_layer=1", "model.mtp_k=3", "train.seq_len=32", "train.micro_batch=4",
            "train.max_steps=12", "train.lr=3e-3", "train.warmup_steps=0", "objective.lambda_latent=1.0",
            "model.transition_init=identity"]
    result = run_cli("train", *args, "train.stop_after=6", env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert json.loads((run_dir / "config.json").read_text())["model"]["latent_width"] == 32
    result = run_cli("train", *args, "--resume", env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    latent = [r["latent_2"] + r["latent_3"] for r in rows]
    assert [r["step"] for r in rows] == list(range(1, 13)) and sum(latent[-3:]) < 0.8 * sum(latent[:3]), latent
    model = load_exported(run_dir / "model")
    P = model.heads.latent_projection.weight
    assert model.cfg.latent_width == 32 and P.shape == (32, 48)
    torch.manual_seed(1234)  # train.seed, which build_engine seeds the model with: the projection as initialised
    initial = MTPModel(model.cfg, model.objective, model.pad_id).heads.latent_projection.weight
    assert not torch.allclose(P, initial, atol=1e-4)  # trained
    # ds-mtp export consolidates it from the ZeRO-3 checkpoint too
    result = run_cli("export", str(run_dir), "--out", str(tmp_path / "exported"), env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.equal(load_exported(tmp_path / "exported").heads.latent_projection.weight, P)


def test_local_feed_matches_teacher_on_the_samplers_batches(token_data, teacher_dir):
    cfg = run_config(token_data, teacher_dir)
    teacher = CheckpointTeacher(cfg, "cpu")
    sampler = WindowSampler(TokenShards(token_data, "train"), 32, 4, seed=cfg.train.seed)
    feed = LocalFeed(cfg, teacher, "cpu")
    batch = sampler.batch(3)
    targets, mask = feed.targets(3, batch.tokens, batch.doc_ids)
    states = load_exported(teacher_dir).hidden(batch.tokens, batch.doc_ids)
    assert mask is None and targets.shape == (4, 2, 32, 32)
    assert torch.equal(targets[:, 1, :30], states[:, 2:])  # head 3 at t is anchored to g_{t+2}


# ---- trainer / teacher processes over the bridge (no DeepSpeed: the feed and the serve loop themselves)

BRIDGE_PROBE = r"""
import os, sys, time, torch
from ds_mtp.config import load_config
from ds_mtp.run_data import resolve_data
from ds_mtp.ranks import find_role, write_role_env
from ds_mtp.teacher import bridge_port, connect_bridge, run_teacher_rank, RemoteFeed, TeacherError
out_dir, (first, end), pause = sys.argv[1], map(int, sys.argv[2].split(":")), float(sys.argv[3])
cfg = resolve_data(load_config(None, sys.argv[4:]))
role = find_role(cfg)
try:
    store, group = connect_bridge(role, bridge_port(cfg, role), cfg.teacher.startup_timeout)
    write_role_env(role)
    if role.is_teacher:
        run_teacher_rank(cfg, role, store, group)
        sys.exit(0)
    feed = RemoteFeed(cfg, role.layout, group, "cpu", role.rank)
    feed.start(first, end)  # first > 0: a resumed run
    for micro in range(first, end):
        targets, _ = feed.targets(micro)
        torch.save(targets.clone(), os.path.join(out_dir, f"rank{role.rank}_micro{micro}.pt"))
        print(f"micro {micro}", flush=True)
        time.sleep(pause)
    feed.close()
except TeacherError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(e.exit_code)
"""


def _start_ranks(world: int, args: list[str], started: int | None = None) -> list[subprocess.Popen]:
    port = free_port()
    procs = []
    for rank in range(world if started is None else started):
        env = {**os.environ, "PYTHONPATH": str(REPO), "RANK": str(rank), "WORLD_SIZE": str(world),
               "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-c", BRIDGE_PROBE, *args], env=env, cwd=REPO, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    return procs


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_trainers_receive_the_teachers_latents(token_data, teacher_dir, tmp_path):
    overrides = [f"data.path={token_data}", "model.preset=tiny", "model.d_model=32", "model.n_layer=1",
                 "model.mtp_k=3", "train.seq_len=32", "train.micro_batch=4", "train.seed=7",
                 f"teacher.source=checkpoint:{teacher_dir}", "teacher.ranks=1", "teacher.timeout=60"]
    procs = _start_ranks(3, [str(tmp_path), "2:7", "0", *overrides])
    outputs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [o[1][-2000:] for o in outputs]
    assert "served 10 micro-batches" in outputs[2][1]
    frozen = load_exported(teacher_dir)
    shards = TokenShards(token_data, "train")
    for rank in (0, 1):
        sampler = WindowSampler(shards, 32, 4, seed=7, dp_rank=rank, dp_size=2)
        for micro in range(2, 7):
            received = torch.load(tmp_path / f"rank{rank}_micro{micro}.pt")
            batch = sampler.batch(micro)
            expected = head_targets(frozen.hidden(batch.tokens, batch.doc_ids), 3, shifted=True)
            assert torch.equal(received, expected), (rank, micro)


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("failure", ["stall", "death"])
def test_a_stalled_or_dead_teacher_stops_the_trainer_within_the_timeout(token_data, teacher_dir, tmp_path, failure):
    overrides = [f"data.path={token_data}", "model.preset=tiny", "model.d_model=32", "model.n_layer=1",
                 "model.mtp_k=3", "train.seq_len=32", "train.micro_batch=4",
                 f"teacher.source=checkpoint:{teacher_dir}", "teacher.ranks=1", "teacher.timeout=4"]
    trainer, teacher = _start_ranks(2, [str(tmp_path), "0:100000", "0.05", *overrides])
    try:
        assert trainer.stdout.readline().strip() == "micro 0"
        teacher.send_signal(signal.SIGSTOP if failure == "stall" else signal.SIGKILL)
        stopped = time.monotonic()
        _, err = trainer.communicate(timeout=60)
        waited = time.monotonic() - stopped
    finally:
        teacher.send_signal(signal.SIGKILL)
        teacher.wait()
    assert trainer.returncode == 3
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: teacher rank 1"), err[-2000:]
    if failure == "stall":
        assert "nothing within teacher.timeout=4 s" in lines[0]
        assert 3 < waited < 4 + 30  # 2 prefetched micro-batches, then the 4 s timeout (slack: a loaded machine)
    else:
        assert waited < 4 + 30


@pytest.mark.multiprocess
@pytest.mark.slow
def test_train_with_teacher_ranks_lowers_the_latent_term(token_data, teacher_dir, tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli("train", "--nproc", "3", "--run-dir", str(run_dir), f"data.path={token_data}",
                     "model.preset=tiny", "model.d_model=32", "model.n_layer=1", "model.mtp_k=3",
                     "train.seq_len=32", "train.micro_batch=4", "train.max_steps=14", "train.save_model=false",
                     "train.lr=3e-3", "train.warmup_steps=0", "objective.lambda_latent=1.0",
                     # ĥ starts at h's scale (identity), so 14 steps show the term falling; from N(0, 0.02) ĥ
                     # starts near 0 and the term first has to grow the transitions.
                     "model.transition_init=identity",
                     f"teacher.source=checkpoint:{teacher_dir}", "teacher.ranks=1", env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 rank(s)" in result.stdout  # the teacher rank is not in the trainers' world
    assert "served 28 micro-batches" in result.stdout + result.stderr
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    latent = [r["latent_2"] + r["latent_3"] for r in rows]
    assert len(rows) == 14 and sum(latent[-4:]) < 0.8 * sum(latent[:4])
    assert (run_dir / "checkpoints" / "latest").is_file()


def test_teacher_ranks_need_a_trainer_one_line_error(token_data, teacher_dir, tmp_path):
    result = run_cli("train", "--nproc", "1", "--run-dir", str(tmp_path / "r"), f"data.path={token_data}",
                     "model.preset=tiny", "model.mtp_k=3", "train.seq_len=32",
                     "--lse-target", f"checkpoint:{teacher_dir}", "--teacher-ranks", "1")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: teacher.ranks=1 leaves no trainer among the launch's 1 rank(s)"
    result = run_cli("train", "--run-dir", str(tmp_path / "r"), f"data.path={token_data}", "model.mtp_k=3",
                     "train.seq_len=32", f"teacher.source=checkpoint:{tmp_path}")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "is not an exported ds-mtp model" in result.stderr
    assert not (tmp_path / "r").exists()  # nothing written for a run that cannot start


# ---- sentence encoder: a tiny sentence-transformers directory made here (no download)


@pytest.fixture(scope="module")
def tiny_sentence_encoder(tmp_path_factory) -> Path:
    pytest.importorskip("sentence_transformers")
    from sentence_transformers import SentenceTransformer
    from transformers import BertConfig, BertModel, BertTokenizer

    root = tmp_path_factory.mktemp("encoder")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"t{i}" for i in range(64)]
    (root / "vocab.txt").write_text("\n".join(words) + "\n")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(words), hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=48, max_position_embeddings=64)).save_pretrained(root / "hf")
    BertTokenizer(str(root / "vocab.txt"), do_lower_case=False).save_pretrained(root / "hf")
    try:
        from sentence_transformers.sentence_transformer import modules as models
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers import models
    encoder = SentenceTransformer(modules=[models.Transformer(str(root / "hf"), max_seq_length=32),
                                           models.Pooling(24, "mean"), models.Normalize()])
    encoder.save(str(root / "st"))
    return root / "st"


def test_sentence_teacher_embeds_the_decoded_future_window(tmp_path, tiny_sentence_encoder):
    from sentence_transformers import SentenceTransformer

    from ds_mtp.teacher import SentenceTeacher, check_teacher

    data = make_token_data(tmp_path / "plain")
    overrides = ["model.preset=tiny", "model.d_model=32", "model.mtp_k=3", "train.seq_len=16",
                 f"teacher.source=sentence:{tiny_sentence_encoder}", "teacher.stride=4"]
    cfg = resolve_data(load_config(None, [f"data.path={data}", *overrides]))
    with pytest.raises(UserError, match="no extra.vocab"):
        check_teacher(cfg, read_meta(data))
    docs = [torch.arange(s, s + 20).remainder(60).tolist() + [61] for s in range(0, 60, 7)]
    vocab = [f"t{i}" for i in range(64)]
    write_documents(tmp_path / "worded", {"train": docs}, vocab_size=64, special_ids={"pad": 62, "eos": 61},
                    extra={"vocab": vocab})
    cfg = resolve_data(load_config(None, [f"data.path={tmp_path / 'worded'}", *overrides]))
    meta = read_meta(tmp_path / "worded")
    check_teacher(cfg, meta)
    teacher = SentenceTeacher(cfg, "cpu", meta)
    tokens = torch.tensor([docs[0][:16], docs[1][:16]])
    states = teacher.states(tokens)  # [2, 16, 32]
    mask = SentenceTeacher.position_mask(cfg, 2)
    # the encoder's own width 24 (the student, d=32, learns the projection to it)
    assert states.shape == (2, 16, 24) and mask[0].tolist() == [t % 4 == 0 for t in range(16)]
    assert fill_latent_width(cfg, meta).model.latent_width == 24
    assert torch.all(states[~mask] == 0)
    assert torch.allclose(states[mask].norm(dim=-1), torch.full((8,), 24 ** 0.5), atol=1e-4)  # RMS 1
    encoder = SentenceTransformer(str(tiny_sentence_encoder), device="cpu")
    text = " ".join(vocab[i] for i in docs[1][5:8])  # x_{t+1..t+K} at t=4, K=3
    assert teacher.window_text(tokens[1].tolist(), 4) == text
    z = encoder.encode([text], convert_to_tensor=True, normalize_embeddings=True).float()
    assert torch.allclose(states[1, 4], (z * 24 ** 0.5 / z.norm())[0], atol=1e-5)
    targets, _ = LocalFeed(cfg, teacher, "cpu").targets(0, tokens)
    assert torch.equal(targets[:, 0], targets[:, 1])  # one anchor for every head at t
    broken = tmp_path / "broken"  # modules.json, but no model: one line before any rank starts
    broken.mkdir()
    (broken / "modules.json").write_text((tiny_sentence_encoder / "modules.json").read_text())
    with pytest.raises(UserError, match="teacher sentence encoder .*broken cannot be loaded"):
        fill_latent_width(resolve_data(load_config(None, [f"data.path={tmp_path / 'worded'}", *overrides[:-2],
                                                           f"teacher.source=sentence:{broken}"])), meta)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_a_teacher_that_never_starts_fails_the_rendezvous(token_data, teacher_dir, tmp_path):
    overrides = [f"data.path={token_data}", "model.preset=tiny", "model.d_model=32", "model.n_layer=1",
                 "model.mtp_k=3", "train.seq_len=32", "train.micro_batch=4",
                 f"teacher.source=checkpoint:{teacher_dir}", "teacher.ranks=1", "teacher.startup_timeout=2"]
    trainer, = _start_ranks(2, [str(tmp_path), "0:5", "0", *overrides], started=1)  # the teacher never starts
    _, err = trainer.communicate(timeout=120)
    assert trainer.returncode == 3
    last = err.strip().splitlines()[-1]  # (torch's C++ store may log a warning line before it)
    assert last.startswith("error: rank 0: trainer-teacher rendezvous on 127.0.0.1:"), err[-2000:]
    assert "failed within 2 s" in last


def _pids_with(*words: str) -> list[int]:
    """Processes whose command line holds every word (Linux /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0") if entry.name.isdigit() else []
        except OSError:
            continue
        if all(word.encode() in argv for word in words):
            pids.append(int(entry.name))
    return pids


@pytest.mark.multiprocess
@pytest.mark.slow
def test_killing_the_teacher_rank_stops_training_and_keeps_the_last_checkpoint(token_data, teacher_dir, tmp_path):
    from conftest import kill_session

    run_dir = tmp_path / "run"
    args = ["train", "--nproc", "3", "--run-dir", str(run_dir), f"data.path={token_data}", "model.preset=tiny",
            "model.d_model=32", "model.n_layer=1", "model.mtp_k=3", "train.seq_len=32", "train.micro_batch=4",
            "train.max_steps=100000", "train.save_every=3", "train.save_model=false",
            f"teacher.source=checkpoint:{teacher_dir}", "teacher.ranks=1", "teacher.timeout=5"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    launch = subprocess.Popen([sys.executable, "-m", "ds_mtp.cli", *args], cwd=REPO, env=env, text=True,
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              start_new_session=True)
    try:
        latest = run_dir / "checkpoints" / "latest"

        def latest_step() -> int:
            return int(latest.read_text().strip()[4:]) if latest.is_file() else 0

        deadline = time.monotonic() + 180
        while latest_step() < 6 and time.monotonic() < deadline and launch.poll() is None:
            time.sleep(0.1)
        teacher = _pids_with("--local_rank=2", str(run_dir))
        assert latest_step() >= 6 and len(teacher) == 1, launch.stderr.read()[-2000:]
        os.kill(teacher[0], signal.SIGKILL)
        killed = time.monotonic()
        _, err = launch.communicate(timeout=60)
        waited = time.monotonic() - killed
    finally:
        kill_session(launch)
    assert launch.returncode != 0 and waited < 5 + 30
    assert "error: teacher rank 2" in err, err[-2000:]
    # the checkpoints already written are whole: the run resumes from the last one
    last = latest_step()
    result = run_cli(*args[:5], "--resume", *args[5:-1], "teacher.timeout=60", f"train.stop_after={last + 1}",
                     env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"steps {last}->" in result.stdout and read_metrics(run_dir / "metrics.jsonl")[-1]["step"] == last + 1
