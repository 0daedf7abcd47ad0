"""The policy's forward, shared by the rollout and the trainer.

- `forward`: `sequence_logprobs` (the differentiable log-probs the RL loss uses) and `sequence_block_input`;
- `decoder`: `LeanDecoder`, the rollout's prefill and decode steps for Llama-family models;
- `support`: which models those lean paths reproduce, verified once per model (`forward_path` says which
  forward runs, and why);
- `ops`: the shared math (masks, positions, RMSNorm, the measured-kernel linear);
- `kernels`: the CPU matmul kernel chosen per shape by timing both on the running machine;
- `fused`, `fused_ops`: compiled C++ kernels (the decoder's one-token step; the training forward's norms,
  q/k/v post-processing and SwiGLU with their backward), each used where it is built, checked against the
  torch ops and measured faster.
"""

from onelayer.policy.forward import lean_sequence_logprobs, sequence_block_input, sequence_logprobs
from onelayer.policy.support import forward_path, lean_available, lean_support

__all__ = ["forward_path", "lean_available", "lean_sequence_logprobs", "lean_support", "sequence_block_input",
           "sequence_logprobs"]
