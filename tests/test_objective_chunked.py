"""The chunked (fused linear + cross-entropy) loss against the materialised one: values and gradients."""

import pytest
import torch

from ds_mtp.config import ModelConfig, ObjectiveConfig, load_config
from ds_mtp.errors import UserError
from ds_mtp.fused_ce import linear_cross_entropy, materialized_cross_entropy
from ds_mtp.model import MTPModel
from ds_mtp.objective import lse_mtp_loss
from tests.test_objective import random_inputs

RTOL = 1e-5


def leaf_inputs(dtype=torch.float32, **kw):
    hidden, head_hidden, tokens, unembed, embed, doc_ids = random_inputs(dtype=dtype, **kw)
    leaves = [t.clone().requires_grad_(True) for t in (hidden, head_hidden, unembed, embed)]
    return leaves, tokens, doc_ids


def loss_and_grads(impl, chunk_rows, leaves, tokens, doc_ids, **kw):
    hidden, head_hidden, unembed, embed = (t.detach().clone().requires_grad_(True) for t in leaves)
    out = lse_mtp_loss(hidden, head_hidden, tokens, unembed, embed, pad_id=10, doc_ids=doc_ids,
                       loss_impl=impl, chunk_rows=chunk_rows, **kw)
    out["loss"].backward()
    return out, [hidden.grad, head_hidden.grad, unembed.grad, embed.grad]


@pytest.mark.parametrize("chunk_rows", [1, 7, 64, 0])
@pytest.mark.parametrize("distance", ["mse", "cosine"])
def test_chunked_matches_materialized_fp32(chunk_rows, distance):
    leaves, tokens, doc_ids = leaf_inputs(B=4, T=16, d=12, V=37, K=4)
    kw = dict(lambda_latent=0.3, lambda_semantic=0.7, head_weights=[1.0, 0.5, 0.25, 2.0], distance=distance)
    want, want_grads = loss_and_grads("materialized", 0, leaves, tokens, doc_ids, **kw)
    got, got_grads = loss_and_grads("chunked", chunk_rows, leaves, tokens, doc_ids, **kw)
    torch.testing.assert_close(got["loss"], want["loss"], rtol=RTOL, atol=0)
    for key in ("ce", "latent", "semantic", "acc"):
        assert len(got[key]) == len(want[key])
        for a, b in zip(got[key], want[key]):
            torch.testing.assert_close(a, b.detach(), rtol=RTOL, atol=0)
    for name, a, b in zip(("hidden", "head_hidden", "unembed", "embed"), got_grads, want_grads):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, rtol=RTOL, atol=1e-7, msg=lambda m: f"grad of {name}: {m}")
    assert torch.count_nonzero(got_grads[2]) > 0


def test_gradient_scales_with_the_upstream_gradient():
    """backward multiplies the stored gradients by what flows in (loss scaling, 1/grad_accum, ...)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20, 6, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, 6, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 9, (20,), generator=g)
    scale = torch.rand(20, generator=g, dtype=torch.float64)
    (3.5 * linear_cross_entropy(x, w, y, scale, chunk_rows=6)[0]).backward()
    got = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    (3.5 * materialized_cross_entropy(x, w, y, scale)[0]).backward()
    torch.testing.assert_close(got[0], x.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got[1], w.grad, rtol=1e-10, atol=1e-12)


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 4, (5,), generator=g)
    scale = torch.rand(5, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: linear_cross_entropy(a, b, y, scale, chunk_rows=2)[0], (x, w))


def test_no_gradient_work_without_grad_and_empty_rows():
    x, w = torch.randn(8, 4, requires_grad=True), torch.randn(5, 4, requires_grad=True)
    y, s = torch.randint(0, 5, (8,)), torch.ones(8)
    with torch.no_grad():
        loss, rows, _ = linear_cross_entropy(x, w, y, s)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, materialized_cross_entropy(x, w, y, s)[0].detach())
    loss, rows, _ = linear_cross_entropy(x[:0], w, y[:0], s[:0])
    loss.backward()
    assert float(loss.detach()) == 0.0 and rows.shape == (0,) and torch.count_nonzero(w.grad) == 0


def test_stored_gradients_follow_retain_graph():
    """retain_graph keeps the forward-time gradients for another backward; without it they are freed."""
    x, w = torch.randn(8, 4, requires_grad=True), torch.randn(5, 4, requires_grad=True)
    loss, _, _ = linear_cross_entropy(x, w, torch.randint(0, 5, (8,)), torch.ones(8))
    loss.backward(retain_graph=True)
    first = w.grad.clone()
    loss.backward()
    torch.testing.assert_close(w.grad, 2 * first)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()


@pytest.mark.parametrize("head_type", ["linear", "block", "sequential"])
def test_model_parameter_gradients_match(head_type):
    """Whole model, tied embedding: every parameter's gradient agrees between the two implementations."""
    cfg = ModelConfig(vocab_size=29, n_layer=1, n_head=2, d_model=16, max_seq_len=16, mtp_k=3, head_type=head_type)
    tokens = torch.randint(0, 28, (3, 16), generator=torch.Generator().manual_seed(3))
    doc_ids = torch.zeros_like(tokens)
    doc_ids[1, 9:] = 1
    results = {}
    for impl in ("materialized", "chunked"):
        torch.manual_seed(0)
        model = MTPModel(cfg, ObjectiveConfig(loss_impl=impl, chunk_rows=5), pad_id=28)
        out = model(tokens, doc_ids)
        out["loss"].backward()
        results[impl] = out["loss"].detach(), {n: p.grad for n, p in model.named_parameters()}
    torch.testing.assert_close(results["chunked"][0], results["materialized"][0], rtol=RTOL, atol=0)
    for name, grad in results["materialized"][1].items():
        torch.testing.assert_close(results["chunked"][1][name], grad, rtol=RTOL, atol=1e-7,
                                   msg=lambda m: f"{name}: {m}")


def test_config_rejects_bad_loss_impl_and_chunk_rows():
    assert load_config(None, ["objective.loss_impl=materialized"]).objective.loss_impl == "materialized"
    with pytest.raises(UserError, match="objective.loss_impl"):
        load_config(None, ["objective.loss_impl=fused"])
    with pytest.raises(UserError, match="objective.chunk_rows"):
        load_config(None, ["objective.chunk_rows=-1"])
    assert load_config(None, ["train.compile=gpu"]).train.compile == "gpu"
    with pytest.raises(UserError, match="train.compile must be never, gpu or always"):
        load_config(None, ["train.compile=sometimes"])


def test_autocast_bf16_runs_in_low_precision_and_returns_fp32_gradients():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(40, 16, generator=g, requires_grad=True)
    w = torch.randn(50, 16, generator=g, requires_grad=True)
    y, s = torch.randint(0, 50, (40,), generator=g), torch.full((40,), 1 / 40)
    grads = {}
    for name, fn in (("chunked", lambda: linear_cross_entropy(x, w, y, s, chunk_rows=16)),
                     ("materialized", lambda: materialized_cross_entropy(x, w, y, s))):
        x.grad = w.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = fn()[0]
        loss.backward()
        grads[name] = loss.detach(), x.grad, w.grad
    assert grads["chunked"][1].dtype == grads["chunked"][2].dtype == torch.float32
    for a, b in zip(grads["chunked"], grads["materialized"]):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)
