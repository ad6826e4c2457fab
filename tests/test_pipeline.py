import json

import pytest
import torch

from ds_mtp.cli import main
from ds_mtp.config import load_config
from ds_mtp.data import TokenShards, WindowSampler, read_meta
from ds_mtp.engine import lr_lambda, param_groups
from ds_mtp.model import MTPModel, load_exported
from ds_mtp.monitor import read_metrics
from ds_mtp.objective import pack_terms
from ds_mtp.errors import UserError
from ds_mtp.pipeline import LayerSource, PipelineLoss, layer_names, layer_specs, partition
from ds_mtp.run_data import resolve_data
from tests.conftest import run_cli

TINY = ["model.preset=tiny", "train.seq_len=16", "train.micro_batch=4", "train.warmup_steps=1", "train.lr=3e-3"]
TERMS = ("loss", "ce_", "latent_", "semantic_")


def _config(token_data, overrides):
    return resolve_data(load_config(None, [f"data.path={token_data}", *TINY, *overrides]))


def _run_layers(specs, inputs):
    """What PipelineModule does across its stages, in one process: tied specs share one module."""
    from deepspeed.pipe import TiedLayerSpec

    tied, x = {}, inputs
    for spec in specs:
        if isinstance(spec, TiedLayerSpec):
            module = tied.setdefault(spec.key, spec.build())
            x = spec.forward_fn(module, x) if spec.forward_fn else module(x)
        else:
            x = spec.build()(x)
    return x, tied


@pytest.mark.parametrize("head_type, tied", [("linear", True), ("block", False), ("sequential", True),
                                             ("sequential", False)])
def test_pipeline_layers_compute_the_models_loss_and_gradients(token_data, head_type, tied):
    cfg = _config(token_data, ["model.mtp_k=3", f"model.head_type={head_type}", f"model.tie_embeddings={tied}"])
    pad_id = read_meta(token_data).special_ids["pad"]
    torch.manual_seed(0)
    model = MTPModel(cfg.model, cfg.objective, pad_id)
    batch = WindowSampler(TokenShards(token_data, "train"), 16, 4).batch(0)

    reference = model(batch.tokens, batch.doc_ids)
    reference["loss"].backward()
    expected_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    loss_fn = PipelineLoss(cfg, pad_id)
    outputs, _ = _run_layers(layer_specs(LayerSource(model), cfg.model.n_layer), (batch.tokens, batch.doc_ids))
    loss = loss_fn(outputs, (batch.tokens, batch.doc_ids))
    loss.backward()
    torch.testing.assert_close(loss_fn.terms[0], pack_terms(reference))
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected_grads[name], msg=name)


@pytest.mark.parametrize("latent_width, masked", [(0, False), (24, True)])
def test_pipeline_layers_with_a_teachers_targets_compute_the_models_loss_and_gradients(token_data, latent_width,
                                                                                       masked):
    """A teacher's targets (and stride mask) in the labels; of another width, through the heads' projection."""
    from ds_mtp.teacher import head_targets

    cfg = _config(token_data, ["model.mtp_k=3", f"model.latent_width={latent_width}",
                               "teacher.source=checkpoint:x", "objective.lambda_latent=0.7"])
    pad_id = read_meta(token_data).special_ids["pad"]
    torch.manual_seed(0)
    model = MTPModel(cfg.model, cfg.objective, pad_id)
    batch = WindowSampler(TokenShards(token_data, "train"), 16, 4).batch(0)
    targets = head_targets(torch.randn(4, 16, latent_width or cfg.model.d_model), 3, shifted=True)
    mask = (torch.arange(16) % 3 == 0).expand(4, 16) if masked else None

    reference = model(batch.tokens, batch.doc_ids, targets, mask)
    reference["loss"].backward()
    expected_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    assert (latent_width == 0) == ("heads.latent_projection.weight" not in expected_grads)

    loss_fn = PipelineLoss(cfg, pad_id)
    outputs, _ = _run_layers(layer_specs(LayerSource(model), cfg.model.n_layer), (batch.tokens, batch.doc_ids))
    labels = (batch.tokens, batch.doc_ids, targets) + ((mask,) if masked else ())
    loss_fn(outputs, labels).backward()
    torch.testing.assert_close(loss_fn.terms[0], pack_terms(reference))
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected_grads[name], msg=name)
    self_anchored = model(batch.tokens, batch.doc_ids)["latent"][0]
    assert not torch.allclose(self_anchored, reference["latent"][0])  # the targets did count


