"""Mixed precision that keeps every update: fp32 trainable tensors and AdamW state, smaller frozen tensors,
forwards under autocast.

AdamW run directly on bf16 weights loses most small updates: bf16 resolves only about |w|/256, so at
the learning rates RL uses (TRL's GRPO default is 1e-6) an update rounds away. As in TRL and verl, the
trainable tensors (and so the optimizer's moments) stay float32 whatever the compute dtype; frozen
tensors, which never change, may be stored in bfloat16 or float16 to save memory (``frozen_dtype``).
With a half-precision compute dtype every forward runs under ``torch.autocast``; the log-probs are
always taken from float32 logits.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Precision:
    compute: torch.dtype = torch.float32  # autocast dtype of the forwards (float32: no autocast)
    frozen: torch.dtype = torch.float32  # storage dtype of frozen tensors
    device_type: str = "cpu"

    @classmethod
    def from_config(cls, dtype: str, frozen_dtype: str | None, device: str) -> Precision:
        return cls(DTYPES[dtype], DTYPES[frozen_dtype or dtype], torch.device(device).type)

    @property
    def mixed(self) -> bool:
        return self.compute != torch.float32

    def autocast(self):
        """The context every forward runs in: autocast to the compute dtype, or nothing for float32."""
        if not self.mixed:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.compute)

    def apply(self, model: torch.nn.Module) -> None:
        """Trainable parameters to float32, frozen ones to the frozen dtype (after layer selection, before
        the optimizer is built). Tied tensors stay tied: each Parameter object is cast once."""
        for p in model.parameters():
            want = torch.float32 if p.requires_grad else self.frozen
            if p.dtype != want and p.is_floating_point():
                p.data = p.data.to(want)

    def describe(self) -> str:
        if not self.mixed:
            return "float32"
        return (f"mixed: autocast {str(self.compute).split('.')[-1]}, trainable tensors and AdamW state float32, "
                f"frozen tensors {str(self.frozen).split('.')[-1]}")
