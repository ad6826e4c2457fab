import pytest
import torch
import torch.nn.functional as F

from ds_mtp.objective import lse_mtp_loss


def loop_reference(hidden, head_hidden, tokens, unembed, embed, lam_l, lam_s, pad_id, doc_ids, weights, distance):
    """The formula written out position by position, one cross-entropy call per (b, t, k)."""
    B, T, d = hidden.shape
    K = 1 + head_hidden.shape[1]
    ce, latent, semantic = [], [], []
    for k in range(1, K + 1):
        ce_terms, lat_terms, sem_terms = [], [], []
        for b in range(B):
            for t in range(T):
                if t + k >= T or tokens[b, t + k] == pad_id or doc_ids[b, t] != doc_ids[b, t + k]:
                    continue
                pred = hidden[b, t] if k == 1 else head_hidden[b, k - 2, t]
                logits = unembed @ pred
                ce_terms.append(F.cross_entropy(logits[None], tokens[b, t + k][None]))
                if k > 1:
                    for target, out in ((hidden[b, t + k - 1], lat_terms), (embed[tokens[b, t + k]], sem_terms)):
                        if distance == "mse":
                            out.append(((pred - target) ** 2).mean())
                        else:
                            out.append(1 - F.cosine_similarity(pred, target, dim=0))
        mean = lambda xs: torch.stack(xs).mean() if xs else torch.zeros((), dtype=hidden.dtype)
        ce.append(mean(ce_terms))
        if k > 1:
            latent.append(mean(lat_terms))
            semantic.append(mean(sem_terms))
    loss = sum(w * c for w, c in zip(weights, ce)) + lam_l * sum(latent) + lam_s * sum(semantic)
    return {"loss": loss, "ce": ce, "latent": latent, "semantic": semantic}


def random_inputs(B=3, T=12, d=8, V=11, K=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, d, generator=g, dtype=dtype)
    head_hidden = torch.randn(B, K - 1, T, d, generator=g, dtype=dtype)
    tokens = torch.randint(0, V - 1, (B, T), generator=g)
    tokens[0, -3:] = V - 1  # pad at the end of row 0
    tokens[2, 5] = V - 1  # a pad in the middle of row 2
    doc_ids = torch.zeros(B, T, dtype=torch.long)
    doc_ids[1, 6:] = 1  # row 1 holds two documents
    doc_ids[2, 9:] = 7
    unembed = torch.randn(V, d, generator=g, dtype=dtype)
    embed = torch.randn(V, d, generator=g, dtype=dtype)
    return hidden, head_hidden, tokens, unembed, embed, doc_ids


@pytest.mark.parametrize("distance", ["mse", "cosine"])
def test_matches_loop_reference(distance):
    hidden, head_hidden, tokens, unembed, embed, doc_ids = random_inputs()
    weights = [1.0, 0.5, 0.25, 2.0]
    got = lse_mtp_loss(hidden, head_hidden, tokens, unembed, embed, lambda_latent=0.3, lambda_semantic=0.7,
                       pad_id=10, doc_ids=doc_ids, head_weights=weights, distance=distance)
    want = loop_reference(hidden, head_hidden, tokens, unembed, embed, 0.3, 0.7, 10, doc_ids, weights, distance)
    torch.testing.assert_close(got["loss"], want["loss"], atol=1e-6, rtol=0)
    for key in ("ce", "latent", "semantic"):
        assert len(got[key]) == len(want[key])
        for a, b in zip(got[key], want[key]):
            torch.testing.assert_close(a, b.to(a.dtype), atol=1e-6, rtol=0)


def test_k1_equals_cross_entropy():
    hidden, _, tokens, unembed, embed, _ = random_inputs(K=2)
    got = lse_mtp_loss(hidden, None, tokens, unembed, embed)
    want = F.cross_entropy((hidden[:, :-1] @ unembed.t()).reshape(-1, unembed.shape[0]), tokens[:, 1:].reshape(-1))
    torch.testing.assert_close(got["loss"], want, atol=1e-10, rtol=0)
    assert got["latent"] == [] and got["semantic"] == [] and len(got["ce"]) == 1


def test_targets_receive_no_gradient():
    hidden, head_hidden, tokens, unembed, embed, doc_ids = random_inputs()
    hidden.requires_grad_(True)
    embed.requires_grad_(True)
    head_hidden.requires_grad_(True)
    out = lse_mtp_loss(hidden, head_hidden, tokens, unembed, embed, lambda_latent=1.0, lambda_semantic=1.0,
                       head_weights=[0.0] * 4, doc_ids=doc_ids)
    out["loss"].backward()
    # hidden only appears as the stop-gradient latent target, embed only as the semantic anchor.
    assert hidden.grad is None or torch.count_nonzero(hidden.grad) == 0
    assert embed.grad is None or torch.count_nonzero(embed.grad) == 0
    assert torch.count_nonzero(head_hidden.grad) > 0


def test_gradient_reaches_predictions_and_unembedding():
    hidden, head_hidden, tokens, unembed, embed, _ = random_inputs()
    for t in (hidden, head_hidden, unembed):
        t.requires_grad_(True)
    lse_mtp_loss(hidden, head_hidden, tokens, unembed, embed)["loss"].backward()
    assert all(torch.count_nonzero(t.grad) > 0 for t in (hidden, head_hidden, unembed))