def test_layer_files_map_back_to_the_models_state_dict(token_data):
    cfg = _config(token_data, ["model.mtp_k=2", "model.tie_embeddings=false"])
    model = MTPModel(cfg.model, cfg.objective)
    specs = layer_specs(LayerSource(model), cfg.model.n_layer)
    mapped = {}
    for index, (layer_prefix, model_prefix) in layer_names(cfg.model.n_layer).items():
        for key, value in specs[index].build().state_dict().items():
            assert key.startswith(layer_prefix)
            mapped[model_prefix + key[len(layer_prefix):]] = value
    assert mapped.keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert mapped[key] is value or torch.equal(mapped[key], value)


@pytest.mark.parametrize("tied", [True, False])
def test_pipeline_layers_decay_what_the_model_decays(token_data, tied):
    """The pipeline's layers (EmbeddingPipe tied through TiedLayerSpec, BlockPipe, HeadsPipe) are grouped by
    the same rule as MTPModel: no decay on the token or position embedding, tied or not, nor the unembedding."""
    cfg = _config(token_data, ["model.mtp_k=3", "model.positions=learned", f"model.tie_embeddings={tied}"])
    model = MTPModel(cfg.model, cfg.objective)
    inputs = (torch.zeros(1, 4).long(), torch.zeros(1, 4).long())  # tokens, doc_ids
    _, tied_modules = _run_layers(layer_specs(LayerSource(model), cfg.model.n_layer), inputs)
    specs = layer_specs(LayerSource(model), cfg.model.n_layer)
    layers = torch.nn.ModuleList(tied_modules["embed"] if spec.__class__.__name__ == "TiedLayerSpec" else spec.build()
                                 for spec in specs)
    pipe_decay, pipe_no_decay = param_groups(layers, 0.1)
    decay, no_decay = param_groups(model, 0.1)
    assert {id(p) for p in pipe_decay["params"]} == {id(p) for p in decay["params"]}
    assert {id(p) for p in pipe_no_decay["params"]} == {id(p) for p in no_decay["params"]}
    undecayed = {id(p) for p in no_decay["params"]}
    assert id(model.embed.wte.weight) in undecayed and id(model.embed.wpe.weight) in undecayed
    assert all(id(w.weight) not in undecayed for w in model.heads.transitions)


def test_heads_stay_on_the_stage_of_the_embedding_copy(token_data):
    cfg = _config(token_data, ["model.mtp_k=3", "model.n_layer=1"])
    specs = layer_specs(LayerSource(MTPModel(cfg.model, cfg.objective)), 1)
    assert partition(specs, 2) == [0, 2, 4]
    for stages in (3, 4):  # stage 0 would hold only the embedding (3 stages hung in their first step)
        with pytest.raises(UserError, match=r"leaves a stage with only the embedding, or the heads apart from the "
                                            r"embedding copy they read; use fewer stages \(at most 2\)"):
            partition(specs, stages)


def test_zero_stage_defaults_to_one_with_a_pipeline_and_three_without():
    assert load_config(None, ["train.pipeline_stages=2"]).train.zero_stage == 1
    assert load_config(None, []).train.zero_stage == 3
    assert load_config(None, ["train.pipeline_stages=2", "train.zero_stage=0"]).train.zero_stage == 0


@pytest.mark.parametrize("overrides, message", [
    (["train.pipeline_stages=2", "train.zero_stage=3"],
     "DeepSpeed does not combine pipeline parallelism with ZeRO-2/3; the supported layouts are a pipeline with "
     "ZeRO-1"),
    (["train.pipeline_stages=4", "train.zero_stage=2"], "ZeRO-3 without one (train.pipeline_stages=1)"),
    (["train.activation_checkpointing=true"], "activation_checkpointing applies to pipeline runs"),
    (["train.pipeline_stages=2"], "train.pipeline_stages=2 needs a multiple of 2 trainer ranks, got 1"),
    (["--pipeline-stages", "2", "--nproc", "3"], "needs a multiple of 2 trainer ranks, got 3 (ranks = pipeline"),
    (["train.pipeline_stages=8", "--nproc", "8"], "exceeds the model's 4 pipeline units"),
])
def test_bad_pipeline_layouts_are_refused_in_one_line(tmp_path, token_data, capsys, overrides, message):
    code = main(["train", "--run-dir", str(tmp_path / "run"), f"data.path={token_data}", *TINY, *overrides])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1 and err.startswith("error: ")
    assert not (tmp_path / "run").exists()


