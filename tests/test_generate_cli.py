"""ds-mtp generate from the command line: model directories, the run's tokenizer, prompts, streaming."""

import io
import json
from pathlib import Path

import pytest
import torch

from data_prep.stdlib_corpus import write_stdlib_corpus
from data_prep.shard import shard_corpus
from data_prep.tokenizer import train_tokenizer
from ds_mtp.cli import main as ds_main
from ds_mtp.config import ModelConfig
from ds_mtp.generate import generate
from ds_mtp.model import MTPModel, save_exported
from ds_mtp.text import generate_text
from ds_mtp.tokenizers import SentencePieceText, find_tokenizer

quiet = dict(log=lambda *a: None)


@pytest.fixture(scope="module")
def text_run(tmp_path_factory) -> dict:
    """A SentencePiece data directory and a (random) model exported with data.path pointing at it."""
    root = tmp_path_factory.mktemp("text")
    corpus = root / "corpus.jsonl"
    write_stdlib_corpus(corpus, max_docs=60, **quiet)
    train_tokenizer([str(corpus)], root / "tok", vocab_size=500, sample_docs=60, threads=1, **quiet)
    shard_corpus([str(corpus)], root / "tok", root / "data", progress=False, **quiet)
    torch.manual_seed(0)
    model = MTPModel(ModelConfig(vocab_size=500, n_layer=2, n_head=2, d_model=32, max_seq_len=64, mtp_k=3,
                                 head_type="sequential", init_std=0.3)).eval()
    out = save_exported(model, model.state_dict(), root / "run" / "model",
                        extra={"data": {"path": str(root / "data")}})
    (root / "run" / "config.json").write_text("{}")  # a training run directory has its own config
    return {"root": root, "model_dir": out, "model": model, "tok": SentencePieceText(root / "tok" / "tokenizer.model")}


def test_the_tokenizer_is_the_runs_found_through_data_path(text_run, tmp_path, monkeypatch):
    config = json.loads((text_run["model_dir"] / "config.json").read_text())
    tok = find_tokenizer(text_run["model_dir"], config)
    assert tok.path == text_run["root"] / "data" / "tokenizer.model"
    # A relative data.path is looked up from the model directory's ancestors too (the run moved).
    relative = {**config, "data": {"path": "data"}}
    monkeypatch.chdir(tmp_path)
    assert find_tokenizer(text_run["model_dir"], relative).path == text_run["root"] / "data" / "tokenizer.model"


def test_a_changed_tokenizer_is_refused(text_run, tmp_path):
    import shutil

    from ds_mtp.errors import UserError

    data = tmp_path / "data"
    shutil.copytree(text_run["root"] / "data", data)
    train_tokenizer([str(text_run["root"] / "corpus.jsonl")], tmp_path / "other", vocab_size=480, sample_docs=60,
                    threads=1, **quiet)
    shutil.copyfile(tmp_path / "other" / "tokenizer.model", data / "tokenizer.model")
    with pytest.raises(UserError, match="sha256"):
        find_tokenizer(text_run["model_dir"], {"data": {"path": str(data)}})


def expected_texts(text_run, prompts, n=12):
    tok = text_run["tok"]
    out = generate(text_run["model"], [tok.encode(p) for p in prompts], n, eos_id=tok.eos_id).tokens
    return [tok.decode(ids) for ids in out]


def test_prompts_from_the_option_a_file_and_stdin(text_run, tmp_path, capsys, monkeypatch):
    prompts = ["Return the value", "def f(x):"]
    expected = "".join(t + "\n" for t in expected_texts(text_run, prompts))
    model = str(text_run["model_dir"])
    assert ds_main(["generate", "--model", model, "--prompt", prompts[0], "--prompt", prompts[1],
                    "--max-new-tokens", "12"]) == 0
    assert capsys.readouterr().out == expected
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n\n")
    assert ds_main(["generate", "--model", model, "--prompts", str(tmp_path / "prompts.txt"),
                    "--max-new-tokens", "12", "--batch-size", "2"]) == 0
    assert capsys.readouterr().out == expected
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(prompts)))
    assert ds_main(["generate", "--model", str(text_run["model_dir"].parent), "--max-new-tokens", "12",
                    "--speculative", "--stats"]) == 0
    captured = capsys.readouterr()
    assert captured.out == expected
    assert "tokens per forward pass" in captured.err and "drafts accepted" in captured.err


