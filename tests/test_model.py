import pytest
import torch

from ds_mtp.config import PRESETS, ModelConfig, ObjectiveConfig, load_config
from ds_mtp.engine import param_groups
from ds_mtp.errors import UserError
from ds_mtp.model import AttentionLayout, MTPModel, count_parameters, load_exported, save_exported


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=32, n_layer=2, n_head=2, d_model=32, max_seq_len=16, mtp_k=3)
    return ModelConfig(**{**base, **kw})


VARIANTS = [dict(), dict(positions="learned", norm="layernorm", mlp="gelu", tie_embeddings=False, bias=True)]


@pytest.mark.parametrize("head_type", ["linear", "block", "sequential"])
def test_each_head_type_learns(head_type):
    torch.manual_seed(0)
    model = MTPModel(tiny(head_type=head_type), ObjectiveConfig())
    # Counting sequences: every head's target is predictable from the current token.
    start = torch.randint(0, 32, (16, 1))
    tokens = (start + torch.arange(16)) % 32
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        out = model(tokens)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert losses[-1] < 0.7 * losses[0], losses
    assert len(out["ce"]) == 3 and len(out["latent"]) == 2 and len(out["semantic"]) == 2


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("head_type", ["linear", "block", "sequential"])
def test_causal(head_type, variant):
    torch.manual_seed(0)
    model = MTPModel(tiny(head_type=head_type, **variant)).eval()
    tokens = torch.randint(0, 32, (2, 12))
    changed = tokens.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % 32
    a, b = model.head_logits(tokens), model.head_logits(changed)
    assert a.shape == (2, 3, 12, 32)
    if head_type == "sequential":
        # Depth k reads x_{t+k-1}: position t of head k sees tokens up to t+k-1 < 8.
        for k in range(3):
            torch.testing.assert_close(a[:, k, : 8 - k], b[:, k, : 8 - k])
    else:
        torch.testing.assert_close(a[:, :, :8], b[:, :, :8])
    assert not torch.allclose(a[:, 0, 8:], b[:, 0, 8:])


def test_layers_are_the_model_in_order():
    model = MTPModel(tiny())
    layers = model.layers()
    assert layers[0] is model.embed and layers[-1] is model.heads and len(layers) == 2 + model.cfg.n_layer
    tokens = torch.randint(0, 32, (2, 10))
    layout = AttentionLayout.causal()
    x = tokens
    with torch.no_grad():
        for layer in layers[:-1]:
            x = layer(x, layout)
        h, head_hidden = layers[-1](x, layout, tokens, model.embed.weight)
    expected_h, expected_heads = model.states(tokens)
    torch.testing.assert_close(h, expected_h)
    torch.testing.assert_close(head_hidden, expected_heads)
    assert head_hidden.shape == (2, 2, 10, 32)


def test_linear_heads_start_normal_like_the_papers_code_or_at_identity_by_name():
    torch.manual_seed(0)
    model = MTPModel(tiny(d_model=128, mtp_k=4))
    for w in model.heads.transitions:  # the paper's code: nn.Linear initialised N(0, 0.02)
        assert w.weight.mean().abs() < 0.002 and w.weight.std().item() == pytest.approx(0.02, rel=0.05)
    identity = MTPModel(tiny(transition_init="identity"))
    tokens = torch.randint(0, 32, (2, 10))
    h, head_hidden = identity.states(tokens)
    torch.testing.assert_close(head_hidden[:, 0], h)
    with pytest.raises(UserError, match="model.transition_init must be one of normal, identity"):
        load_config(None, ["model.transition_init=eye"])


@pytest.mark.parametrize("tied", [True, False])
def test_weight_decay_follows_the_papers_code(tied):
    """The paper's code (model.py, configure_optimizers) decays only nn.Linear weights and takes its lm_head
    out; run on its GPT (tied), its groups are: decayed = aux_heads.*, c_attn, c_proj, c_fc; not decayed =
    ln_*, ln_f, wpe and wte (the tied embedding)."""
    model = MTPModel(tiny(positions="learned", norm="layernorm", bias=True, tie_embeddings=tied))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert decayed == {n for n, p in model.named_parameters()
                       if n.endswith(".weight") and p.dim() == 2 and not n.startswith("embed.")
                       and n != "heads.unembed.weight"}
    assert {"heads.transitions.0.weight", "blocks.0.attn.qkv.weight", "blocks.1.mlp.down.weight"} <= decayed
    undecayed = {names[id(p)] for p in no_decay["params"]}
    assert {"embed.wte.weight", "embed.wpe.weight", "heads.norm.weight", "blocks.0.attn.qkv.bias"} <= undecayed
    assert ("heads.unembed.weight" in undecayed) == (not tied)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_gelu_tanh_is_the_papers_approximation_and_gelu_stays_exact():
    x = torch.linspace(-4, 4, 81)[:, None].repeat(1, 32)
    exact, approx = (MTPModel(tiny(mlp=mlp, bias=True)).blocks[0].mlp for mlp in ("gelu", "gelu_tanh"))
    approx.load_state_dict(exact.state_dict())
    up = exact.up(x)
    # the paper's code (model.py, new_gelu): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
    paper = 0.5 * up * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (up + 0.044715 * up ** 3)))
    torch.testing.assert_close(approx(x), approx.down(paper))
    torch.testing.assert_close(exact(x), exact.down(torch.nn.functional.gelu(up)))
    assert not torch.allclose(exact(x), approx(x))
    assert PRESETS["paper-graph"]["mlp"] == "gelu_tanh"


def test_paper_preset_size():
    cfg = ModelConfig(**{**PRESETS["paper-graph"], "vocab_size": 300, "mtp_k": 1})
    model = MTPModel(cfg)
    per_block = 12 * 120 * 120 + 2 * 120  # attention + GELU MLP, two LayerNorms without bias
    assert count_parameters(model) == 300 * 120 + 64 * 120 + 6 * per_block + 120


@pytest.mark.parametrize("variant", VARIANTS)
def test_export_round_trip(tmp_path, variant):
    torch.manual_seed(0)
    model = MTPModel(tiny(head_type="sequential", **variant), ObjectiveConfig(lambda_latent=0.5), pad_id=3)
    save_exported(model, model.state_dict(), tmp_path)
    loaded = load_exported(tmp_path)
    tokens = torch.randint(0, 32, (2, 12))
    torch.testing.assert_close(loaded.head_logits(tokens), model.eval().head_logits(tokens))
    assert loaded.pad_id == 3 and loaded.objective.lambda_latent == 0.5
