"""Rollout: batched sampling with a KV cache and the log-probs the RL loss uses."""

from onelayer.rollout.sampling import (
    RolloutBatch, decode_completions, encode_prompts, left_pad, sample, sequence_block_input, sequence_logprobs,
)

__all__ = ["RolloutBatch", "decode_completions", "encode_prompts", "left_pad", "sample", "sequence_block_input",
           "sequence_logprobs"]
