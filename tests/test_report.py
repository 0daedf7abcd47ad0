"""The HTML report and plots: self-contained, all four images, NOISE flag, partial stores."""

import csv
import json

from onelayer.analysis.report import PLOTS, build_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CONDS = ["tiny/arith/grpo", "tiny/arith/dr_grpo"]


def _write_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _results_rows():
    rows = []
    for cond in CONDS:
        algo = cond.split("/")[-1]
        for layers in ["none", "all", "0", "1", "2", "3"]:
            rows.append({"job_id": f"tiny-arith-{algo}-{layers}-s0", "condition": cond, "model": "tiny",
                         "task": "arith", "algo": algo, "seed": 0, "layers": layers, "status": "done",
                         "score": 0.5, "ci_low": 0.45, "ci_high": 0.55, "base_score": 0.3, "gain": 0.2})
    return rows


def _make_sweep(out):
    out.mkdir(parents=True, exist_ok=True)
    results = _results_rows()
    _write_csv(out / "results.csv", results)
    contrib = []
    for k, cond in enumerate(CONDS):
        for layer, c in enumerate([0.1, 0.7 + 0.1 * k, 0.9, 0.2 - 0.3 * k]):
            contrib.append({"condition": cond, "layer": layer, "relative_depth": layer / 3, "contribution": c,
                            "ci_low": c - 0.2, "ci_high": c + 0.2, "score": 0.3 + 0.2 * c, "gain": 0.2 * c,
                            "base_score": 0.3, "full_score": 0.5, "n_items": 100, "n_seeds": 1})
    _write_csv(out / "contributions.csv", contrib)
    summary = {
        cond: {"full_gain": {"gain": 0.2 if k == 0 else 0.01, "ci_low": 0.1 if k == 0 else -0.03,
                             "ci_high": 0.3 if k == 0 else 0.05, "noise": k == 1, "base_score": 0.3,
                             "full_score": 0.5},
               "concentration": {"best_layer": 2, "best_recovery": 0.9, "n_layers_ge_0_8": 1, "top3_share": 0.8}}
        for k, cond in enumerate(CONDS)
    }
    (out / "summary.json").write_text(json.dumps(summary))
    for r in results[:6]:
        d = out / "jobs" / r["job_id"]
        d.mkdir(parents=True)
        lines = [json.dumps({"step": s, "reward_mean": 0.1 + 0.02 * s, "loss": 0.0}) for s in range(1, 13)]
        (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")
        (d / "eval.json").write_text(json.dumps({"layers": r["layers"], "seed": 0, "model": "tiny",
                                                 "task": "arith", "algo": r["algo"], "score": 0.5}))
    return out


def test_full_report(tmp_path):
    out = _make_sweep(tmp_path / "sweep")
    path = build_report(out)
    assert path == out / "report.html" and path.is_file()
    text = path.read_text()
    assert "http://" not in text and "https://" not in text and "<script src" not in text
    assert text.count("data:image/png;base64,") == 4
    for cond in CONDS:
        assert cond in text
    assert "NOISE" in text
    assert "Spearman" in text and "Kendall" in text
    for name in PLOTS:
        png = out / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == PNG_MAGIC
    assert not list(out.rglob("*.tmp"))


def test_no_noise_warning_when_not_flagged(tmp_path):
    out = _make_sweep(tmp_path / "sweep")
    s = json.loads((out / "summary.json").read_text())
    for v in s.values():
        v["full_gain"]["noise"] = False
    (out / "summary.json").write_text(json.dumps(s))
    assert "NOISE" not in build_report(out).read_text()


def test_partial_store_only_results(tmp_path):
    out = tmp_path / "partial"
    out.mkdir()
    _write_csv(out / "results.csv", _results_rows()[:3])
    text = build_report(out).read_text()
    assert "contributions.csv" in text and "missing" in text.lower()
    assert text.count("data:image/png;base64,") == 4
    for name in PLOTS:
        assert (out / "plots" / f"{name}.png").read_bytes()[:8] == PNG_MAGIC


def test_empty_store(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    (out / "contributions.csv").write_text("")
    assert build_report(out).is_file()
