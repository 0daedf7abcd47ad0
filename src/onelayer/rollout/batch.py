"""`RolloutBatch`, what a rollout hands the trainer, and the left padding of prompts."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class RolloutBatch:
    """Sampled completions, laid out for the RL loss.

    From one `sample` call, rows of one prompt are contiguous: prompt ``i``'s G samples are rows
    ``i*G .. i*G+G-1``. Merged agent turns (`rollout.episodes.merge_batches`) index rows by prompt content.
    ``T`` is the number of decode steps actually run: ``max_new_tokens``, or fewer if every row emitted EOS.
    """

    input_ids: torch.Tensor  # LongTensor[B, P+T]: left-padded prompt, completion, pad after EOS
    attention_mask: torch.Tensor  # LongTensor[B, P+T]: 1 on real prompt tokens and completion tokens up to EOS
    prompt_len: int  # P, the padded prompt width
    completion_ids: torch.Tensor  # LongTensor[B, T]
    completion_mask: torch.Tensor  # FloatTensor[B, T]: 1 up to and including EOS, 0 after
    logprobs: torch.Tensor  # FloatTensor[B, T]: log_softmax(logits / temperature) of sampled tokens; 0 off-mask
    completion_lengths: torch.Tensor  # LongTensor[B]
    prompt_index: torch.Tensor  # LongTensor[B]: which prompt each row has (equal index: equal prompt tokens)
    # hidden states entering block `block_index` at every position (frozen-prefix reuse); zeros at positions
    # never fed to the model (the last sampled token, a dropped row's padding). None unless asked for.
    block_input: torch.Tensor | None = None  # FloatTensor[B, P+T, H]
    block_index: int | None = None

    @classmethod
    def assemble(cls, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, tokens: torch.Tensor,
                 completion_mask: torch.Tensor, logprobs: torch.Tensor, num_generations: int,
                 block_input: torch.Tensor | None = None, block_index: int | None = None) -> RolloutBatch:
        """The batch of N left-padded prompts (`prompt_ids`, `prompt_mask` [N, P]) and their G completions each,
        prompt-major: `tokens` [N*G, T] (padded after EOS), bool `completion_mask` and `logprobs` [N*G, T]."""
        N, P = prompt_ids.shape
        G = num_generations
        return cls(
            input_ids=torch.cat([prompt_ids.repeat_interleave(G, 0), tokens], 1),
            attention_mask=torch.cat([prompt_mask.repeat_interleave(G, 0), completion_mask.long()], 1),
            prompt_len=P,
            completion_ids=tokens,
            completion_mask=completion_mask.float(),
            logprobs=logprobs,
            completion_lengths=completion_mask.sum(1),
            prompt_index=torch.arange(N, device=prompt_ids.device).repeat_interleave(G),
            block_input=block_input,
            block_index=block_index,
        )

    def map(self, fn) -> RolloutBatch:
        """The batch with `fn` applied to every tensor field (e.g. ``lambda t: t.to(device)``)."""
        return RolloutBatch(**{f.name: (fn(v) if torch.is_tensor(v := getattr(self, f.name)) else v)
                               for f in fields(self)})

    @property
    def num_generations(self) -> int:
        n_prompts = int(self.prompt_index[-1]) + 1 if len(self.prompt_index) else 1
        return len(self.prompt_index) // n_prompts


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token-id lists to one width. Returns (ids LongTensor[N, P], attention_mask LongTensor[N, P])."""
    if not prompts:
        raise ValueError("no prompts given")
    width = max(len(p) for p in prompts)
    if width == 0 or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.as_tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids, mask
