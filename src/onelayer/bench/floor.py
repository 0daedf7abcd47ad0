"""The benchmark's FLOP floor: one RL step's matmul FLOPs and this machine's matmul rate.

The floor is the step's matrix-multiply FLOPs (rollout with a KV cache, forward and backward of the
update; see `step_flops`) divided by the rate this machine measures for a 64 x H x I matmul, the shape of
one decode step's MLP — what a step would take with no overhead at all at that rate. Each kernel
onelayer's lean paths choose from is measured (`matmul_gflops`): torch's default `a @ b`, oneDNN's linear
and the column split over threads, where available; the floor takes the fastest, so onelayer is not measured
against a floor its own kernels beat.
"""

from __future__ import annotations

import statistics
import time

import torch

from onelayer.policy import fused, kernels


def model_shape(config) -> dict:
    """The dimensions the FLOP count needs: hidden H, intermediate I, vocab V, blocks L and the attention sizes."""
    from onelayer.models.plan import block_shape

    b = block_shape(config)
    return dict(H=b["hidden"], I=b["intermediate"], V=b["vocab"], L=config.num_hidden_layers, q=b["q"], kv=b["kv"],
                heads=b["q"] // b["head_dim"], head_dim=b["head_dim"])


def step_flops(config, *, prompt_lens: list[int], num_generations: int, new_tokens: int,
               lowest_trainable: int, trainable_blocks: int, train_head: bool, parts: bool = False) -> dict:
    """Matrix-multiply FLOPs (2 per multiply-add) of one RL step, by phase.

    rollout: each distinct prompt prefilled once (left-padded to the longest), then one token per row for
    `new_tokens - 1` decode steps against a KV cache, with the LM head on one position per row per step.
    update: one forward over the whole batch (prompt + completion, every row's own prompt: the work of a
    tool that shares nothing between rows, so onelayer's prompt sharing can run below it) from block
    `lowest_trainable` up (the
    blocks below are frozen and their outputs known), the LM head on the completion positions, and the
    backward: input gradients through the head and every block on the gradient path (the lowest trainable
    one and all above it; attention backward counted as twice its forward), weight gradients for the
    trainable blocks and the head when it trains. Norms, activations, softmax and the optimizer are not
    matmuls and not counted. `parts=True` adds the linear / attention split of each phase.
    """
    s = model_shape(config)
    H, inter, V, L = s["H"], s["I"], s["V"], s["L"]
    linear = H * (s["q"] + 2 * s["kv"]) + s["q"] * H + 3 * H * inter  # MACs per token per block
    attn = lambda ctx: 2 * s["heads"] * s["head_dim"] * ctx  # noqa: E731 - QK^T and AV, MACs per query token
    N, G, T = len(prompt_lens), num_generations, new_tokens
    P = max(prompt_lens)
    B, S = N * G, P + T
    head = H * V

    roll_lin = N * P * L * linear + N * head + B * (T - 1) * (L * linear + head)
    roll_att = N * L * sum(attn(i + 1) for i in range(P)) + B * L * sum(attn(P + t + 1) for t in range(1, T))
    run = L - lowest_trainable
    causal = sum(attn(i + 1) for i in range(S))  # attention MACs of one causal sequence through one block
    upd_lin = (B * S * run * linear + B * T * head  # forward
               + B * S * run * linear + B * T * head  # input gradients
               + B * S * trainable_blocks * linear + (B * T * head if train_head else 0))  # weight gradients
    upd_att = B * run * causal * 3  # forward + backward
    out = {"rollout": 2 * (roll_lin + roll_att), "update": 2 * (upd_lin + upd_att)}
    out["total"] = out["rollout"] + out["update"]
    if parts:
        out.update(rollout_linear=2 * roll_lin, rollout_attention=2 * roll_att, update_linear=2 * upd_lin,
                   update_attention=2 * upd_att)
    return out


def matmul_gflops(m: int, k: int, n: int, *, reps: int = 200, device: str = "cpu", kernel: str = "torch") -> float:
    """Median rate (GFLOP/s) of an [m, k] x [k, n] float32 matmul, timed in batches of `reps`.

    kernel "torch": `a @ b` (torch's default CPU GEMM, MKL in these builds); "onednn" and "split": the other
    kernels onelayer's lean paths choose from (`onelayer.policy.kernels`); "packed": the compiled decode
    step's own GEMM on a weight packed beforehand (`policy.fused`). Torch's where one is unavailable."""
    a, w = torch.randn(m, k, device=device), torch.randn(n, k, device=device)
    wt = w.t().contiguous()
    other = kernel in ("onednn", "split") and kernel in kernels.available() and device == "cpu"
    fn = (lambda: kernels.run(kernel, a, w)) if other else (lambda: a @ wt)
    module = fused.extension() if kernel == "packed" and device == "cpu" else None
    if module is not None:
        packed, empty = module.pack_weight(w), torch.empty(0)
        fn = lambda: module.packed_linear(a, packed, n, empty, empty)  # noqa: E731
    with torch.inference_mode():
        for _ in range(10):
            fn()
        rates = []
        for _ in range(7):
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            if device != "cpu":
                torch.cuda.synchronize()
            rates.append(2 * m * k * n * reps / (time.perf_counter() - t0) / 1e9)
    return statistics.median(rates)
