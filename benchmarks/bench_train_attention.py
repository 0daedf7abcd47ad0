"""The training forward's attention, compiled kernel against the torch ops, forward + backward, in one process.

Both take q [tokens, h, d], k and v [tokens, kvh, d] in the lean forward's flat layout (16 distinct prompts
of 6 tokens, then 64 rows of 23 completion positions: `onelayer bench`'s batch) and return [tokens, h d];
the torch ops are two SDPA calls over sliced, index-selected and concatenated keys (`TorchOps.attention`),
the compiled kernel reads the keys where they are (`CompiledOps.attention`). Runs alternate pair by pair
so the machine's drift hits both alike; prints each one's median and the per-pair ratio's median and
quartiles, for tiny-qwen3's and tiny-qwen3-large's head shapes.

    python benchmarks/bench_train_attention.py --threads 2 --pairs 100
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from onelayer.policy import fused
from onelayer.policy.fused_ops import CompiledOps, SharedPrompts, TorchOps
from onelayer.policy.kernels import cpu_model
from onelayer.train import allocator

SHAPES = {"tiny-qwen3": (4, 2, 32), "tiny-qwen3-large": (4, 2, 64)}  # heads, kv heads, head_dim


def case(h: int, kvh: int, d: int, N: int = 16, P: int = 6, G: int = 4, Tc: int = 23):
    g = torch.Generator().manual_seed(0)
    R = N * P + N * G * Tc
    layout = SharedPrompts(torch.ones(N, P, dtype=torch.bool), torch.arange(N).repeat_interleave(G), Tc)
    q, k, v = (torch.randn(R, n, d, generator=g, requires_grad=True) for n in (h, kvh, kvh))
    weight = torch.randn(R, h * d, generator=g)

    def run(ops) -> float:
        t0 = time.perf_counter()
        out = ops.attention(q, k, v, layout)
        torch.autograd.grad((out * weight).sum(), (q, k, v))
        return time.perf_counter() - t0

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=100)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    allocator.configure("retain")  # as a training run has it
    if fused.extension() is None:
        raise SystemExit(f"the compiled module is not available: {fused.build_note()}")
    print(f"cpu: {cpu_model()}, torch {torch.__version__}, {args.threads} threads, {args.pairs} alternating pairs")
    for name, shape in SHAPES.items():
        run = case(*shape)
        for _ in range(3):
            run(TorchOps), run(CompiledOps)
        torch_s, compiled_s = [], []
        for i in range(args.pairs):
            order = (TorchOps, CompiledOps) if i % 2 == 0 else (CompiledOps, TorchOps)
            got = {ops.name: run(ops) for ops in order}
            torch_s.append(got["torch"])
            compiled_s.append(got["compiled"])
        ratios = sorted(c / t for c, t in zip(compiled_s, torch_s))
        q1, med, q3 = statistics.quantiles(ratios, n=4)
        print(f"{name} (h {shape[0]}, kvh {shape[1]}, d {shape[2]}): torch {statistics.median(torch_s) * 1e3:.3f} ms, "
              f"compiled {statistics.median(compiled_s) * 1e3:.3f} ms, compiled / torch per pair {med:.3f} [{q1:.3f}, {q3:.3f}]")


if __name__ == "__main__":
    main()