def test_term_without_valid_positions_is_zero():
    hidden, head_hidden, tokens, unembed, embed, _ = random_inputs(T=6)
    doc_ids = torch.arange(6).expand(3, 6)  # every position its own document: no valid target at all
    out = lse_mtp_loss(hidden, head_hidden, tokens, unembed, embed, doc_ids=doc_ids)
    assert torch.isfinite(out["loss"]) and float(out["loss"]) == 0.0
    assert all(float(x) == 0.0 for x in out["ce"] + out["latent"] + out["semantic"])


def test_head_k_targets_shift_by_k():
    """A head that puts all its mass on tokens[t+k] has (near) zero cross-entropy; on tokens[t+k-1] it does not."""
    V, T, K = 6, 8, 3
    tokens = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1]])
    unembed = torch.eye(V) * 50
    onehot = lambda shift: F.pad(F.one_hot(tokens[:, shift:], V).float(), (0, 0, 0, shift))
    hidden = onehot(1)
    head_hidden = torch.stack([onehot(2), onehot(3)], dim=1)
    out = lse_mtp_loss(hidden, head_hidden, tokens, unembed, unembed)
    assert all(float(c) < 1e-6 for c in out["ce"])
    wrong = lse_mtp_loss(hidden, torch.stack([onehot(1), onehot(1)], dim=1), tokens, unembed, unembed)
    assert float(wrong["ce"][1]) > 10


def test_official_mse_normalization_divides_by_every_position_as_the_papers_code():
    """The paper's code (model.py) averages its latent and semantic MSEs over the whole batch with F.mse_loss:
    every position t < T - k for the latent term, every input position for the semantic one. "official" keeps
    ds-mtp's masking (an invalid position adds 0) but divides as F.mse_loss does."""
    hidden, head_hidden, tokens, unembed, embed, doc_ids = random_inputs()
    B, T, d = hidden.shape
    V = unembed.shape[0]
    kw = dict(lambda_latent=0.3, lambda_semantic=0.7, pad_id=V - 1, doc_ids=doc_ids)
    valid = lse_mtp_loss(hidden, head_hidden, tokens, unembed, embed, **kw)
    official = lse_mtp_loss(hidden, head_hidden, tokens, unembed, embed, mse_normalization="official", **kw)
    for k in range(2, head_hidden.shape[1] + 2):
        pred = head_hidden[:, k - 2, : T - k]
        keep = (tokens[:, k:] != V - 1) & (doc_ids[:, :-k] == doc_ids[:, k:])
        # invalid positions copy their target, so they add nothing to F.mse_loss's sum but still count
        latent_target = torch.where(keep[..., None], hidden[:, k - 1: T - 1], pred)
        assert official["latent"][k - 2].item() == pytest.approx(F.mse_loss(pred, latent_target).item())
        semantic_target = torch.where(keep[..., None], embed[tokens[:, k:]], pred)
        semantic = F.mse_loss(pred, semantic_target, reduction="sum") / (B * (T - 1) * d)
        assert official["semantic"][k - 2].item() == pytest.approx(semantic.item())
        n_valid = keep.sum().item()
        rescaled = valid["latent"][k - 2].item() * n_valid / (B * (T - k))
        assert official["latent"][k - 2].item() == pytest.approx(rescaled)
    torch.testing.assert_close(official["ce"], valid["ce"])
    with pytest.raises(ValueError, match="mse_normalization"):
        lse_mtp_loss(hidden, head_hidden, tokens, unembed, embed, mse_normalization="mean")


def test_official_mse_normalization_reaches_the_model_and_the_pipeline_loss():
    from ds_mtp.config import ModelConfig, ObjectiveConfig, RunConfig
    from ds_mtp.model import MTPModel
    from ds_mtp.pipeline import PipelineLoss

    torch.manual_seed(0)
    cfg = RunConfig(model=ModelConfig(vocab_size=16, n_layer=1, n_head=2, d_model=16, max_seq_len=12, mtp_k=3),
                    objective=ObjectiveConfig(mse_normalization="official"))
    model = MTPModel(cfg.model, cfg.objective, pad_id=15)
    tokens = torch.randint(0, 15, (2, 12))
    tokens[0, 6:] = 15
    h, head_hidden = model.states(tokens)
    expected = lse_mtp_loss(h, head_hidden, tokens, model.unembed_weight, model.embed.weight, pad_id=15,
                            mse_normalization="official")
    got = model(tokens)
    torch.testing.assert_close(torch.stack(got["latent"]), torch.stack(expected["latent"]))
    valid = lse_mtp_loss(h, head_hidden, tokens, model.unembed_weight, model.embed.weight, pad_id=15)
    assert not torch.allclose(torch.stack(got["latent"]), torch.stack(valid["latent"]))
    loss_fn = PipelineLoss(cfg, pad_id=15)
    pipe = loss_fn((h, head_hidden, model.unembed_weight, model.embed.weight), (tokens, None))
    torch.testing.assert_close(pipe, got["loss"])
