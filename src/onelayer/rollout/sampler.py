"""The sampler protocol the trainer drives, and onelayer's own sampler.

A sampler is called like `rollout.sample` (model, prompt token ids, keyword settings) and returns a
`RolloutBatch`. Before each rollout the trainer calls `sync_weights(model)`, so a sampler that holds its own
copy of the weights (a vLLM engine) can take the updated trainable tensors; `captures_hidden_states` says
whether it can hand out the hidden states entering a block (frozen-prefix reuse), or the trainer computes
them once per batch itself.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from onelayer.rollout.batch import RolloutBatch
from onelayer.rollout.sampling import sample


@runtime_checkable
class Sampler(Protocol):
    captures_hidden_states: bool

    def __call__(self, model, prompts: list[list[int]], **kwargs) -> RolloutBatch: ...

    def sync_weights(self, model) -> int: ...


class LocalSampler:
    """`rollout.sample` on the policy itself: it shares the policy's weights, so there is nothing to sync."""

    captures_hidden_states = True

    def __call__(self, model, prompts: list[list[int]], **kwargs) -> RolloutBatch:
        return sample(model, prompts, **kwargs)

    def sync_weights(self, model) -> int:
        return 0
