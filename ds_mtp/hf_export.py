"""A trained model in the Hugging Face layout: ``ds-mtp export SOURCE --format hf --out DIR``.

DIR loads offline with ``transformers.AutoModelForCausalLM`` and ``AutoTokenizer`` (and so in the tools
built on them: lm-eval-harness, vLLM). Two standard layouts hold ds-mtp's trunks exactly:

  Llama   positions=rope, norm=rmsnorm, mlp=swiglu (the tiny/small presets): qkv splits into q/k/v_proj,
          the SwiGLU up projection into gate_proj (its first half) and up_proj; ds-mtp's RoPE rotates the
          (x_i, x_{i+hd/2}) pairs as Llama's rotate_half does; model.bias → attention_bias and mlp_bias.
  GPT-2   positions=learned, norm=layernorm, mlp=gelu or gelu_tanh (the paper-graph preset): Conv1D
          weights are the transposed Linear weights; GPT-2 always has biases, so a model trained without
          them gets zero biases (and loading back refuses biases that became non-zero).

Any other combination is refused in one line. Head 1 is the causal LM; the K−1 extra heads (and the
latent projection) go to ``mtp_heads.safetensors`` under their ds-mtp names, and the ds-mtp config to
``ds_mtp_config.json``, so that ``load_hf_export`` rebuilds the whole MTPModel (``ds-mtp generate
--speculative`` reads DIR). The tokenizer is copied in: tokenizer.json for transformers, and the
SentencePiece ``tokenizer.model`` (or ``world_vocab.json``) for ds-mtp.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ds_mtp.errors import UserError

DS_CONFIG_NAME = "ds_mtp_config.json"
HEADS_NAME = "mtp_heads.safetensors"
TRUNK_HEAD_PARAMS = ("heads.norm.", "heads.unembed.")  # the parts of heads.* that the causal LM holds


@dataclass(frozen=True)
class Piece:
    """One Hugging Face tensor: part ``part`` of ``parts`` (chunks along dim 0) of ds-mtp tensor ``ds``,
    transposed when ``transpose``. ``ds`` None: a zero bias the layout needs and the model lacks."""

    hf: str
    ds: str | None
    part: int = 0
    parts: int = 1
    transpose: bool = False


def hf_layout(cfg) -> str:
    """"llama" or "gpt2" for a ModelConfig, or a one-line UserError naming what no standard layout holds."""
    if cfg.positions == "rope" and cfg.norm == "rmsnorm" and cfg.mlp == "swiglu":
        return "llama"
    if cfg.positions == "learned" and cfg.norm == "layernorm" and cfg.mlp in ("gelu", "gelu_tanh"):
        return "gpt2"
    raise UserError(f"no standard Hugging Face layout holds positions={cfg.positions}, norm={cfg.norm}, "
                    f"mlp={cfg.mlp} (Llama: rope + rmsnorm + swiglu; GPT-2: learned + layernorm + gelu/gelu_tanh)")


def pieces(cfg) -> list[Piece]:
    """Every tensor of the Hugging Face model and where it comes from: the one mapping both directions use."""
    layout, bias = hf_layout(cfg), cfg.bias
    out: list[Piece] = []

    def linear(hf: str, ds: str, part: int = 0, parts: int = 1, transpose: bool = False, needs_bias=False):
        out.append(Piece(f"{hf}.weight", f"{ds}.weight", part, parts, transpose))
        if bias or needs_bias:
            out.append(Piece(f"{hf}.bias", f"{ds}.bias" if bias else None, part, parts))

    if layout == "llama":
        out.append(Piece("model.embed_tokens.weight", "embed.wte.weight"))
        for i in range(cfg.n_layer):
            hf, ds = f"model.layers.{i}", f"blocks.{i}"
            for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
                linear(f"{hf}.self_attn.{name}", f"{ds}.attn.qkv", j, 3)
            linear(f"{hf}.self_attn.o_proj", f"{ds}.attn.proj")
            linear(f"{hf}.mlp.gate_proj", f"{ds}.mlp.up", 0, 2)
            linear(f"{hf}.mlp.up_proj", f"{ds}.mlp.up", 1, 2)
            linear(f"{hf}.mlp.down_proj", f"{ds}.mlp.down")
            out.append(Piece(f"{hf}.input_layernorm.weight", f"{ds}.norm1.weight"))
            out.append(Piece(f"{hf}.post_attention_layernorm.weight", f"{ds}.norm2.weight"))
        out.append(Piece("model.norm.weight", "heads.norm.weight"))
    else:
        out += [Piece("transformer.wte.weight", "embed.wte.weight"),
                Piece("transformer.wpe.weight", "embed.wpe.weight")]

        def norm(hf: str, ds: str):
            out.append(Piece(f"{hf}.weight", f"{ds}.weight"))
            out.append(Piece(f"{hf}.bias", f"{ds}.bias" if bias else None))

        for i in range(cfg.n_layer):
            hf, ds = f"transformer.h.{i}", f"blocks.{i}"
            norm(f"{hf}.ln_1", f"{ds}.norm1")
            linear(f"{hf}.attn.c_attn", f"{ds}.attn.qkv", transpose=True, needs_bias=True)
            linear(f"{hf}.attn.c_proj", f"{ds}.attn.proj", transpose=True, needs_bias=True)
            norm(f"{hf}.ln_2", f"{ds}.norm2")
            linear(f"{hf}.mlp.c_fc", f"{ds}.mlp.up", transpose=True, needs_bias=True)
            linear(f"{hf}.mlp.c_proj", f"{ds}.mlp.down", transpose=True, needs_bias=True)
        norm("transformer.ln_f", "heads.norm")
    out.append(Piece("lm_head.weight", "embed.wte.weight" if cfg.tie_embeddings else "heads.unembed.weight"))
    return out


def hf_config(cfg, special_ids: dict):
    """The transformers config object of a ds-mtp ModelConfig."""
    ids = {f"{name}_token_id": special_ids.get(name) for name in ("bos", "eos", "pad")}
    if hf_layout(cfg) == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ff_width,
                           num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
                           num_key_value_heads=cfg.n_head, head_dim=cfg.d_model // cfg.n_head, hidden_act="silu",
                           max_position_embeddings=cfg.max_seq_len, rms_norm_eps=1e-6,  # ds_mtp.model.RMSNorm
                           rope_theta=10000.0, tie_word_embeddings=cfg.tie_embeddings,  # ds_mtp.model.rope_tables
                           attention_bias=cfg.bias, mlp_bias=cfg.bias, attention_dropout=0.0, **ids)
    from transformers import GPT2Config

    return GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.max_seq_len, n_embd=cfg.d_model,
                      n_layer=cfg.n_layer, n_head=cfg.n_head, n_inner=cfg.ff_width,
                      activation_function="gelu_pytorch_tanh" if cfg.mlp == "gelu_tanh" else "gelu",
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5,  # nn.LayerNorm's
                      tie_word_embeddings=cfg.tie_embeddings, **ids)


def to_hf_tensors(cfg, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    tensors = {}
    for p in pieces(cfg):
        if p.ds is None:
            weight = tensors[p.hf.rsplit(".", 1)[0] + ".weight"]  # a norm's [d], or a Conv1D's [in, out]
            tensors[p.hf] = torch.zeros(weight.shape[-1], dtype=weight.dtype)
            continue
        t = state[p.ds].chunk(p.parts, dim=0)[p.part]
        tensors[p.hf] = (t.t() if p.transpose else t).contiguous().clone()
    return tensors


def from_hf_tensors(cfg, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ds-mtp state dict (trunk, final norm, unembedding) of Hugging Face tensors."""
    parts: dict[str, list] = {}
    for p in pieces(cfg):
        if p.hf not in tensors:
            if p.hf == "lm_head.weight" and cfg.tie_embeddings:
                continue  # tied: saved once, as the embedding
            raise UserError(f"the Hugging Face weights lack {p.hf}")
        t = tensors[p.hf]
        if p.ds is None:
            if t.abs().max() > 0:
                raise UserError(f"{p.hf} is not zero, but the ds-mtp model (model.bias=false) has no such bias")
            continue
        parts.setdefault(p.ds, [None] * p.parts)[p.part] = t.t() if p.transpose else t
    return {name: torch.cat(chunks, dim=0) if len(chunks) > 1 else chunks[0] for name, chunks in parts.items()}


