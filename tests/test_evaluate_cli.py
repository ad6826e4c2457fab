"""`ds-mtp world make`, `world check` and `eval` as a user runs them (in-process main())."""

import json
from pathlib import Path

import pytest

from ds_mtp.cli import main
from ds_mtp.config import ModelConfig
from ds_mtp.model import MTPModel, save_exported

MANHATTAN = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "manhattan"


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "world"
    assert main(["world", "make", "--world", "usg", "--dataset", "paper", "--out", str(out), "n=16", "k=2"]) == 0
    return out


def test_world_make_writes_a_world_and_refuses_to_overwrite_it(world_dir, capsys):
    assert (world_dir / "world.json").is_file() and (world_dir / "manifest.json").is_file()
    before = (world_dir / "world.json").read_bytes()
    assert main(["world", "make", "--world", "usg", "--out", str(world_dir), "n=12"]) == 2
    assert "already holds a world" in capsys.readouterr().err
    assert main(["world", "make", "--world", "usg", "--out", str(world_dir / "x"), "n=12", "nodes"]) == 2
    assert main(["world", "make", "--world", "usg", "--out", str(world_dir / "x"), "radius=3"]) == 2
    assert (world_dir / "world.json").read_bytes() == before


@pytest.mark.skipif(not (MANHATTAN / "edges.tsv").is_file(), reason="shared Manhattan data not present")
def test_world_check_classifies_vafa_samples(capsys):
    assert main(["world", "check", "--graph", str(MANHATTAN / "edges.tsv"), "--format", "vafa",
                 str(MANHATTAN / "samples-random.txt")]) == 0
    counts = {line.split()[0]: int(line.split()[1]) for line in capsys.readouterr().out.splitlines()}
    assert counts["total"] == 6400
    # a trained model's samples: mostly valid, some illegal turns and wrong ends, all well-formed
    assert 0.5 < counts["valid"] / 6400 < 1.0 and counts["illegal_turn"] > 0 and counts["wrong_end"] > 0
    assert counts["invalid_format"] == 0


def export_model(path, vocab_size, max_seq_len=24):
    model = MTPModel(ModelConfig(vocab_size=vocab_size, n_layer=1, n_head=2, d_model=16, max_seq_len=max_seq_len))
    return save_exported(model, model.state_dict(), path)


def test_eval_prints_a_table_and_writes_json(world_dir, tmp_path, capsys):
    from ds_mtp.experiments.worlds import load_world

    vocab = load_world(world_dir).vocab_size
    run_dir = tmp_path / "run"
    export_model(run_dir / "model", vocab)
    out = tmp_path / "res" / "eval.json"
    # a training run directory works as well as its model/ directory
    assert main(["eval", "--checkpoint", str(run_dir), "--world", str(world_dir), "--scale", "quick",
                 "--metrics", "paths,validity", "shortcuts", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| next_token_validity |" in printed and "| isp |" in printed
    results = json.loads(out.read_text())
    assert set(results["metrics"]) == {"paths", "validity", "shortcuts"} and results["max_len"] == 24
    before = out.read_bytes()
    wrong = export_model(tmp_path / "wrong", vocab + 1)
    assert main(["eval", "--model", str(wrong), "--world", str(world_dir), "--out", str(out)]) == 2
    assert "vocabulary" in capsys.readouterr().err
    assert main(["eval", "--model", str(run_dir), "--world", str(tmp_path), "--out", str(out)]) == 2
    assert main(["eval", "--model", str(run_dir), "--world", str(world_dir), "--metrics", "isp"]) == 2
    assert main(["eval", "--model", str(run_dir), "--world", str(world_dir), "--set", "path_pairs=many",
                 "--out", str(out)]) == 2
    assert "expected int" in capsys.readouterr().err
    assert main(["eval", "--model", str(run_dir), "--world", str(world_dir), "--set", "pairs=3"]) == 2
    assert out.read_bytes() == before  # failed runs leave earlier results alone
    assert main(["eval", "--model", str(run_dir), "--world", str(world_dir), "--scale", "quick", "--metrics", "detour",
                 "--set", "detour_probs=[0.2, 0.3]", "--set", "detour_trials=7", "--out", str(out)]) == 0
    detour = json.loads(out.read_text())["metrics"]["detour"]
    assert set(detour) == {"random_valid_p0.2", "random_valid_p0.3"} and detour["random_valid_p0.2"]["trials"] == 7
