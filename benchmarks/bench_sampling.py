"""Speed of `onelayer.rollout.sample` against `model.generate` on the built-in-sized tiny Qwen3.

Both sample exactly `--new` tokens (EOS stopping off in both) for 16 prompts x G=4 = 64 sequences with the
same temperature / top-p, on `--threads` CPU threads. Prints median wall time over `--reps` runs.

    PYTHONPATH=src python benchmarks/bench_sampling.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, Qwen3Config

from onelayer.rollout import sample


def build_model(device: str = "cpu"):
    cfg = Qwen3Config(
        hidden_size=128, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        intermediate_size=512, vocab_size=100, pad_token_id=0, eos_token_id=1, bos_token_id=None,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).to(device).eval()


def timed(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--G", type=int, default=4)
    ap.add_argument("--new", type=int, default=24)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    model = build_model(args.device)
    g = torch.Generator().manual_seed(1)
    prompts = [
        torch.randint(2, 100, (int(torch.randint(6, 41, (1,), generator=g)),), generator=g).tolist()
        for _ in range(args.prompts)
    ]

    def ours():
        return sample(
            model, prompts, num_generations=args.G, max_new_tokens=args.new, temperature=args.temperature,
            top_p=args.top_p, eos_id=-1, pad_id=0,
        )

    # generate gets the same left-padded, G-times repeated batch that `sample` builds internally.
    P = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (P - len(p)) + p for p in prompts]).repeat_interleave(args.G, 0).to(args.device)
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts]).repeat_interleave(args.G, 0)
    mask = mask.to(args.device)

    def hf():
        with torch.inference_mode():
            return model.generate(
                input_ids=ids, attention_mask=mask, do_sample=True, temperature=args.temperature, top_p=args.top_p,
                top_k=None, max_new_tokens=args.new, min_new_tokens=args.new, eos_token_id=None, pad_token_id=0,
            )

    assert ours().completion_ids.shape == (args.prompts * args.G, args.new)
    assert hf().shape == (args.prompts * args.G, P + args.new)
    t_ours, t_hf = timed(ours, args.reps), timed(hf, args.reps)
    print(f"{args.prompts}x{args.G} sequences, {args.new} new tokens, prompts {min(map(len, prompts))}-{P} tokens, "
          f"{args.threads} threads, device {args.device}")
    print(f"onelayer.sample : {t_ours * 1000:8.1f} ms (median of {args.reps})")
    print(f"model.generate  : {t_hf * 1000:8.1f} ms (median of {args.reps})")
    print(f"speed-up        : {t_hf / t_ours:8.2f}x")


if __name__ == "__main__":
    main()
