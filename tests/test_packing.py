"""Document-masked packing: whole documents packed into windows, attention and positions inside a document.

The exactness tests hold a packed batch against the same documents one per padded row: with
model.attention = "document" every term of the loss, its gradients and each document's states agree.
"""

import numpy as np
import pytest
import torch

from ds_mtp.cli import main
from ds_mtp.config import ModelConfig, ObjectiveConfig
from ds_mtp.data import TokenShards, WindowSampler, pack_documents, write_documents
from ds_mtp.errors import UserError
from ds_mtp.model import AttentionLayout, MTPModel, document_positions

PAD, EOS, VOCAB, WINDOW = 62, 61, 64, 24


@pytest.fixture(scope="module")
def short_docs(tmp_path_factory):
    """600 documents of 3-13 tokens (like graph paths), two shards."""
    rng = np.random.default_rng(3)
    docs = [np.r_[rng.integers(0, 60, rng.integers(2, 13)), EOS] for _ in range(600)]
    path = tmp_path_factory.mktemp("short") / "data"
    write_documents(path, {"train": docs}, vocab_size=VOCAB, special_ids={"pad": PAD, "eos": EOS}, shard_tokens=2000)
    return path


def test_best_fit_decreasing_packs_every_document_once():
    lengths = np.random.default_rng(0).integers(1, 20, 5000)
    order, bounds = pack_documents(lengths, 24, np.random.default_rng(1))
    assert sorted(order.tolist()) == list(range(5000))
    per_window = np.add.reduceat(lengths[order], bounds[:-1])
    assert per_window.max() <= 24 and np.diff(bounds).min() >= 1
    assert lengths.sum() / (24 * per_window.size) > 0.97  # best fit wastes little
    again, _ = pack_documents(lengths, 24, np.random.default_rng(1))
    assert np.array_equal(order, again)


def test_packed_documents_windows_hold_whole_documents_padding_at_the_tail(short_docs):
    shards = TokenShards(short_docs)
    sampler = WindowSampler(shards, WINDOW, 8, seed=5, mode="packed_documents")
    assert sampler.fill > 0.95 and WindowSampler(shards, WINDOW, 8, mode="document").fill < 0.4
    seen = []
    for micro in range(sampler.num_samples // 8):
        batch = sampler.batch(micro)
        for tokens, docs in zip(batch.tokens.numpy(), batch.doc_ids.numpy()):
            pad = docs < 0
            assert (tokens[pad] == PAD).all() and pad[np.argmax(pad):].all() if pad.any() else True
            for doc in np.unique(docs[~pad]):
                columns = np.flatnonzero(docs == doc)
                assert (np.diff(columns) == 1).all()  # contiguous: never split
                assert np.array_equal(tokens[columns], shards.document(int(doc)))
                seen.append(int(doc))
    assert len(seen) == len(set(seen)) and len(seen) > 0.9 * shards.num_documents
    # Deterministic, and the data-parallel ranks share no window.
    again = WindowSampler(shards, WINDOW, 8, seed=5, mode="packed_documents").batch(3)
    assert torch.equal(again.tokens, sampler.batch(3).tokens)
    rank0, rank1 = (WindowSampler(shards, WINDOW, 8, seed=5, dp_rank=r, dp_size=2, mode="packed_documents").batch(0)
                    for r in (0, 1))
    assert not set(rank0.doc_ids.unique().tolist()) - {-1} & set(rank1.doc_ids.unique().tolist()) - {-1}


def test_a_document_longer_than_the_window_is_refused_in_one_line(short_docs, tmp_path, capsys):
    with pytest.raises(UserError, match="longer than train.seq_len=8 .longest 13 tokens"):
        WindowSampler(TokenShards(short_docs), 8, 4, mode="packed_documents")
    code = main(["train", "--run-dir", str(tmp_path / "run"), f"data.path={short_docs}", "model.preset=tiny",
                 "data.sampling=packed_documents", "train.seq_len=8"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "documents in split 'train' are longer than" in err
    assert not (tmp_path / "run").exists()


def test_positions_restart_at_each_document():
    doc_ids = torch.tensor([[4, 4, 4, 9, 9, -1, -1], [1, 1, 1, 1, 1, 1, 1]])
    assert document_positions(doc_ids).tolist() == [[0, 1, 2, 0, 1, 0, 1], [0, 1, 2, 3, 4, 5, 6]]


def padded_rows(batch) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int, int, int]]]:
    """The packed batch's documents one per row, right-padded (as data.sampling=document gives them), and
    where each document sits: (packed row, packed column, padded row, length)."""
    rows, places = [], []
    for r, (tokens, docs) in enumerate(zip(batch.tokens, batch.doc_ids)):
        for doc in docs.unique().tolist():
            if doc < 0:
                continue
            columns = (docs == doc).nonzero().squeeze(1)
            row = torch.full((WINDOW,), PAD)
            row[: columns.numel()] = tokens[columns]
            places.append((r, int(columns[0]), len(rows), columns.numel()))
            rows.append(row)
    tokens = torch.stack(rows)
    return tokens, torch.arange(len(rows))[:, None].expand(-1, WINDOW), places


