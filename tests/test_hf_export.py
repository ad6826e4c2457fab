"""ds-mtp export --format hf: transformers loads the directory offline and computes what ds-mtp computes."""

import json

import pytest
import torch

from ds_mtp.cli import main as ds_main
from ds_mtp.config import ModelConfig
from ds_mtp.generate import generate
from ds_mtp.model import MTPModel, save_exported

transformers = pytest.importorskip("transformers")

LAYOUTS = {
    "llama": dict(positions="rope", norm="rmsnorm", mlp="swiglu"),
    "llama-bias-untied": dict(positions="rope", norm="rmsnorm", mlp="swiglu", bias=True, tie_embeddings=False),
    "gpt2": dict(positions="learned", norm="layernorm", mlp="gelu_tanh"),  # the paper-graph preset: zero biases
    "gpt2-exact-gelu-bias-untied": dict(positions="learned", norm="layernorm", mlp="gelu", bias=True,
                                        tie_embeddings=False),
}


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
    from ds_mtp.experiments.worlds import make_world

    return make_world("usg", "paper", tmp_path_factory.mktemp("world") / "w", n=12, num_pairs=40)


def exported(tmp_path, world_dir, head_type="block", **kw):
    from ds_mtp.experiments.worlds import load_world

    vocab = load_world(world_dir).vocab_size
    torch.manual_seed(0)
    model = MTPModel(ModelConfig(vocab_size=vocab, n_layer=2, n_head=2, d_model=32, max_seq_len=32, mtp_k=3,
                                 head_type=head_type, init_std=0.2, **kw), pad_id=vocab - 1).eval()
    with torch.no_grad():  # non-trivial norms and biases, so that a wrong mapping shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    source = save_exported(model, model.state_dict(), tmp_path / "model", extra={"data": {"path": str(world_dir)}})
    return model, source


def load_hf(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(str(path), local_files_only=True))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_transformers_logits_and_greedy_generate_equal_ds_mtps(layout, tmp_path, world_dir):
    model, source = exported(tmp_path, world_dir, **LAYOUTS[layout])
    assert ds_main(["export", str(source), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    hf, tokenizer = load_hf(tmp_path / "hf")
    assert type(hf).__name__ == ("LlamaForCausalLM" if layout.startswith("llama") else "GPT2LMHeadModel")
    tokens = torch.randint(0, model.cfg.vocab_size, (3, 20))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, model.logits(tokens), atol=1e-4, rtol=0)
    prompt = tokenizer("3 7", return_tensors="pt").input_ids
    assert prompt.tolist() == [[3, 7]]
    with torch.no_grad():
        hf_out = hf.generate(prompt, max_new_tokens=10, do_sample=False, eos_token_id=None,
                             attention_mask=torch.ones_like(prompt))[0, 2:].tolist()
    assert hf_out == generate(model, [[3, 7]], 10).tokens[0]


@pytest.mark.parametrize("head_type", ["linear", "block", "sequential"])
def test_the_mtp_heads_come_back_for_speculative_decoding(head_type, tmp_path, world_dir, capsys):
    from ds_mtp.hf_export import load_hf_export

    model, source = exported(tmp_path, world_dir, head_type, **LAYOUTS["gpt2"])
    assert ds_main(["export", str(source), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    back = load_hf_export(tmp_path / "hf")
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 12))
    torch.testing.assert_close(back.head_logits(tokens), model.head_logits(tokens), atol=0, rtol=0)
    capsys.readouterr()
    for directory in (source, tmp_path / "hf"):
        assert ds_main(["generate", "--model", str(directory), "--prompt", "3 7", "--speculative",
                        "--max-new-tokens", "8"]) == 0
    first, second = capsys.readouterr().out.splitlines()
    assert first == second


def test_the_sentencepiece_tokenizer_encodes_as_the_run_does(tmp_path):
    from data_prep.stdlib_corpus import write_stdlib_corpus
    from data_prep.shard import shard_corpus
    from data_prep.tokenizer import train_tokenizer
    from ds_mtp.tokenizers import SentencePieceText

    quiet = dict(log=lambda *a: None)
    write_stdlib_corpus(tmp_path / "c.jsonl", max_docs=60, **quiet)
    train_tokenizer([str(tmp_path / "c.jsonl")], tmp_path / "tok", vocab_size=500, sample_docs=60, threads=1, **quiet)
    shard_corpus([str(tmp_path / "c.jsonl")], tmp_path / "tok", tmp_path / "data", progress=False, **quiet)
    model = MTPModel(ModelConfig(vocab_size=500, n_layer=1, n_head=2, d_model=16, max_seq_len=32, mtp_k=2))
    source = save_exported(model, model.state_dict(), tmp_path / "model",
                           extra={"data": {"path": str(tmp_path / "data")}})
    assert ds_main(["export", str(source), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    _, tokenizer = load_hf(tmp_path / "hf")
    ours = SentencePieceText(tmp_path / "tok" / "tokenizer.model")
    texts = [json.loads(line)["text"] for line in (tmp_path / "c.jsonl").read_text().splitlines()]
    texts += ["  two leading spaces,\ttabs\nand 12345 digits", "naïve café 😀"]
    for text in texts:
        ids = tokenizer(text).input_ids
        assert ids == ours.encode(text)
        assert tokenizer.decode(ids) == ours.decode(ids)
    assert tokenizer.eos_token_id == ours.eos_id and tokenizer.pad_token_id == 3
    assert (tmp_path / "hf" / "tokenizer.model").is_file()  # ds-mtp generate reads its own copy


@pytest.mark.parametrize("combination", [dict(positions="rope", norm="layernorm", mlp="swiglu"),
                                         dict(positions="learned", norm="rmsnorm", mlp="gelu"),
                                         dict(positions="rope", norm="rmsnorm", mlp="gelu")])
def test_a_combination_no_standard_layout_holds_is_refused_in_one_line(combination, tmp_path, world_dir, capsys):
    _, source = exported(tmp_path, world_dir, **combination)
    assert ds_main(["export", str(source), "--format", "hf", "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no standard Hugging Face layout holds") and err.count("\n") == 1
    assert not (tmp_path / "hf").exists() and not (tmp_path / "hf.tmp").exists()


def test_an_occupied_out_directory_is_kept(tmp_path, world_dir, capsys):
    _, source = exported(tmp_path, world_dir, **LAYOUTS["llama"])
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "notes.txt").write_text("mine")
    assert ds_main(["export", str(source), "--format", "hf", "--out", str(tmp_path / "hf")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "hf" / "notes.txt").read_text() == "mine"