def test_output_streams_token_by_token_in_prompt_order(text_run):
    prompts = ["Return the value", "def f(x):", "The"]
    chunks = []
    generate_text(text_run["model"], text_run["tok"], prompts, batch_size=1, write=chunks.append, max_new_tokens=12)
    assert "".join(chunks) == "".join(t + "\n" for t in expected_texts(text_run, prompts))
    assert len(chunks) > 2 * len(prompts)  # more than one piece per completion
    batched = []
    generate_text(text_run["model"], text_run["tok"], prompts, batch_size=3, write=batched.append,
                  max_new_tokens=12)
    assert "".join(batched) == "".join(chunks)


@pytest.mark.parametrize("args, message", [
    (["--prompt", "x", "--temperature", "-1"], "--temperature"),
    (["--prompt", "x", "--top-p", "2"], "--top-p"),
    (["--prompt", "x", "--batch-size", "0"], "--batch-size"),
    (["--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["--prompts", "/nonexistent/prompts.txt"], "cannot read prompts"),
])
def test_bad_input_is_one_line_and_exit_2(text_run, capsys, args, message):
    assert ds_main(["generate", "--model", str(text_run["model_dir"]), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_a_missing_model_or_tokenizer_is_one_line_and_exit_2(text_run, tmp_path, capsys):
    assert ds_main(["generate", "--model", str(tmp_path / "none"), "--prompt", "x"]) == 2
    assert "not found" in capsys.readouterr().err
    model = MTPModel(ModelConfig(vocab_size=500, n_layer=1, n_head=2, d_model=16, max_seq_len=16, mtp_k=2))
    lost = save_exported(model, model.state_dict(), tmp_path / "lost", extra={"data": {"path": "gone/data"}})
    assert ds_main(["generate", "--model", str(lost), "--prompt", "x"]) == 2
    assert "--tokenizer" in capsys.readouterr().err
    assert ds_main(["generate", "--model", str(lost), "--prompt", "Return", "--max-new-tokens", "3",
                    "--tokenizer", str(text_run["root"] / "tok")]) == 0
    ntp = MTPModel(ModelConfig(vocab_size=500, n_layer=1, n_head=2, d_model=16, max_seq_len=16, mtp_k=1))
    ntp_dir = save_exported(ntp, ntp.state_dict(), tmp_path / "ntp",
                            extra={"data": {"path": str(text_run["root"] / "data")}})
    capsys.readouterr()
    assert ds_main(["generate", "--model", str(ntp_dir), "--prompt", "Return", "--speculative"]) == 2
    assert "has none" in capsys.readouterr().err


def test_a_world_model_reads_and_writes_the_worlds_vocabulary(tmp_path, capsys):
    from ds_mtp.experiments.worlds import load_world, make_world

    world_dir = make_world("usg", "paper", tmp_path / "world", n=12, num_pairs=40)
    world = load_world(world_dir)
    torch.manual_seed(0)
    model = MTPModel(ModelConfig(vocab_size=world.vocab_size, n_layer=1, n_head=2, d_model=16, max_seq_len=24,
                                 mtp_k=2, positions="learned", norm="layernorm", mlp="gelu_tanh"))
    out = save_exported(model, model.state_dict(), tmp_path / "model", extra={"data": {"path": str(world_dir)}})
    assert ds_main(["generate", "--model", str(out), "--prompt", "3 7", "--max-new-tokens", "5"]) == 0
    words = capsys.readouterr().out.split()
    ids = generate(model.eval(), [[3, 7]], 5, eos_id=world.tokenizer.eos_id).tokens[0]
    assert words == [world.tokenizer.vocab[i] for i in ids]
    assert ds_main(["generate", "--model", str(out), "--prompt", "3 nowhere"]) == 2
    assert "not in the world's vocabulary" in capsys.readouterr().err


def test_the_command_as_a_user_runs_it(text_run):
    from tests.conftest import run_cli

    model = str(text_run["model_dir"])
    done = run_cli("generate", "--model", model, "--prompt", "Return the value", "--max-new-tokens", "12",
                   "--speculative", timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == expected_texts(text_run, ["Return the value"])[0] + "\n"
    empty = run_cli("generate", "--model", model, timeout=120)  # stdin is empty: no prompt
    assert empty.returncode == 2 and empty.stderr.strip().splitlines() == [
        "error: no prompt given (--prompt TEXT, --prompts FILE, or lines on stdin)"]
