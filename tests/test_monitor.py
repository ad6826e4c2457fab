"""ds_mtp/monitor.py and what it reports: per-head accuracy, the FLOPs model behind TFLOP/s and MFU (the one
formula, which bench/throughput.py uses too), and where the scalars land in TensorBoard."""

import pytest
import torch

from ds_mtp.config import ModelConfig
from ds_mtp.model import MTPModel
from ds_mtp.monitor import Monitor, model_flops_per_token, read_metrics
from ds_mtp.objective import lse_mtp_loss


def test_accuracy_per_head_matches_a_position_loop():
    g = torch.Generator().manual_seed(0)
    B, T, d, V, K, pad = 3, 10, 6, 7, 3, 6
    hidden, head_hidden = torch.randn(B, T, d, generator=g), torch.randn(B, K - 1, T, d, generator=g)
    tokens = torch.randint(0, V - 1, (B, T), generator=g)
    tokens[1, -2:] = pad
    doc_ids = torch.zeros(B, T, dtype=torch.long)
    doc_ids[2, 4:] = 1
    unembed, embed = torch.randn(V, d, generator=g), torch.randn(V, d, generator=g)
    out = lse_mtp_loss(hidden, head_hidden, tokens, unembed, embed, pad_id=pad, doc_ids=doc_ids)
    for k in range(1, K + 1):
        hits = total = 0
        for b in range(B):
            for t in range(T - k):
                if tokens[b, t + k] == pad or doc_ids[b, t] != doc_ids[b, t + k]:
                    continue
                pred = hidden[b, t] if k == 1 else head_hidden[b, k - 2, t]
                hits += int((unembed @ pred).argmax() == tokens[b, t + k])
                total += 1
        assert out["acc"][k - 1].item() == pytest.approx(hits / total, abs=1e-7)
        assert out["acc"][k - 1].dtype == torch.float32 and not out["acc"][k - 1].requires_grad


def test_accuracy_counts_stay_exact_in_bf16():
    """601 hits of 1000 rows: bf16 cannot hold 601 (nor 1000), float32 counts can."""
    V, d = 4, 4
    unembed = torch.eye(V, d, dtype=torch.bfloat16)
    tokens = torch.zeros(1, 1001, dtype=torch.long)
    tokens[0, 1:] = 1  # every row's target is token 1
    hidden = torch.zeros(1, 1001, d, dtype=torch.bfloat16)
    hidden[0, :601, 1] = 1.0  # these rows predict 1
    hidden[0, 601:, 2] = 1.0  # the rest predict 2
    out = lse_mtp_loss(hidden, None, tokens, unembed, unembed.clone())
    assert out["acc"][0].item() == pytest.approx(0.601, abs=1e-6)


@pytest.mark.parametrize("mtp_k, gflop", [(1, 0.854), (4, 1.560)])
def test_flops_per_token_of_gpt2_small_shape(mtp_k, gflop):
    """The figures of shared/gpu/README.md: 12 layers, d=768, V=50304, T=1024, GELU MLP, tied embeddings."""
    cfg = ModelConfig(n_layer=12, n_head=12, d_model=768, vocab_size=50304, max_seq_len=1024, mlp="gelu",
                      norm="layernorm", positions="learned", mtp_k=mtp_k, head_type="linear")
    with torch.device("meta"):
        model = MTPModel(cfg)
    assert model_flops_per_token(model, 1024) / 1e9 == pytest.approx(gflop, abs=0.002)


def test_flops_count_the_extra_blocks_of_block_heads():
    small = dict(n_layer=2, n_head=2, d_model=32, vocab_size=50, max_seq_len=16, mlp="gelu", mtp_k=3)
    with torch.device("meta"):
        linear = MTPModel(ModelConfig(**small, head_type="linear"))
        block = MTPModel(ModelConfig(**small, head_type="block"))
    d, T = 32, 16
    per_block = 6 * 12 * d * d + 12 * d * T  # 4d² attention + 8d² MLP weights, and the attention itself
    assert model_flops_per_token(block, T) - model_flops_per_token(linear, T) == 2 * per_block - 6 * 2 * d * d


def test_monitor_groups_accuracy_and_throughput_in_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monitor = Monitor(tmp_path)
    monitor.log({"step": 1, "loss": 2.0, "ce_1": 1.5, "acc_1": 0.25, "tokens_per_s": 100.0, "peak_mem_gib": 1.5,
                 "tflops_per_gpu": 3.0, "mfu": 0.3, "lr": 1e-3})
    monitor.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"loss/loss", "loss/ce_1", "accuracy/acc_1", "perf/tokens_per_s",
                                             "perf/peak_mem_gib", "perf/tflops_per_gpu", "perf/mfu", "train/lr"}
    assert read_metrics(tmp_path / "metrics.jsonl")[0]["acc_1"] == 0.25