def write_tokenizer(tokenizer, special_ids: dict, out_dir: Path) -> None:
    """tokenizer.json (+ config) for AutoTokenizer, and ds-mtp's own copy, from a ds_mtp.tokenizers tokenizer."""
    from transformers import PreTrainedTokenizerFast

    from ds_mtp.tokenizers import WORLD_VOCAB_NAME, SentencePieceText

    if isinstance(tokenizer, SentencePieceText):
        import importlib

        from tokenizers.models import BPE, Unigram

        convert = importlib.import_module("transformers.convert_slow_tokenizer")
        if not hasattr(convert.SpmConverter, "build_tokenizer_from_spm_proto"):
            raise UserError("--format hf needs transformers >= 5 to convert a SentencePiece tokenizer "
                            "(pip install 'ds-mtp[hf]')")
        extractor = convert.SentencePieceExtractor(str(tokenizer.path))
        model_type = BPE if extractor.proto.trainer_spec.model_type == 2 else Unigram
        vocab = extractor.extract(model_type)["vocab"]
        # Follows the SentencePiece model's own normaliser and pieces: encodes as SentencePieceProcessor does.
        backend = convert.SpmConverter.build_tokenizer_from_spm_proto(proto=extractor.proto, vocab=vocab)
        pieces_of = tokenizer.processor.id_to_piece
        names = {name: pieces_of(i) for name, i in special_ids.items() if i is not None}
        shutil.copyfile(tokenizer.path, out_dir / "tokenizer.model")
    else:
        from tokenizers import Tokenizer, decoders, pre_tokenizers
        from tokenizers.models import WordLevel

        vocab = {token: i for i, token in enumerate(tokenizer.vocab)}
        backend = Tokenizer(WordLevel(vocab, unk_token=None))
        backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins the words with spaces
        names = {name: tokenizer.vocab[i] for name, i in special_ids.items() if i is not None}
        (out_dir / WORLD_VOCAB_NAME).write_text(json.dumps({"vocab": tokenizer.vocab, "eos_id": tokenizer.eos_id}))
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, **{f"{n}_token": t for n, t in names.items()})
    fast.save_pretrained(str(out_dir))


