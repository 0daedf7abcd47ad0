"""`onelayer probe`: probe scores, their cost, the files recipes read, and the validation statistics."""

import json

import numpy as np
import pytest

from helpers import source_sweep
from onelayer.cli import main
from onelayer.config import ConfigError
from onelayer.models.layer_spec import parse_layer_spec
from onelayer.probe import rank_agreement, ranks, validate_against


def test_ranks_put_the_highest_score_first_and_break_ties_by_layer():
    assert ranks([0.1, 0.5, 0.5, 0.2]) == [4, 1, 2, 3]


def test_rank_agreement_of_a_perfect_an_inverted_and_a_position_only_score():
    d = np.linspace(0, 1, 8)
    c = np.array([0.9, 0.5, 0.4, 0.3, 0.35, 0.2, 0.25, 0.1])
    same = rank_agreement(c * 2 + 1, c, d)
    assert same["rho"] == pytest.approx(1.0) and same["overlap"] == 3 and same["rho_ci"][1] == pytest.approx(1.0)
    assert same["rho_detrended"] == pytest.approx(1.0)
    assert rank_agreement(-c, c, d)["rho"] == pytest.approx(-1.0) and rank_agreement(-c, c, d)["overlap"] == 0
    null = rank_agreement(-(d - 0.5) ** 2, c, d)
    assert np.isnan(null["rho_detrended"])  # nothing is left of a depth-only score once depth is regressed out
    assert same["overlap_chance"] == pytest.approx(9 / 8)


def test_validation_refuses_a_sweep_of_another_model(tmp_path):
    (tmp_path / "contributions.csv").write_text("condition,layer,contribution\nc,0,0.5\nc,1,0.2\n")
    with pytest.raises(ConfigError, match="layers \\[0, 1\\].*has 8"):
        validate_against({"p": {"scores": [0.0] * 8}}, tmp_path, 8)
    with pytest.raises(ConfigError, match="no contributions.csv"):
        validate_against({}, tmp_path / "nope", 8)


@pytest.mark.slow
def test_gradient_and_activation_probes_rank_every_layer_within_budget(base_dir, tmp_path):
    out = tmp_path / "probe"
    assert main(["probe", "--out", str(out), "--probes", "grad_norm,adam_step,block_influence", "--batches", "2",
                 "--threads", "1"]) == 0
    rec = json.loads((out / "probe.json").read_text())
    assert rec["num_layers"] == 8 and rec["sweep_flops"] > 0
    for name, r in rec["probes"].items():
        assert sorted(r["ranks"]) == list(range(1, 9)) and all(np.isfinite(r["scores"]))
        assert 0 < r["fraction"] <= 0.1 and r["within_budget"], name
        # the recipes read a probe's ranking like a sweep's contributions
        top = parse_layer_spec(f"top:3@{out / f'probe_{name}.csv'}", 8)
        assert top == sorted(i for i in range(8) if r["ranks"][i] <= 3)
    assert rec["probes"]["grad_norm"]["scores"] != rec["probes"]["block_influence"]["scores"]
    assert (out / "probe.csv").read_text().startswith("probe,layer,relative_depth,score,rank")


def test_unknown_probe_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["probe", "--out", str(tmp_path), "--probes", "tea_leaves"]) == 2
    assert "unknown probe" in capsys.readouterr().err


@pytest.mark.slow
def test_validation_trains_only_bk_on_each_ranking_and_shares_runs_between_equal_picks(base_dir, tmp_path, capsys):
    src = source_sweep(tmp_path / "sweep")  # its C_l rank blocks 0,1 first; Mid-2 is 3,4
    out = tmp_path / "probe"
    args = ["probe", "--out", str(out), "--probes", "grad_norm,block_influence", "--batches", "1", "--threads", "1",
            "--validate", str(src), "--recipe-k", "2", "--recipe-seeds", "0"]
    assert main(args) == 0
    rec = json.loads((out / "probe.json").read_text())["validation"]
    assert set(rec) == {"grad_norm", "block_influence", "position (inverted U)", "sweep C_l"}
    assert rec["sweep C_l"]["recipe"]["blocks"] == "0,1" and rec["position (inverted U)"]["recipe"]["blocks"] == "3,4"
    for name, r in rec.items():
        got = r["recipe"]
        assert got["k"] == 2 and len(got["blocks"].split(",")) == 2 and got["n_seeds"] == 1, name
        assert 0 <= got["score"] <= 1 and got["delta_vs_full"] == pytest.approx(got["score"] - got["full_score"])
    picks = {r["recipe"]["blocks"] for r in rec.values()}
    jobs = sorted(p.name for p in (out / "recipes" / "jobs").iterdir())
    assert len(jobs) == 1 + len(picks)  # full, and one job per distinct block set
    # another store's finished job with the same config is copied, not rerun
    other = tmp_path / "other"
    (other / "jobs").mkdir(parents=True)
    full = next(j for j in jobs if "-full-" in j)
    (out / "recipes" / "jobs" / full).rename(other / "jobs" / full.replace("-full-", "-renamed-"))
    capsys.readouterr()
    assert main(args + ["--reuse", str(other)]) == 0
    assert (out / "recipes" / "jobs" / full / "eval.json").is_file()
    assert "1 job(s) already done" in capsys.readouterr().out
