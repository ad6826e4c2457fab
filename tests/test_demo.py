from pathlib import Path

from ds_mtp.config import load_config
from ds_mtp.experiments.demo import DEMO_METHODS, comparison_lines, demo_overrides


def test_demo_runs_reproduces_cpu_recipe_on_two_ranks():
    for key in DEMO_METHODS:
        cfg = load_config(None, demo_overrides(Path("world"), key, 0, 0, nproc=2))
        assert cfg.train.micro_batch == 16 and cfg.train.eval_every > 0 and cfg.data.sampling == "packed_documents"
        assert cfg.model.mtp_k == (1 if key == "ntp" else 4)
    short = load_config(None, demo_overrides(Path("world"), "mtp", 30, 0, nproc=1))
    assert short.train.max_steps == 30 and short.train.eval_every == 5 and short.train.micro_batch == 32


def test_demo_compares_only_converged_methods():
    rows = [{"method": "NTP", "heldout_ce_1": 0.70, "success": 0.90},
            {"method": "MTP", "heldout_ce_1": 0.74, "success": 0.88},
            {"method": "LSE-MTP", "heldout_ce_1": 2.60, "success": 0.01}]
    mtp, lse = comparison_lines(rows)
    assert mtp.startswith("MTP: converged (held-out ce_1 1.06x NTP's") and "path success 0.880 vs NTP's 0.900" in mtp
    assert lse.startswith("LSE-MTP has not converged: held-out ce_1 2.600 is 3.71x NTP's 0.700")
    assert "path success" not in lse
