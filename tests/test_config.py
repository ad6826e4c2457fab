import pytest

from ds_mtp.config import PRESETS, load_config
from ds_mtp.errors import UserError


def test_preset_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  preset: paper-graph\n  mtp_k: 4\ntrain:\n  lr: 1e-3\n")
    cfg = load_config(path, ["model.n_layer=2", "train.max_steps=7", "objective.lambda_latent=0", "train.seq_len=32"])
    assert cfg.model.d_model == PRESETS["paper-graph"]["d_model"] and cfg.model.positions == "learned"
    assert cfg.model.n_layer == 2 and cfg.model.mtp_k == 4
    assert cfg.train.max_steps == 7 and cfg.train.lr == 1e-3 and cfg.objective.lambda_latent == 0.0


def test_json_config(tmp_path):
    path = tmp_path / "run.json"
    path.write_text('{"model": {"preset": "tiny", "head_type": "block", "mtp_k": 2}}')
    cfg = load_config(path)
    assert cfg.model.head_type == "block" and cfg.model.n_layer == PRESETS["tiny"]["n_layer"]


@pytest.mark.parametrize("overrides, message", [
    (["model.mtp_k=0"], "mtp_k must be at least 1"),
    (["model.mtp_k=128"], "must be smaller than train.seq_len"),
    (["objective.lambda_latent=-0.1"], "non-negative"),
    (["objective.lambda_semantic=-1"], "non-negative"),
    (["model.head_type=medusa"], "unknown head type 'medusa'"),
    (["model.preset=huge"], "unknown model preset 'huge'"),
    (["train.pipeline_stages=2", "train.zero_stage=3"], "DeepSpeed does not combine"),
    (["model.n_layers=3"], "unknown field in model: n_layers"),
    (["model.n_layer=three"], "model.n_layer must be int"),
    (["trainer.lr=1"], "unknown section"),
    (["train.lr"], "not of the form"),
    (["model.mlp=relu"], "model.mlp must be one of gelu, gelu_tanh, swiglu"),
    (["model.transition_init=zeros"], "model.transition_init must be one of normal, identity"),
    (["objective.mse_normalization=mean"], "objective.mse_normalization must be one of valid, official"),
])
def test_bad_config(overrides, message):
    with pytest.raises(UserError, match=message):
        load_config(None, overrides)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(UserError, match="cannot parse config"):
        load_config(bad)


@pytest.mark.parametrize("override", ["model.transition_init=eye", "objective.mse_normalization=sum",
                                      "model.mlp=gelu_erf"])
def test_bad_protocol_choices_exit_2_in_one_line(tmp_path, capsys, override):
    from ds_mtp.cli import main

    code = main(["train", "--run-dir", str(tmp_path / "run"), override])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and override.split("=")[0] in err


@pytest.mark.parametrize("override", ["objective.lambda_semantic=.nan", "train.lr=.inf", "train.grad_clip=-.inf",
                                      "train.lr=inf", "train.lr=nan", "objective.head_weights=[1.0,.nan]"])
def test_nan_and_inf_are_refused_in_one_line(tmp_path, capsys, override):
    from ds_mtp.cli import main

    overrides = [override, "model.mtp_k=2"] if "head_weights" in override else [override]
    code = main(["train", "--run-dir", str(tmp_path / "run"), *overrides])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "must be a finite number" in err, err
    assert override.split("=")[0] in err


def test_nan_in_a_json_config_file_is_refused(tmp_path):
    path = tmp_path / "run.json"
    path.write_text('{"objective": {"lambda_latent": NaN}}')
    with pytest.raises(UserError, match="objective.lambda_latent must be a finite number"):
        load_config(path)