def test_teacher_ranks_are_set_aside_before_the_pipeline_is_formed(tmp_path, token_data, capsys):
    code = main(["train", "--run-dir", str(tmp_path / "run"), "--nproc", "4", "--pipeline-stages", "2",
                 "--teacher-ranks", "1", "--lse-target", f"checkpoint:{tmp_path}", f"data.path={token_data}", *TINY,
                 "model.mtp_k=2"])
    err = capsys.readouterr().err
    assert code == 2 and err == ("error: train.pipeline_stages=2 needs a multiple of 2 trainer ranks, got 3 (4 ranks "
                                 "less 1 teacher rank(s)) (ranks = pipeline stages x data-parallel replicas)\n")
    assert not (tmp_path / "run").exists()


def reference_run(cfg, token_data, steps, teacher=None):
    """The same schedule as ds-mtp train, in plain PyTorch on one MTPModel: per-step metrics rows. With
    ``teacher`` (an exported model), anchored to its final states as a checkpoint: teacher anchors them."""
    from ds_mtp.teacher import head_targets

    t = cfg.train
    pad_id = read_meta(token_data).special_ids["pad"]
    torch.manual_seed(t.seed)
    model = MTPModel(cfg.model, cfg.objective, pad_id)
    optimizer = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    sampler = WindowSampler(TokenShards(token_data, "train"), t.seq_len, t.micro_batch, seed=t.seed,
                            mode=cfg.data.sampling)
    K, rows = cfg.model.mtp_k, []
    for step in range(steps):
        sums = torch.zeros(1 + 3 * K, dtype=torch.float64)
        for micro in range(t.grad_accum):
            batch = sampler.batch(step * t.grad_accum + micro)
            targets = None if teacher is None else head_targets(teacher.hidden(batch.tokens, batch.doc_ids), K,
                                                                           shifted=True)
            out = model(batch.tokens, batch.doc_ids, targets)
            (out["loss"] / t.grad_accum).backward()
            terms = torch.stack([out["loss"], *out["ce"], *out["latent"], *out["semantic"]]).detach().double()
            sums[: terms.numel()] += terms
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        sums /= t.grad_accum
        row = {"loss": sums[0].item(), **{f"ce_{k}": sums[k].item() for k in range(1, K + 1)}}
        row.update({f"latent_{k}": sums[K + k - 1].item() for k in range(2, K + 1)})
        row.update({f"semantic_{k}": sums[2 * K + k - 2].item() for k in range(2, K + 1)})
        rows.append(row)
    return rows


