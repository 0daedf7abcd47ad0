"""Analysis of sweep results: layer contributions with bootstrap CIs, concentration, rank stability.

Reads only plain eval records (dicts); numpy/scipy only, no training code.
"""

from onelayer.analysis.contribution import (
    concentration,
    condition_key,
    contribution,
    contribution_profile,
    full_gain_summary,
    group_by_condition,
    layer_contributions,
)
from onelayer.analysis.ranks import (
    align_profiles,
    correlation_matrix,
    interpolate_profile,
    inverted_u_null,
    rank_correlation,
)

__all__ = [
    "align_profiles",
    "concentration",
    "condition_key",
    "contribution",
    "contribution_profile",
    "correlation_matrix",
    "full_gain_summary",
    "group_by_condition",
    "interpolate_profile",
    "inverted_u_null",
    "layer_contributions",
    "rank_correlation",
]
