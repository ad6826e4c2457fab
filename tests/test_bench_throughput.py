"""bench/throughput.py: configuration names and one tiny end-to-end table (its FLOP count is
ds_mtp.monitor.model_flops_per_token, tested in tests/test_monitor.py)."""

import importlib.util
import json
import sys

import pytest

from tests.conftest import REPO

spec = importlib.util.spec_from_file_location("throughput", REPO / "bench" / "throughput.py")
throughput = importlib.util.module_from_spec(spec)
spec.loader.exec_module(throughput)


def test_configuration_names():
    c = throughput.parse_config("lse4-block:materialized+compile")
    assert (c["K"], c["head_type"], c["lse"], c["loss_impl"], c["compile"], c["plain"]) == \
        (4, "block", True, "materialized", True, False)
    assert throughput.parse_config("mtp4")["loss_impl"] == "chunked" and not throughput.parse_config("mtp4")["lse"]
    assert throughput.parse_config("plain-ntp")["K"] == 1
    for bad in ("lse4-tree", "ntp:fused", "ntp+jit", "gpt"):
        with pytest.raises(SystemExit):
            throughput.parse_config(bad)


def test_tiny_cpu_run_prints_a_table(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(throughput.SHAPES, "cpu-small", dict(
        model=dict(n_layer=1, n_head=2, d_model=16, vocab_size=64, max_seq_len=16), batch=2, seq_len=16))
    monkeypatch.setattr(throughput, "child_command", lambda name, args: [  # the child must see the tiny shape
        sys.executable, "-c", "import json,sys; print('RESULT ' + json.dumps(dict(config=sys.argv[1], ms_per_step=1.0, "
        "tokens_per_s=1.0, peak_bytes=2**20, flops_per_token=1.0)))", name])
    out = tmp_path / "rows.json"
    code = throughput.main(["--configs", "ntp:materialized,lse4-sequential", "--steps", "2", "--warmup", "1",
                            "--json", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "| ntp:materialized |" in text and "| lse4-sequential |" in text
    rows = json.loads(out.read_text())["rows"]
    assert [r["config"] for r in rows] == ["ntp:materialized", "lse4-sequential"]
    assert all(r["ms_per_step"] > 0 and r["peak_bytes"] == 2**20 for r in rows)


def test_loader_bench_checks_both_loaders_agree(capsys):
    spec = importlib.util.spec_from_file_location("loader", REPO / "bench" / "loader.py")
    loader = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loader)
    for mode in ("document", "packed"):
        assert loader.main(["--documents", "300", "--batch", "4", "--seq-len", "16", "--mode", mode,
                            "--seconds", "0.05"]) == 0
        assert "| WindowSampler (vectorised) |" in capsys.readouterr().out