def assert_rows_match(actual, expected, tol=1e-5):
    assert len(actual) == len(expected)
    for step, (a, e) in enumerate(zip(actual, expected), start=1):
        assert set(k for k in a if k.startswith(TERMS)) == set(e), f"step {step}"
        for key, value in e.items():
            assert a[key] == pytest.approx(value, rel=tol, abs=tol), f"step {step} {key}"


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_stage_pipeline_next_token_matches_single_process(tmp_path, token_data):
    overrides = ["model.mtp_k=1", "train.max_steps=5", "train.pipeline_stages=2"]
    r = run_cli("train", "--nproc", "2", "--pipeline-stages", "2", "--run-dir", str(tmp_path / "p2"),
                f"data.path={token_data}", *TINY, *overrides[:2], "train.save_model=false")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "pipeline of 2 stages x 1 data-parallel: stage 0: layers 0-" in r.stdout and "ZeRO-1" in r.stdout
    expected = reference_run(_config(token_data, overrides), token_data, 5)
    assert_rows_match(read_metrics(tmp_path / "p2" / "metrics.jsonl"), expected)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_stage_lse_mtp_matches_single_process_resumes_exactly_and_exports(tmp_path, token_data):
    """K=4 LSE-MTP, tied embeddings, two micro-batches per step: every per-head term of every step equals
    the single-process model's; a run stopped at step 2 and resumed logs the same steps; the model
    exported from the step-2 checkpoint gives the loss the pipeline computed at step 3."""
    full, resumed, exported = tmp_path / "full", tmp_path / "resumed", tmp_path / "exported"
    overrides = ["model.mtp_k=4", "train.max_steps=5", "train.grad_accum=2", "train.pipeline_stages=2"]
    args = [f"data.path={token_data}", *TINY, *overrides]
    r = run_cli("train", "--nproc", "2", "--run-dir", str(full), *args)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = read_metrics(full / "metrics.jsonl")
    cfg = _config(token_data, overrides)
    assert_rows_match(rows, reference_run(cfg, token_data, 5))

    r = run_cli("train", "--nproc", "2", "--run-dir", str(resumed), *args, "train.stop_after=2")
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli("train", "--nproc", "2", "--run-dir", str(resumed), "--resume", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    again = read_metrics(resumed / "metrics.jsonl")
    assert [(x["step"], x["loss"], x["ce_4"], x["semantic_3"]) for x in again] == \
        [(x["step"], x["loss"], x["ce_4"], x["semantic_3"]) for x in rows]

    r = run_cli("export", str(resumed), "--tag", "step2", "--out", str(exported))
    assert r.returncode == 0, r.stderr[-3000:]
    model = load_exported(exported)
    assert json.loads((exported / "config.json").read_text())["source"]["layout"] == "pipeline-2"
    sampler = WindowSampler(TokenShards(token_data, "train"), 16, 4, seed=cfg.train.seed)
    with torch.no_grad():
        step3 = [model(b.tokens, b.doc_ids)["loss"].item() for b in (sampler.batch(4), sampler.batch(5))]
    assert sum(step3) / 2 == pytest.approx(rows[2]["loss"], rel=1e-5)
    # The run's own model/ (exported at the end from the last checkpoint) is the step-5 model.
    final = load_exported(resumed / "model")
    assert not torch.equal(final.embed.weight, model.embed.weight)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_stages_and_a_teacher_rank_match_a_single_process_anchored_to_the_teacher(tmp_path, token_data,
                                                                                      teacher_dir):
    """3 ranks: 2 pipeline stages train, 1 serves a width-32 checkpoint teacher to the last stage; the
    width-64 student learns the projection. Every term of every step equals plain PyTorch's."""
    from ds_mtp.teacher import fill_latent_width

    run = tmp_path / "run"
    overrides = ["model.mtp_k=3", "train.max_steps=4", "train.grad_accum=2", "train.pipeline_stages=2",
                 f"teacher.source=checkpoint:{teacher_dir}", "teacher.ranks=1", "objective.lambda_latent=1.0"]
    r = run_cli("train", "--nproc", "3", "--run-dir", str(run), f"data.path={token_data}", *TINY, *overrides,
                env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "pipeline of 2 stages x 1 data-parallel" in r.stdout and "2 rank(s)" in r.stdout
    assert "served 8 micro-batches" in r.stdout + r.stderr
    cfg = fill_latent_width(_config(token_data, overrides), read_meta(token_data))
    assert cfg.model.latent_width == 32
    rows = read_metrics(run / "metrics.jsonl")
    assert_rows_match(rows, reference_run(cfg, token_data, 4, teacher=load_exported(teacher_dir)))
    assert all(row["teacher_wait_s"] >= 0 for row in rows)
    exported = load_exported(run / "model")
    assert exported.cfg.latent_width == 32 and exported.heads.latent_projection.weight.shape == (32, 64)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_stages_times_two_replicas(tmp_path, token_data):
    run = tmp_path / "p2d2"
    # Untied embeddings (the last stage reads its copy only through sg(E)), sequential heads (which embed
    # tokens on the last stage) and learned positions (a second table in the tied module).
    r = run_cli("train", "--nproc", "4", "--run-dir", str(run), f"data.path={token_data}", *TINY, "model.mtp_k=2",
                "model.tie_embeddings=false", "model.head_type=sequential", "model.positions=learned",
                "train.max_steps=3", "train.pipeline_stages=2", "train.activation_checkpointing=true",
                "train.save_model=false")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "pipeline of 2 stages x 2 data-parallel" in r.stdout and "128 tokens/step" in r.stdout
    rows = read_metrics(run / "metrics.jsonl")
    assert [row["step"] for row in rows] == [1, 2, 3] and all(row["ce_2"] > 0 for row in rows)