def export_hf(source: str | Path, out_dir: str | Path, tag: str | None = None, overwrite: bool = False,
              tokenizer_path: str | None = None) -> Path:
    """Write the Hugging Face layout of ``source`` (an exported model directory, or a run directory whose
    checkpoint ``tag``, default the latest, is consolidated first) to ``out_dir``."""
    from ds_mtp.model import load_exported
    from ds_mtp.run_dir import resolve_model_dir
    from ds_mtp.tokenizers import find_tokenizer

    try:
        import transformers  # noqa: F401
    except ImportError:
        raise UserError("--format hf needs transformers: pip install 'ds-mtp[hf]'") from None
    source, out_dir = Path(source), Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise UserError(f"{out_dir} is not empty: choose another --out, or pass --overwrite")
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = resolve_model_dir(source)
        if tag is not None or not (model_dir / "model.safetensors").is_file():
            from ds_mtp.export import export_checkpoint

            model_dir = export_checkpoint(source, Path(scratch) / "model", tag=tag)
        model = load_exported(model_dir)
        config = json.loads((model_dir / "config.json").read_text())
    cfg = model.cfg
    layout = hf_layout(cfg)
    tokenizer = find_tokenizer(resolve_model_dir(source), config, tokenizer_path)
    special_ids = special_token_ids(tokenizer, model.pad_id)

    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one file of a small model: the bars are noise
    hf_model = AutoModelForCausalLM.from_config(hf_config(cfg, special_ids))
    state = model.state_dict()
    tensors = to_hf_tensors(cfg, state)
    missing, unexpected = hf_model.load_state_dict(tensors, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and cfg.tie_embeddings)]
    if missing or unexpected:  # the mapping must cover the transformers model exactly
        raise RuntimeError(f"Hugging Face mapping mismatch: missing {missing}, unexpected {unexpected}")
    if cfg.tie_embeddings:
        hf_model.tie_weights()
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    hf_model.save_pretrained(str(tmp))
    from safetensors.torch import save_file

    heads = {k: v.detach().float().contiguous().clone() for k, v in state.items()
             if k.startswith("heads.") and not k.startswith(TRUNK_HEAD_PARAMS)}
    if heads:
        save_file(heads, str(tmp / HEADS_NAME))
    (tmp / DS_CONFIG_NAME).write_text(json.dumps({**config, "hf_layout": layout}, indent=2) + "\n")
    write_tokenizer(tokenizer, special_ids, tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.replace(out_dir)
    return out_dir


def special_token_ids(tokenizer, pad_id: int | None) -> dict:
    from ds_mtp.tokenizers import SentencePieceText

    if isinstance(tokenizer, SentencePieceText):
        p = tokenizer.processor
        ids = {"bos": p.bos_id(), "eos": p.eos_id(), "pad": p.pad_id(), "unk": p.unk_id()}
        ids = {k: (v if v >= 0 else None) for k, v in ids.items()}
    else:
        ids = {"bos": None, "eos": tokenizer.eos_id, "pad": pad_id, "unk": None}
    if pad_id is not None:
        ids["pad"] = pad_id
    return ids


def load_hf_export(model_dir: str | Path, device: str | torch.device = "cpu"):
    """The MTPModel (every head) of a directory written by ``export_hf``; needs safetensors, not transformers."""
    from safetensors.torch import load_file

    from ds_mtp.config import ModelConfig, ObjectiveConfig
    from ds_mtp.model import MTPModel

    model_dir = Path(model_dir)
    config = json.loads((model_dir / DS_CONFIG_NAME).read_text())
    weights = sorted(model_dir.glob("model*.safetensors"))
    if not weights:
        raise UserError(f"{model_dir} has {DS_CONFIG_NAME} but no model.safetensors")
    tensors = {}
    for f in weights:
        tensors.update(load_file(str(f)))
    cfg = ModelConfig(**config["model"])
    state = from_hf_tensors(cfg, tensors)
    if (model_dir / HEADS_NAME).is_file():
        state.update(load_file(str(model_dir / HEADS_NAME)))
    model = MTPModel(cfg, ObjectiveConfig(**config["objective"]), config.get("pad_id"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"{model_dir} does not hold the model its {DS_CONFIG_NAME} describes (missing: "
                        f"{', '.join(missing) or '-'}; unexpected: {', '.join(unexpected) or '-'})")
    return model.to(device).eval()
