from pathlib import Path

from ds_mtp.config import load_config
from ds_mtp.experiments.demo import DEMO_METHODS, K, comparison_lines, demo_overrides, demo_rows
from ds_mtp.experiments.reproduce import METHODS, SCALES, ReproduceResult, run_overrides


def test_demo_is_reproduces_cpu_recipe_on_two_ranks_evaluating_paths():
    demo, cpu = SCALES["demo"], SCALES["cpu"]
    assert demo.train == cpu.train and demo.global_batch == cpu.global_batch and demo.sampling == cpu.sampling
    assert demo.nproc == 2 and demo.metrics == ("paths",)
    for key in DEMO_METHODS:
        cfg = load_config(None, run_overrides(demo, METHODS[key], K, 0, Path("world"), demo.nproc, 21, []))
        assert cfg.train.micro_batch == 16 and cfg.train.eval_every > 0 and cfg.data.sampling == "packed_documents"
        assert cfg.model.mtp_k == (1 if key == "ntp" else 4) and cfg.train.max_steps == 1600
    short = load_config(None, run_overrides(demo, METHODS["mtp"], K, 0, Path("world"), 1, 21, demo_overrides(30)))
    assert short.train.max_steps == 30 and short.train.eval_every == 5 and short.train.micro_batch == 32


def test_demo_rows_read_reproduces_records():
    greedy = {"pairs": 50, "success": 0.9, "illegal_edge": 0.06, "wrong_target": 0.04, "strict": {"success": 0.88}}
    run = {"name": "MTP", "k": 4, "lambda": 0.0, "metrics": {"heldout_ce_1": 0.75}, "steps": 30,
           "train_seconds": 12.0, "results": {"metrics": {"paths": {"greedy": greedy, "sampled": {}}}}}
    (row,) = demo_rows(ReproduceResult(Path("."), [run]))
    assert row == {"method": "MTP", "K": 4, "lambda": 0.0, "heldout_ce_1": 0.75, "steps": 30, "train_seconds": 12.0,
                   "pairs": 50, "success": 0.9, "illegal_edge": 0.06, "wrong_target": 0.04, "success_strict": 0.88}


def test_demo_compares_only_converged_methods():
    rows = [{"method": "NTP", "heldout_ce_1": 0.70, "success": 0.90},
            {"method": "MTP", "heldout_ce_1": 0.74, "success": 0.88},
            {"method": "LSE-MTP", "heldout_ce_1": 2.60, "success": 0.01}]
    mtp, lse = comparison_lines(rows)
    assert mtp.startswith("MTP: converged (held-out ce_1 1.06x NTP's") and "path success 0.880 vs NTP's 0.900" in mtp
    assert lse.startswith("LSE-MTP has not converged: held-out ce_1 2.600 is 3.71x NTP's 0.700")
    assert "path success" not in lse


def test_a_directory_that_is_not_a_demo_is_refused_in_one_line(tmp_path):
    import pytest

    from ds_mtp.errors import UserError
    from ds_mtp.experiments.demo import run_demo

    (tmp_path / "ntp").mkdir()  # an older demo's layout
    with pytest.raises(UserError, match="holds something other than a demo .*remove it or choose another --run-dir"):
        run_demo(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["ntp"]
