"""Rollout: batched sampling with a KV cache and the log-probs the RL loss uses."""

from onelayer.rollout.sampling import (
    RolloutBatch, decode_completions, encode_prompts, left_pad, sample, sample_texts, sequence_block_input,
    sequence_logprobs, stop_token_ids, truncate_at_stops,
)

__all__ = ["RolloutBatch", "decode_completions", "encode_prompts", "left_pad", "sample", "sample_texts",
           "sequence_block_input", "sequence_logprobs", "stop_token_ids", "truncate_at_stops"]
