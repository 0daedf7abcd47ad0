"""`onelayer compare` on hand-built contribution profiles with known rank correlations."""

import json

import pytest

from onelayer.cli import main


def write_profile(d, values, condition="m/arith/grpo"):
    d.mkdir(parents=True)
    n = len(values)
    rows = [f"{condition},{i},{i / (n - 1)},{v},0,0" for i, v in enumerate(values)]
    (d / "contributions.csv").write_text("condition,layer,relative_depth,contribution,ci_low,ci_high\n" + "\n".join(rows) + "\n")


def test_compare_across_sweeps(tmp_path, capsys):
    up = [0.1, 0.2, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9]
    write_profile(tmp_path / "a", up)
    write_profile(tmp_path / "b", [2 * v for v in up])  # same ranking
    write_profile(tmp_path / "c", up[::-1])  # reversed
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "c"),
                 "--json", str(tmp_path / "r.json")]) == 0
    res = json.loads((tmp_path / "r.json").read_text())
    names = res["names"]
    assert names == ["a:m/arith/grpo", "b:m/arith/grpo", "c:m/arith/grpo"]
    assert res["spearman"][0][1] == pytest.approx(1.0) and res["kendall"][0][1] == pytest.approx(1.0)
    assert res["spearman_p"][0][1] < 0.01
    assert res["spearman"][0][2] == pytest.approx(-1.0) and res["kendall"][0][2] == pytest.approx(-1.0)
    assert "spearman" in capsys.readouterr().out


def test_compare_errors_are_one_line(tmp_path, capsys):
    write_profile(tmp_path / "a", [0.1, 0.5, 0.2])
    assert main(["compare", str(tmp_path / "a")]) == 2
    assert "need at least two contribution profiles" in capsys.readouterr().err
    assert main(["compare", str(tmp_path / "missing"), str(tmp_path / "a")]) == 2
    assert "has no contributions.csv" in capsys.readouterr().err
