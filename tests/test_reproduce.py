import json
import math

import numpy as np
import pytest

from ds_mtp.cli import main
from ds_mtp.experiments.evaluate.suite import QUICK_SCALE
from ds_mtp.experiments.reproduce import (FINDINGS, Scale, check_finding, final_heldout_ce, mean_ci, reproduce, run_state,
                              summarize, t_critical, unconverged)
from ds_mtp.experiments.worlds import make_world

# A few steps of the tiny model: enough to exercise every stage, not to learn the world.
TINY = Scale("tiny", ["model.preset=tiny", "model.n_layer=1", "model.d_model=32", "train.max_steps=4",
                      "train.lr=3e-3", "train.log_every=2", "train.eval_every=2", "train.eval_batches=2"],
             eval_scale={**QUICK_SCALE, "path_pairs": 12, "isp_triples": 50, "belief_trials": 10, "probe_epochs": 5},
             global_batch=8, nproc=1, description="test scale")


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    return make_world("usg", "paper", tmp_path_factory.mktemp("world") / "usg12", seed=0, n=12, density=0.3)


def test_t_critical_and_mean_ci_match_hand_values():
    assert t_critical(2) == pytest.approx(12.7062, abs=1e-4)
    assert t_critical(3) == pytest.approx(4.3027, abs=1e-4)
    assert math.isnan(t_critical(1))
    stat = mean_ci([1.0, 2.0, 3.0])
    assert stat["mean"] == pytest.approx(2.0) and stat["n"] == 3
    assert stat["ci95"] == pytest.approx(4.302653 * 1.0 / math.sqrt(3), rel=1e-5)
    single = mean_ci([0.5, float("nan"), None])  # missing values are not seeds
    assert single["n"] == 1 and single["mean"] == 0.5 and math.isnan(single["ci95"])
    assert mean_ci([])["n"] == 0


def test_summary_and_findings():
    runs = [{"method": m, "seed": s, "metrics": {"isp": v, "heldout_ce_1": 0.7 + 0.01 * s}} for m, vals in
            {"ntp": [2.0, 2.2], "mtp": [7.0, 7.4], "lse-mtp": [1.0, 1.1]}.items() for s, v in enumerate(vals)]
    summary = summarize(runs, ["ntp", "mtp", "lse-mtp"])
    assert summary["mtp"]["isp"]["mean"] == pytest.approx(7.2)
    assert summary["mtp"]["isp"]["ci95"] == pytest.approx(12.7062 * np.std([7.0, 7.4], ddof=1) / math.sqrt(2),
                                                          rel=1e-4)
    isp = next(f for f in FINDINGS if "ISP" in f.text)
    line = check_finding(isp, summary)
    assert "**holds**" in line and "overlap" in line  # two seeds: t = 12.7 makes wide intervals
    summary["ntp"]["isp"]["mean"] = 8.0
    assert "**does not hold**" in check_finding(isp, summary)
    one_seed = summarize(runs[::2], ["ntp", "mtp", "lse-mtp"])
    assert "no confidence interval" in check_finding(isp, one_seed)
    sg = next(f for f in FINDINGS if "Structure" in f.text)
    assert "not tested" in check_finding(sg, summary)
    # A method still learning the task is compared with nothing: one line says which.
    summary["ntp"]["isp"]["mean"] = 2.1
    summary["mtp"]["heldout_ce_1"]["mean"] = 0.8  # 1.14x the others
    line = check_finding(isp, summary)
    assert line.count("\n") == 0 and "**not judged**" in line and "MTP has not converged" in line and "1.13x" in line


def test_unconverged_names_each_method_above_the_tolerance():
    assert unconverged({"NTP": 1.0, "MTP": 1.09, "LSE-MTP": 1.05}) == {}
    lagging = unconverged({"NTP": 1.0, "MTP": 2.6, "LSE-MTP": float("nan")})
    assert set(lagging) == {"MTP", "LSE-MTP"} and "2.60x NTP's 1.000" in lagging["MTP"]
    assert "no held-out ce_1" in lagging["LSE-MTP"]
    assert final_heldout_ce([{"step": 1, "eval_ce_1": 2.0}, {"step": 2}, {"step": 3, "eval_ce_1": 1.5}]) == 1.5
    assert math.isnan(final_heldout_ce([{"step": 1}]))


