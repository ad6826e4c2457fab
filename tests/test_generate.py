import pytest
import torch

from ds_mtp.config import ModelConfig
from ds_mtp.generate import CachedDecoder, HeadDrafter, Sampling, generate, token_probs
from ds_mtp.model import MTPModel

HEAD_TYPES = ["linear", "block", "sequential"]
POSITIONS = [dict(), dict(positions="learned", norm="layernorm", mlp="gelu", tie_embeddings=False, bias=True)]


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=32, n_layer=2, n_head=2, d_model=32, max_seq_len=48, mtp_k=4)
    return ModelConfig(**{**base, **kw})


def recompute_greedy(model, prompt, steps):
    tokens = list(prompt)
    for _ in range(steps):
        tokens.append(int(model.logits(torch.tensor([tokens]))[0, -1].argmax()))
    return tokens[len(prompt):]


@pytest.mark.parametrize("variant", POSITIONS)
@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_kv_cache_logits_equal_a_full_recompute_for_every_head(head_type, variant):
    torch.manual_seed(0)
    model = MTPModel(tiny(head_type=head_type, **variant)).eval()
    prompts = [[3, 1, 4, 1, 5], [9, 2], [6, 5, 3, 5, 8, 9, 7]]  # left-padded to one width
    seqs = [p + torch.randint(0, 32, (6,)).tolist() for p in prompts]
    decoder = CachedDecoder(model, prompts, max_new_tokens=8)
    drafter = HeadDrafter(model, decoder)
    width = decoder.committed
    z = decoder.extend(decoder.tokens[:, :width])
    start = 0
    for step in range(6):
        nxt = torch.tensor([s[len(p) + step] for s, p in zip(seqs, prompts)])
        decoder.commit(nxt[:, None])
        # Draft with the true continuation forced, so that head k's logits are those of the full forward.
        seen = {}

        def forced(logits, head, step=step):
            seen[head] = logits
            return torch.tensor([s[len(p) + step + head - 1] if len(p) + step + head - 1 < len(s) else 0
                                 for s, p in zip(seqs, prompts)]), None

        drafter.draft(z, start, model.heads.extra, forced)
        logits = decoder.logits(z)[:, -1]
        for row, (s, p) in enumerate(zip(seqs, prompts)):
            t = len(p) + step - 1  # the position just decoded, in the unpadded sequence
            full = model.head_logits(torch.tensor([s]))[0, :, t]  # [K, V]
            torch.testing.assert_close(logits[row], full[0], atol=1e-5, rtol=1e-4)
            for head, head_logits in seen.items():
                if t + head - 1 < len(s):  # the full forward reads x_{t+k-1} (sequential): it exists
                    torch.testing.assert_close(head_logits[row], full[head - 1], atol=1e-5, rtol=1e-4)
        start = decoder.cached
        z = decoder.extend(nxt[:, None])


@pytest.mark.parametrize("variant", POSITIONS)
@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_plain_and_speculative_greedy_equal_recomputed_greedy_on_random_weights(head_type, variant):
    torch.manual_seed(1)
    model = MTPModel(tiny(head_type=head_type, **variant)).eval()
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9]]
    plain = generate(model, prompts, 12)
    speculative = generate(model, prompts, 12, speculative=True)
    assert plain.tokens == [recompute_greedy(model, p, 12) for p in prompts]
    assert speculative.tokens == plain.tokens
    assert plain.stats.tokens_per_forward == 1.0
    import ds_mtp

    assert ds_mtp.generate(model, prompts, 12).tokens == plain.tokens  # the package's entry point


def train_counting(head_type: str, steps: int = 150) -> MTPModel:
    """A model whose heads all learn x_{t+k} = x_t + k (mod V): its drafts are right, so they are accepted."""
    torch.manual_seed(0)
    model = MTPModel(tiny(head_type=head_type, vocab_size=24, max_seq_len=40))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        tokens = (torch.randint(0, 24, (16, 1)) + torch.arange(24)) % 24
        loss = model(tokens)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module", params=HEAD_TYPES)
def counting_model(request):
    return train_counting(request.param)


def test_speculative_greedy_accepts_right_drafts_and_still_equals_plain_greedy(counting_model):
    prompts = [[5, 6, 7], [20, 21], [0, 1, 2, 3]]
    plain = generate(counting_model, prompts, 30)
    speculative = generate(counting_model, prompts, 30, speculative=True)
    assert plain.tokens == [[(p[-1] + i) % 24 for i in range(1, 31)] for p in prompts]  # it did learn to count
    assert speculative.tokens == plain.tokens
    assert speculative.stats.acceptance_rate > 0.9
    assert speculative.stats.tokens_per_forward > 3.0  # K = 4: up to 4 tokens per pass
    single = generate(counting_model, [prompts[0]], 30, speculative=True)
    assert single.tokens == plain.tokens[:1]


def test_generation_stops_at_eos_and_at_the_stop_rule(counting_model):
    out = generate(counting_model, [[1, 2], [10, 11]], 20, eos_id=6, speculative=True)
    assert out.tokens[0] == [3, 4, 5, 6]  # EOS included, nothing after it
    assert out.tokens[1] == [(12 + i) % 24 for i in range(18)] + [6]
    out = generate(counting_model, [[1, 2]], 20, stop=lambda row, token: token == 4)
    assert out.tokens == [[3, 4]]


