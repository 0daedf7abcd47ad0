"""Rollout: batched sampling with a KV cache (`sampling`), multi-turn episodes (`episodes`), and the batch
they hand the trainer (`batch`). The log-probs the RL loss recomputes live in `onelayer.policy`."""

from onelayer.rollout.batch import RolloutBatch, left_pad
from onelayer.rollout.sampling import (
    decode_completions,
    encode_prompts,
    sample,
    sample_texts,
    stop_token_ids,
    truncate_at_stops,
)

__all__ = ["RolloutBatch", "decode_completions", "encode_prompts", "left_pad", "sample", "sample_texts",
           "stop_token_ids", "truncate_at_stops"]