@pytest.mark.parametrize("head_type, positions", [("linear", "learned"), ("linear", "rope"), ("block", "rope"),
                                                  ("sequential", "learned")])
def test_packed_masked_windows_equal_one_padded_document_per_row(short_docs, head_type, positions):
    """Same loss terms, same gradients and same per-document states, to 1e-5 (fp32), with λ > 0."""
    batch = WindowSampler(TokenShards(short_docs), WINDOW, 6, seed=1, mode="packed_documents").batch(0)
    padded, padded_docs, places = padded_rows(batch)
    assert len(places) > 2 * batch.tokens.shape[0]  # several documents share each window
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=VOCAB, n_layer=2, n_head=2, d_model=32, max_seq_len=WINDOW, mtp_k=3,
                      head_type=head_type, positions=positions, norm="layernorm", mlp="gelu",
                      tie_embeddings=head_type != "block")
    model = MTPModel(cfg, ObjectiveConfig(lambda_latent=0.1, lambda_semantic=0.1, loss_impl="materialized"), PAD)

    outputs, grads = [], []
    for tokens, docs in ((batch.tokens, batch.doc_ids), (padded, padded_docs)):
        model.zero_grad()
        out = model(tokens, docs)
        out["loss"].backward()
        outputs.append(torch.stack([out["loss"], *out["ce"], *out["latent"], *out["semantic"]]).detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-5, msg=name)

    with torch.no_grad():
        packed_states = model.head_logits(batch.tokens, batch.doc_ids)  # [B, K, T, V]
        alone_states = model.head_logits(padded, padded_docs)
    for row, column, padded_row, length in places:
        for k in range(3):  # head k+1 at t reads up to x_{t+k} (sequential heads): compare inside the document
            inside = length - k
            torch.testing.assert_close(packed_states[row, k, column: column + inside],
                                       alone_states[padded_row, k, :inside], rtol=1e-5, atol=1e-5)


def test_window_attention_lets_documents_see_each_other(short_docs):
    batch = WindowSampler(TokenShards(short_docs), WINDOW, 4, seed=1, mode="packed_documents").batch(0)
    torch.manual_seed(0)
    cfg = dict(vocab_size=VOCAB, n_layer=1, n_head=2, d_model=32, max_seq_len=WINDOW)
    document = MTPModel(ModelConfig(**cfg))
    window = MTPModel(ModelConfig(**cfg, attention="window"))
    window.load_state_dict(document.state_dict())
    later = batch.doc_ids != batch.doc_ids[:, :1]  # positions after each row's first document
    a, b = document.hidden(batch.tokens, batch.doc_ids), window.hidden(batch.tokens, batch.doc_ids)
    torch.testing.assert_close(a[~later], b[~later])
    assert not torch.allclose(a[later], b[later])


@pytest.mark.slow
def test_flex_attention_block_mask_equals_the_boolean_mask():
    """The GPU kernel's mask (FlexAttention BlockMask, block-sparse) against SDPA's boolean mask; flex runs
    forward-only on CPU (compiled), which is enough to check the document predicate."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    from ds_mtp.model import flex_attention

    doc_ids = torch.tensor([[0] * 10 + [1] * 12 + [2] * 10, [5] * 3 + [6] * 29])
    q, k, v = (torch.randn(2, 2, 32, 16) for _ in range(3))
    flex = AttentionLayout.documents(doc_ids, use_flex=True)
    dense = AttentionLayout.documents(doc_ids, use_flex=False)
    assert flex.flex and not dense.flex
    with torch.no_grad():
        expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense.mask)
        torch.testing.assert_close(flex_attention(q, k, v, flex.mask), expected, rtol=1e-5, atol=1e-5)