@pytest.mark.slow
def test_reproduce_report_plots_and_resume(tmp_path, tiny_world, capsys):
    out = tmp_path / "out"
    result = reproduce(str(tiny_world), ["ntp", "lse-mtp"], 2, TINY, out, k=2, nproc=1)
    doc = json.loads((out / "results.json").read_text())
    assert [(r["method"], r["seed"]) for r in doc["runs"]] == [("ntp", 0), ("lse-mtp", 0), ("ntp", 1), ("lse-mtp", 1)]
    assert {r["k"] for r in doc["runs"] if r["method"] == "lse-mtp"} == {2}
    assert all(r["steps"] == 4 for r in doc["runs"])
    # the summary is the mean and t-interval of the per-run values
    metric = next(iter(doc["runs"][0]["metrics"]))
    values = [r["metrics"][metric] for r in doc["runs"] if r["method"] == "ntp"]
    assert doc["summary"]["ntp"][metric]["mean"] == pytest.approx(np.mean(values))
    assert doc["summary"]["ntp"][metric]["ci95"] == pytest.approx(
        12.7062 * np.std(values, ddof=1) / math.sqrt(2), rel=1e-4, abs=1e-12)
    report = (out / "report.md").read_text()
    assert "| metric | NTP | LSE-MTP |" in report and "## The paper's findings" in report
    assert "## Convergence" in report and "- NTP: held-out ce_1 " in report
    assert all(math.isfinite(r["metrics"]["heldout_ce_1"]) for r in doc["runs"])
    assert f"| {metric} |" in report and " ± " in report
    for png in ("plots/metrics.png", "plots/training.png"):
        assert f"]({png})" in report
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert all((out / "runs" / f"{m}-seed{s}" / "tensorboard").is_dir() for m in ("ntp", "lse-mtp") for s in (0, 1))
    assert len(result.runs) == 4

    # Resume: one run with a torn start (no checkpoint), one interrupted after its checkpoint, one trained but
    # not evaluated, one complete.
    lost, interrupted, unevaluated, kept = (out / "runs" / n for n in
                                            ("ntp-seed1", "lse-mtp-seed1", "ntp-seed0", "lse-mtp-seed0"))
    import shutil

    for item in lost.iterdir():
        if item.name != "metrics.jsonl":
            shutil.rmtree(item) if item.is_dir() else item.unlink()
    shutil.rmtree(interrupted / "model")
    (interrupted / "eval.json").unlink()
    (unevaluated / "eval.json").unlink()
    assert [run_state(d) for d in (lost, interrupted, unevaluated, kept)] == ["new", "interrupted", "trained",
                                                                             "complete"]
    kept_eval = (kept / "eval.json").read_bytes()
    unevaluated_metrics = (unevaluated / "metrics.jsonl").read_bytes()
    capsys.readouterr()
    reproduce(str(tiny_world), ["ntp", "lse-mtp"], 2, TINY, out, k=2, nproc=1, resume=True)
    log = capsys.readouterr().out
    assert "lse-mtp-seed0: complete, skipped" in log and "ntp-seed1: training" in log
    assert "lse-mtp-seed1: resuming" in log and "ntp-seed0: training" not in log
    assert (kept / "eval.json").read_bytes() == kept_eval
    assert (unevaluated / "metrics.jsonl").read_bytes() == unevaluated_metrics
    assert all(run_state(d) == "complete" for d in (lost, interrupted, unevaluated, kept))
    doc2 = json.loads((out / "results.json").read_text())
    assert len(doc2["runs"]) == 4 and doc2["summary"]["lse-mtp"] == doc["summary"]["lse-mtp"]


def _one_line_exit_2(capsys, argv, message):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize("extra, message", [
    (["--methods", "ntp,gpt"], "unknown method(s) gpt"),
    (["--seeds", "0"], "--seeds must be at least 1"),
    (["--k", "1"], "--k must be at least 2"),
    (["--scale", "huge"], "unknown scale 'huge'"),
    (["model.mtp_k=3"], "reproduce sets model.mtp_k itself"),
    (["train.max_stepz=3"], "unknown field in train: max_stepz"),
])
def test_bad_options_exit_2_and_write_nothing(tmp_path, tiny_world, capsys, extra, message):
    out = tmp_path / "out"
    _one_line_exit_2(capsys, ["reproduce", "--world", str(tiny_world), "--out", str(out), *extra], message)
    assert not out.exists()


def test_bad_world_exits_2(tmp_path, capsys):
    _one_line_exit_2(capsys, ["reproduce", "--world", "moon", "--out", str(tmp_path / "o")], "unknown world 'moon'")
    _one_line_exit_2(capsys, ["reproduce", "--world", str(tmp_path), "--out", str(tmp_path / "o")],
                     "not a world directory")
    _one_line_exit_2(capsys, ["reproduce", "--world", f"edges:{tmp_path / 'none.tsv'}", "--out", str(tmp_path / "o")],
                     "none.tsv")
    assert not (tmp_path / "o").exists()


def test_existing_out_is_not_overwritten(tmp_path, tiny_world, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    argv = ["reproduce", "--world", str(tiny_world), "--out", str(out)]
    _one_line_exit_2(capsys, argv, "already exists: pass --resume")
    _one_line_exit_2(capsys, [*argv, "--resume"], "is not a reproduce directory")
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"


def test_resume_with_other_settings_is_refused(tmp_path, tiny_world, capsys):
    out = tmp_path / "out"
    out.mkdir()
    settings = {"world": str(tiny_world.resolve()), "world_seed": 0, "scale": {"name": "paper"}, "k": 4,
                "nproc": 1, "overrides": [], "methods": ["ntp"], "seeds": 1}
    (out / "reproduce.json").write_text(json.dumps(settings))
    _one_line_exit_2(capsys, ["reproduce", "--world", str(tiny_world), "--out", str(out), "--resume", "--k", "3"],
                     "different settings (k, scale)")
    assert json.loads((out / "reproduce.json").read_text()) == settings


def test_help_lists_reproduce(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0 and "reproduce" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["reproduce", "--help"])
    assert exit_info.value.code == 0 and "--resume" in capsys.readouterr().out
