"""Damaged files a user hands ds-mtp, and overrides placed after options: one line and exit 2, or accepted."""

import shutil

import pytest

from ds_mtp.cli import build_parser, main
from ds_mtp.errors import UserError


def _one_line(capsys, code, *needles):
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    for needle in needles:
        assert needle in err, err
    return err


def test_an_override_placed_after_an_option_is_accepted(tmp_path, capsys):
    args = build_parser().parse_args(["train", "train.lr=1e-3", "--run-dir", "R", "--nproc", "2",
                                      "train.max_steps=2", "train.lr=2e-3"])
    assert args.nproc == 2 and args.overrides == ["train.lr=1e-3", "train.max_steps=2", "train.lr=2e-3"]
    # The trailing override reaches the config: its error is the config's, not argparse's.
    code = main(["train", "--run-dir", str(tmp_path / "r"), "train.max_steps=2", "--nproc", "2", "model.preset=gpt5"])
    _one_line(capsys, code, "unknown model preset 'gpt5'")
    with pytest.raises(SystemExit):  # a stray word that is no override is still refused
        build_parser().parse_args(["train", "--run-dir", "R", "train.lr=1", "--nproc", "2", "stray"])


@pytest.fixture
def truncated_model(tmp_path, teacher_dir):
    model = shutil.copytree(teacher_dir, tmp_path / "model")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    return model


def test_a_truncated_safetensors_file_is_refused_by_every_loader(tmp_path, capsys, truncated_model, token_data):
    from ds_mtp.model import load_exported

    with pytest.raises(UserError, match="cannot be read as safetensors .* truncated"):
        load_exported(truncated_model)
    # ds-mtp eval
    world = tmp_path / "world"
    assert main(["world", "make", "--world", "usg", "--out", str(world), "n=16", "k=2"]) == 0
    capsys.readouterr()
    _one_line(capsys, main(["eval", "--model", str(truncated_model), "--world", str(world)]),
              "model.safetensors cannot be read as safetensors")
    # a checkpoint teacher: refused by the launching process, before any rank starts
    code = main(["train", "--run-dir", str(tmp_path / "run"), f"data.path={token_data}", "model.preset=tiny",
                 "model.mtp_k=3", f"teacher.source=checkpoint:{truncated_model}", "train.seq_len=32"])
    _one_line(capsys, code, "model.safetensors cannot be read as safetensors")
    assert not (tmp_path / "run").exists()


def test_a_corrupt_exported_config_is_refused(tmp_path, teacher_dir):
    from ds_mtp.model import load_exported

    model = shutil.copytree(teacher_dir, tmp_path / "model")
    (model / "config.json").write_text('{"model": {"vocab_size": 64,')
    with pytest.raises(UserError, match="is not an exported model's config"):
        load_exported(model)


def test_a_non_utf8_edges_file_is_refused_in_one_line(tmp_path, capsys):
    edges = tmp_path / "edges.tsv"
    edges.write_bytes(b"node\tdirection\tneighbor\n0\tN\t1\n1\tS\t\xff0\n")
    paths = tmp_path / "paths.txt"
    paths.write_text("0 1 N end\n")
    _one_line(capsys, main(["world", "check", "--graph", str(edges), str(paths)]),
              "edges.tsv:3: not UTF-8 text (byte 0xff")
    _one_line(capsys, main(["world", "make", "--world", f"edges:{edges}", "--out", str(tmp_path / "w")]),
              "edges.tsv:3: not UTF-8")
    edges.write_bytes(b"0\tN\t1\n1\tS\t0\n")
    paths.write_bytes(b"0 1 N end\n\xc3\x28\n")
    _one_line(capsys, main(["world", "check", "--graph", str(edges), str(paths)]), "paths.txt:2: not UTF-8")
