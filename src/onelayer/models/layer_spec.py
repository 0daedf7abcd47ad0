"""Layer specs: the grammar that names decoder blocks, parsed into sorted block indices, and run-name labels.

Layer spec grammar (comma-separated items, whitespace ignored, keywords case-insensitive)::

    all           every block                 none          no block (base model)
    7             block 7                     -1            the last block (negatives count from the end)
    2-5           blocks 2,3,4,5 (inclusive)  3,5 / 0,-1 / 1,3-4   any mix of index and range items
    middle:k      the k centre blocks: start = (L - k) // 2, i.e. blocks start .. start+k-1
                  (L=8,k=1 -> [3]; L=8,k=2 -> [3,4]; L=7,k=1 -> [3]; L=7,k=2 -> [2,3])
    top:k@FILE    the k blocks with the highest mean contribution in a contributions CSV
                  (FILE must not contain a comma)
    bottom:k@FILE the k blocks with the lowest mean contribution (the worst-k control)
    random:k      k blocks drawn at random, seeded: random:k@SEED (default seed 0) is the same draw
                  on every machine, so a sweep can ask for several draws (random:3@0, random:3@1, ...)

`all` and `none` stand alone. The result is always sorted, unique and within [0, L).
"""

from __future__ import annotations

import csv
import math
import random
import re
from collections import defaultdict
from pathlib import Path

GRAMMAR = (
    "all | none | N | -N | A-B | middle:K | top:K@FILE | bottom:K@FILE | random:K[@SEED], with index/range "
    "items combinable by commas (e.g. '7', '3,5', '2-5', '-1', '0,-1', '1,3-4', 'middle:2', "
    "'top:3@contributions.csv', 'random:3@1')"
)


class LayerSpecError(ValueError):
    """A layer spec or block path that does not fit the model; the message names the value and layer count."""


# ---------------------------------------------------------------------------------------------
# Spec parsing


def _spec_error(spec: str, num_layers: int, problem: str, grammar: bool = False) -> LayerSpecError:
    msg = f"layer spec {spec!r}: {problem}; this model has {num_layers} layers"
    if grammar:
        msg += f". Layer specs are: {GRAMMAR}"
    return LayerSpecError(msg)


def _index(spec: str, value: int, num_layers: int) -> int:
    """Map a possibly negative index into [0, L), or raise naming the valid ranges."""
    if -num_layers <= value < num_layers:
        return value % num_layers
    raise LayerSpecError(
        f"layer spec {spec!r}: index {value} is out of range; this model has {num_layers} layers "
        f"(valid indices 0..{num_layers - 1}, or -{num_layers}..-1)"
    )


def _check_k(spec: str, k: int, num_layers: int) -> None:
    if not 1 <= k <= num_layers:
        raise _spec_error(spec, num_layers, f"k={k} is out of range (need 1 <= k <= {num_layers})")


def middle_layers(k: int, num_layers: int) -> list[int]:
    """The k centre blocks: start = (L - k) // 2, so an off-centre choice leans toward the input."""
    start = (num_layers - k) // 2
    return list(range(start, start + k))


def _read_contributions(spec: str, path: Path, num_layers: int) -> dict[int, float]:
    """Mean contribution per layer from a CSV with columns `layer`, `contribution` (and maybe `condition`).

    With a `condition` column each condition is averaged first, then layers are averaged over the
    conditions they appear in, so a condition with more rows (e.g. seeds) does not dominate. Rows whose
    `layer` is not an integer (e.g. 'full', 'base') or whose contribution is empty/NaN are skipped.
    """
    if not path.is_file():
        raise _spec_error(spec, num_layers, f"contributions file {str(path)!r} does not exist")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in ("layer", "contribution") if c not in columns]
        if missing:
            raise _spec_error(
                spec, num_layers,
                f"contributions file {str(path)!r} lacks column(s) {', '.join(missing)} "
                f"(has: {', '.join(columns) or 'none'})",
            )
        per_condition: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
        for raw in reader:
            row = {(k or "").strip(): (v or "").strip() for k, v in raw.items()}
            try:
                layer_f = float(row["layer"])
                value = float(row["contribution"])
            except ValueError:
                continue
            if not layer_f.is_integer() or math.isnan(value):
                continue
            layer = int(layer_f)
            depth = row.get("relative_depth", "")
            implied = _implied_layers(layer, depth)
            if implied is not None and implied != num_layers:
                raise _spec_error(
                    spec, num_layers,
                    f"contributions file {str(path)!r} was measured on a model with {implied} layers "
                    f"(layer {layer} at relative depth {depth}); rank this model's layers with its own sweep",
                )
            if not 0 <= layer < num_layers:
                raise _spec_error(
                    spec, num_layers,
                    f"contributions file {str(path)!r} lists layer {layer}, which this model does not have "
                    f"(valid 0..{num_layers - 1}); was it measured on a different model?",
                )
            per_condition[row.get("condition", "")][layer].append(value)
    sums: dict[int, list[float]] = defaultdict(list)
    for layers in per_condition.values():
        for layer, values in layers.items():
            sums[layer].append(sum(values) / len(values))
    return {layer: sum(means) / len(means) for layer, means in sums.items()}


