"""`onelayer compare`: rank stability of layer-contribution profiles across sweeps and conditions."""

from __future__ import annotations

import csv
from pathlib import Path

from onelayer.analysis.ranks import correlation_matrix


class CompareError(ValueError):
    """A directory without a usable contributions.csv."""


def load_profiles(dirs: list[str | Path]) -> dict[str, tuple[list[float], list[float]]]:
    """One (relative depths, contributions) profile per condition of each sweep directory."""
    profiles: dict[str, tuple[list[float], list[float]]] = {}
    for d in dirs:
        path = Path(d) / "contributions.csv"
        if not path.is_file():
            raise CompareError(f"{str(d)!r} has no contributions.csv; "
                               f"run `onelayer sweep --out {d}` (or `onelayer report {d}`) first")
        with open(path) as fh:
            rows = list(csv.DictReader(fh))
        for row in rows:
            name = f"{Path(d).name}:{row['condition']}" if len(dirs) > 1 else row["condition"]
            depths, values = profiles.setdefault(name, ([], []))
            depths.append(float(row["relative_depth"]))
            values.append(float(row["contribution"]))
    if len(profiles) < 2:
        raise CompareError(f"need at least two contribution profiles to compare; "
                           f"found {len(profiles)} in {', '.join(map(str, dirs))}")
    return profiles


def compare(dirs: list[str | Path], *, n_perm: int = 2000, seed: int = 0) -> dict:
    return correlation_matrix(load_profiles(dirs), n_perm=n_perm, seed=seed)


def format_comparison(result: dict) -> str:
    names = result["names"]
    lines = [f"{'profile A':<40} {'profile B':<40} {'spearman':>9} {'p':>7} {'kendall':>8} {'p':>7}"]
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            lines.append(f"{names[i]:<40} {names[j]:<40} {result['spearman'][i][j]:>9.3f} {result['spearman_p'][i][j]:>7.4f} "
                         f"{result['kendall'][i][j]:>8.3f} {result['kendall_p'][i][j]:>7.4f}")
    lines.append("")
    lines.append("position-only null (inverted U over depth): spearman of each profile with its fitted null")
    lines += [f"  {n:<40} {result['null_rho'][n]:>7.3f}" for n in names]
    return "\n".join(lines)