def test_generation_stops_at_the_context_length(counting_model):
    out = generate(counting_model, [[0, 1, 2]], 100, speculative=True)
    assert len(out.tokens[0]) == 40 - 3 + 1  # max_seq_len 40: the last token is never fed
    assert out.tokens == generate(counting_model, [[0, 1, 2]], 100).tokens


def test_each_row_of_a_batch_gets_its_own_context_budget(counting_model):
    prompts = [[0, 1, 2], [i % 24 for i in range(30)]]  # max_seq_len 40: 38 and 11 new tokens
    for speculative in (False, True):
        out = generate(counting_model, prompts, 100, speculative=speculative)
        assert [len(t) for t in out.tokens] == [38, 11]
        assert out.tokens == [generate(counting_model, [p], 100).tokens[0] for p in prompts]


def test_sampling_filters_keep_what_they_promise():
    logits = torch.tensor([[2.0, 1.5, 0.5, -1.0, -3.0]])
    base = torch.softmax(logits, -1)
    torch.testing.assert_close(token_probs(logits, Sampling(1.0)), base)
    top2 = token_probs(logits, Sampling(1.0, top_k=2))
    torch.testing.assert_close(top2[0, :2], base[0, :2] / base[0, :2].sum())
    assert (top2[0, 2:] == 0).all()
    nucleus = token_probs(logits, Sampling(1.0, top_p=0.9))  # the first two hold 0.53 + 0.32 < 0.9: three kept
    assert (nucleus[0, :3] > 0).all() and (nucleus[0, 3:] == 0).all()
    cut = token_probs(logits, Sampling(1.0, epsilon=0.05))
    assert (cut[0] > 0).tolist() == (base[0] >= 0.05).tolist()
    assert token_probs(logits, Sampling(0.0)).tolist() == [[1.0, 0.0, 0.0, 0.0, 0.0]]


def test_streaming_sees_every_token_in_order(counting_model):
    seen = []
    out = generate(counting_model, [[1, 2], [7]], 9, speculative=True, on_token=lambda r, t: seen.append((r, t)))
    for row in (0, 1):
        assert [t for r, t in seen if r == row] == out.tokens[row]


def exact_distribution(model, prompt, length, sampling):
    """Probability of every continuation of ``length`` tokens under plain sampling, by enumeration."""
    V = model.cfg.vocab_size
    seqs = torch.cartesian_prod(*[torch.arange(V)] * length).reshape(-1, length)
    tokens = torch.cat([torch.tensor(prompt).expand(len(seqs), -1), seqs], dim=1)
    probs = token_probs(model.logits(tokens)[:, len(prompt) - 1:-1], sampling)  # [N, length, V]
    return probs.gather(-1, seqs[..., None])[..., 0].prod(dim=1)


@pytest.mark.parametrize("head_type, sampling", [*((h, Sampling(1.0)) for h in HEAD_TYPES),
                                                  ("sequential", Sampling(0.7, top_k=3)),
                                                  ("block", Sampling(1.3, top_p=0.8))])
def test_speculative_sampling_keeps_the_distribution_of_plain_sampling(head_type, sampling):
    torch.manual_seed(2)
    model = MTPModel(tiny(head_type=head_type, vocab_size=4, init_std=0.8, mtp_k=3)).eval()
    prompt, length, n = [1, 3], 3, 4000
    exact = exact_distribution(model, prompt, length, sampling)
    # Rows decoded one at a time and in a batch (where rows advance by the fewest accepted drafts).
    batched = generate(model, [prompt] * n, length, temperature=sampling.temperature, top_k=sampling.top_k,
                       top_p=sampling.top_p, seed=0, speculative=True)
    runs = [generate(model, [prompt], length, temperature=sampling.temperature, top_k=sampling.top_k,
                     top_p=sampling.top_p, seed=s, speculative=True) for s in range(600)]
    assert sum(r.stats.accepted for r in runs) > 20  # the accept path is taken, not only the corrections
    single = [r.tokens[0] for r in runs]
    for samples in (batched.tokens, single):
        index = torch.tensor([a * 16 + b * 4 + c for a, b, c in samples])
        observed = torch.bincount(index, minlength=64).float()
        expected = exact * len(samples)
        cells = expected > 5
        chi2 = ((observed[cells] - expected[cells]) ** 2 / expected[cells]).sum().item()
        assert chi2 < 3 * max(1, int(cells.sum()) - 1) + 30, chi2
        assert observed[exact == 0].sum() == 0  # top-k / top-p: nothing outside the kept tokens


def test_speculative_sampling_test_would_catch_taking_the_drafts_as_they_come():
    """The heads' own distribution is far from head 1's here, so a sampler that skipped verification fails."""
    torch.manual_seed(2)
    model = MTPModel(tiny(head_type="block", vocab_size=4, init_std=0.8, mtp_k=3)).eval()
    h, head_hidden = model.states(torch.tensor([[1, 3]]))
    head2 = torch.softmax(head_hidden[0, 0, -1] @ model.unembed_weight.t(), -1)
    exact = exact_distribution(model, [1, 3], 2, Sampling(1.0)).reshape(4, 4).sum(0)  # marginal of token 2
    assert (head2 - exact).abs().sum() > 0.5


def test_bad_sampling_settings_are_user_errors():
    from ds_mtp.errors import UserError

    model = MTPModel(tiny()).eval()
    for kw in (dict(temperature=-1), dict(top_k=-2), dict(top_p=0), dict(top_p=1.5)):
        with pytest.raises(UserError):
            generate(model, [[1]], 2, **kw)
    with pytest.raises(UserError, match="context"):
        generate(model, [list(range(20)) * 3], 2)