def _implied_layers(layer: int, depth: str) -> int | None:
    """The layer count a sweep's row implies: its last layer has `relative_depth` (layer / (L - 1)) 1."""
    try:
        return layer + 1 if float(depth) == 1.0 else None
    except ValueError:
        return None


def top_layers(spec: str, k: int, file: str, num_layers: int, worst: bool = False) -> list[int]:
    """The k layers with the highest (`worst`: lowest) mean contribution in FILE (ties: lower index first)."""
    _check_k(spec, k, num_layers)
    means = _read_contributions(spec, Path(file).expanduser(), num_layers)
    if len(means) < k:
        raise _spec_error(
            spec, num_layers, f"asked for {'bottom' if worst else 'top'} {k} but {file!r} ranks only "
                              f"{len(means)} layer(s)"
        )
    ranked = sorted(means, key=lambda layer: (means[layer] if worst else -means[layer], layer))
    return ranked[:k]


def random_layers(k: int, seed: int, num_layers: int) -> list[int]:
    """k distinct blocks drawn with a generator seeded by (seed, L): the same on every machine."""
    return sorted(random.Random(f"random-layers:{seed}:{num_layers}").sample(range(num_layers), k))


_INT = r"-?\d+"


def _parse_item(spec: str, item: str, num_layers: int) -> list[int]:
    """One comma-separated item: N, A-B, middle:K, top:K@FILE, bottom:K@FILE or random:K[@SEED]."""
    ranked = re.fullmatch(r"(?i)(top|bottom)\s*:\s*(\d+)\s*@\s*(.+)", item.strip())
    if ranked:
        return top_layers(spec, int(ranked.group(2)), ranked.group(3).strip(), num_layers,
                          worst=ranked.group(1).lower() == "bottom")
    compact = re.sub(r"\s+", "", item).lower()
    drawn = re.fullmatch(r"random:(\d+)(?:@(-?\d+))?", compact)
    if drawn:
        k = int(drawn.group(1))
        _check_k(spec, k, num_layers)
        return random_layers(k, int(drawn.group(2) or 0), num_layers)
    middle = re.fullmatch(r"middle:(\d+)", compact)
    if middle:
        k = int(middle.group(1))
        _check_k(spec, k, num_layers)
        return middle_layers(k, num_layers)
    if re.fullmatch(_INT, compact):
        return [_index(spec, int(compact), num_layers)]
    span = re.fullmatch(rf"({_INT})-({_INT})", compact)
    if span:
        lo = _index(spec, int(span.group(1)), num_layers)
        hi = _index(spec, int(span.group(2)), num_layers)
        if lo > hi:
            raise _spec_error(spec, num_layers, f"range {item.strip()!r} is empty (start {lo} > end {hi})")
        return list(range(lo, hi + 1))
    raise _spec_error(spec, num_layers, f"cannot parse {item.strip()!r}", grammar=True)


def parse_layer_spec(spec: str, num_layers: int) -> list[int]:
    """Parse a layer spec (see module docstring) into sorted unique block indices in [0, num_layers)."""
    if num_layers < 1:
        raise LayerSpecError(f"layer spec {spec!r}: the model has {num_layers} layers; nothing to select")
    if not isinstance(spec, str) or not spec.strip():
        raise _spec_error(str(spec), num_layers, "empty spec", grammar=True)
    keyword = spec.strip().lower()
    if keyword == "all":
        return list(range(num_layers))
    if keyword == "none":
        return []
    items = spec.split(",")
    selected: set[int] = set()
    for item in items:
        if not item.strip():
            raise _spec_error(spec, num_layers, "empty item between commas", grammar=True)
        if item.strip().lower() in ("all", "none"):
            raise _spec_error(spec, num_layers, f"{item.strip()!r} must stand alone", grammar=True)
        selected.update(_parse_item(spec, item, num_layers))
    return sorted(selected)


def describe_layers(indices: list[int], num_layers: int) -> str:
    """A short run-name label: 'all', 'none', 'L3', 'L2-5', 'L1,3', 'L1,3-4'."""
    indices = sorted(set(indices))
    if not indices:
        return "none"
    if indices == list(range(num_layers)):
        return "all"
    runs: list[str] = []
    start = prev = indices[0]
    for i in indices[1:] + [None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        runs.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return "L" + ",".join(runs)
