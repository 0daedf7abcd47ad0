"""Majority votes over several models' (or samples') answers, and the ensemble table.

A vote is taken per eval item over the voters' answers (`Task.answer`): the most common answer wins; a tie
goes to the tied answer given first in voter order (the highest-ranked layer model, or the first sample);
"" is no answer and does not vote (an item where nobody answered takes the first voter's score). The vote's
score on the item is the score of the first voter that gave the winning answer: two completions with the
same answer score the same, so any of them would do.

Each table row compares the vote with one method on the same eval items: its score with a CI, and
vote − method with a paired CI (items resampled jointly, so item difficulty cancels). A method run on
several seeds (full RL, its self-consistency vote) is their mean, with seeds resampled too
(`onelayer.stats.paired_seed_item_bootstrap_ci`); a single run uses the items-only bootstrap. The vote is
one set of layer models (one seed each), so its own seed-to-seed variation is not in the CIs.
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from onelayer.io import atomic_write_json, atomic_write_text
from onelayer.stats import bootstrap_ci, paired_bootstrap_ci, paired_seed_item_bootstrap_ci, seed_item_bootstrap_ci

NO_ANSWER = ""
ENSEMBLE_COLUMNS = ["k", "method", "layers", "seeds", "n_items", "score", "ci_low", "ci_high", "vote_minus",
                    "delta_ci_low", "delta_ci_high"]


def vote(answers: Sequence[str]) -> int:
    """Index of the voter whose answer wins: the most common answer other than "" (no answer); among tied
    answers, the one given first. 0 when nobody answered."""
    counts = Counter(a for a in answers if a != NO_ANSWER)
    if not counts:
        return 0
    top = max(counts.values())
    return next(i for i, a in enumerate(answers) if a != NO_ANSWER and counts[a] == top)


def _check_shape(answers: Sequence[Sequence], scores: Sequence[Sequence]) -> int:
    if not answers or len(answers) != len(scores):
        raise ValueError(f"a vote needs one answer list per voter and one score list per voter: got {len(answers)} "
                         f"and {len(scores)}")
    n = len(answers[0])
    if any(len(a) != n for a in answers) or any(len(s) != n for s in scores):
        raise ValueError("every voter needs an answer and a score for each of the same eval items")
    return n


def vote_scores(answers: Sequence[Sequence[str]], scores: Sequence[Sequence[float]]) -> list[float]:
    """Per item, the score of the voted answer. `answers` and `scores`: [voters][items], voters in tie-break
    order."""
    n = _check_shape(answers, scores)
    return [float(scores[vote([a[j] for a in answers])][j]) for j in range(n)]


def oracle_scores(scores: Sequence[Sequence[float]]) -> list[float]:
    """Per item, the best voter's score (the item counts as solved when any voter solved it)."""
    return [float(x) for x in np.max(np.asarray(scores, dtype=float), axis=0)]


def inconsistent_items(answers: Sequence[Sequence[str]], scores: Sequence[Sequence[float]]) -> int:
    """Items where two voters gave the same answer but got different scores (0 when `Task.answer` holds its
    promise)."""
    n = _check_shape(answers, scores)
    bad = 0
    for j in range(n):
        seen: dict[str, float] = {}
        for a, s in zip(answers, scores):
            if seen.setdefault(a[j], float(s[j])) != float(s[j]):
                bad += 1
                break
    return bad


def transpose(rows: Sequence[Sequence]) -> list[list]:
    """[items][samples] -> [samples][items] (a self-consistency vote's samples as voters)."""
    return [list(col) for col in zip(*rows)]


def comparison_row(k: int, method: str, layers: str, seeds: Sequence, scores, vote_: Sequence[float]) -> dict:
    """One table row: `method`'s per-item scores ([items], or [seeds][items] for its seed mean) with a CI, and
    the vote minus it with a paired CI."""
    x = np.atleast_2d(np.asarray(scores, dtype=float))
    v = np.asarray(vote_, dtype=float)
    if x.shape[0] == 1:
        ci, delta_ci = bootstrap_ci(x[0]), paired_bootstrap_ci(v, x[0])
    else:
        ci, delta_ci = seed_item_bootstrap_ci(x), paired_seed_item_bootstrap_ci(v[None, :], x)
    return {"k": k, "method": method, "layers": layers, "seeds": " ".join(map(str, seeds)), "n_items": x.shape[1],
            "score": float(x.mean()), "ci_low": ci[0], "ci_high": ci[1], "vote_minus": float(v.mean() - x.mean()),
            "delta_ci_low": delta_ci[0], "delta_ci_high": delta_ci[1]}


def self_consistency_scores(sample_answers: Sequence[Sequence[str]], sample_scores: Sequence[Sequence[float]],
                            k: int) -> list[float]:
    """Per item, the score of the vote of its first k samples (`sample_*`: [items][samples], in sampling order)."""
    return vote_scores(transpose([row[:k] for row in sample_answers]), transpose([row[:k] for row in sample_scores]))


def ensemble_rows(k: int, layers: list[int], layer_seed, answers, scores, full: dict,
                  self_consistency: dict) -> tuple[list[dict], dict]:
    """The table's rows for the vote of k layer models (`layers` in rank order, their `answers` and `scores`
    [voters][items], all on `layer_seed`) against full RL's and its self-consistency vote's per-item scores
    (`full`, `self_consistency`: seed -> [items]); and facts about the vote (inconsistent and unanswered items)."""
    voted = vote_scores(answers, scores)
    label = ",".join(map(str, layers))
    seeds = list(full)
    rows = [comparison_row(k, "vote", label, [layer_seed], voted, voted)]
    for name, by_seed in (("full", full), ("self-consistency", self_consistency)):
        rows.append(comparison_row(k, name, "all", seeds, [by_seed[s] for s in seeds], voted))
        rows += [comparison_row(k, f"{name}-s{s}", "all", [s], by_seed[s], voted) for s in seeds]
    rows += [comparison_row(k, "best-single", str(layers[0]), [layer_seed], scores[0], voted),
             comparison_row(k, "oracle", label, [layer_seed], oracle_scores(scores), voted)]
    rows += [comparison_row(k, f"layer-{layer}", str(layer), [layer_seed], x, voted) for layer, x in zip(layers, scores)]
    n = len(voted)
    info = {"layers": layers, "inconsistent_items": inconsistent_items(answers, scores),
            "no_answer_items": sum(all(a[j] == NO_ANSWER for a in answers) for j in range(n))}
    return rows, info


def write_ensemble(out: str | Path, rows: list[dict], record: dict) -> None:
    """OUT/ensemble.csv (the rows) and OUT/ensemble.json (`record` with the rows under 'rows')."""
    out = Path(out)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=ENSEMBLE_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "ensemble.csv", buf.getvalue())
    atomic_write_json(out / "ensemble.json", {**record, "rows": rows})


def format_ensemble(rows: list[dict]) -> str:
    """A plain-text table of ensemble.csv rows."""
    lines = [f"{'k':>2} {'method':<22} {'layers':<14} {'seeds':<5} {'score [95% CI]':<22} {'vote − it [95% CI]':<26}"]
    for r in rows:
        score = f"{r['score']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]"
        delta = "" if r["method"] == "vote" else (f"{r['vote_minus']:+.3f} [{r['delta_ci_low']:+.3f}, "
                                                  f"{r['delta_ci_high']:+.3f}]")
        lines.append(f"{r['k']:>2} {r['method']:<22} {r['layers']:<14} {r['seeds']:<5} {score:<22} {delta:<26}")
    return "\n".join(lines)
