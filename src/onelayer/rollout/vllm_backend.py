"""Optional vLLM rollout backend for GPU machines, behind an import guard.

`VLLMSampler` draws completions with a vLLM engine living in the training process (TRL's "colocate"
mode) and returns the same `RolloutBatch` as `onelayer.rollout.sample`: left-padded prompts, completions
right-padded with `pad_id` after EOS, `completion_mask` 1 up to and including EOS, the G rows of prompt i
at ``i*G .. i*G+G-1``, `prompt_index`. Nothing here imports vLLM until a sampler is built, so onelayer
imports and runs without it; building one without vLLM or CUDA raises `ConfigError` (one line at the CLI).

Per RL step the trainer calls `sync_weights(model)` and then samples. `sync_weights` pushes only the
trainable tensors into the engine (for one-layer RL a few percent of the model), the way TRL's colocate
mode does, then drops vLLM's prefix cache, whose keys/values were computed with the old weights.

Log-probs. vLLM's default ``logprobs_mode="raw_logprobs"`` reports ``log_softmax(logits)`` *before*
temperature; the engine here is built with ``logprobs_mode="processed_logprobs"`` (as TRL does), which
reports the log-softmax of the logits vLLM actually samples from: after temperature and after top-k/top-p
masking (vLLM >= 0.10.2; in 0.10.0 "processed" still excluded temperature, see prime-rl PR #697, and TRL
PR #4163 switched to this mode and to vLLM 0.10.2 for that reason). So with ``top_p == 1`` they are
``log_softmax(logits / temperature)``, onelayer's convention, up to the engine's numerics (bf16 weights,
other kernels); with ``top_p < 1`` they are of the truncated, renormalised distribution, which is not.
Greedy rows (temperature 0) report ``log_softmax(logits)``, as `sample(greedy=True)` does.

The trainer uses ``batch.logprobs`` as ``old_logp`` in the clipped ratio. For exact ratios (the HF policy's
own numbers, onelayer's convention whatever top_p) keep ``recompute_logprobs=True`` (the default): after
sampling, the log-probs are recomputed with `sequence_logprobs` on the training model, one no-grad forward
over the batch. ``recompute_logprobs=False`` keeps vLLM's numbers, which is cheaper and fine when the
mismatch does not matter to you (e.g. top_p == 1 and float32/bfloat16 differences well inside epsilon).

Weight sync follows TRL (`trl/generation/vllm_generation.py`, ``VLLMGeneration.sync_weights`` for
non-PEFT, non-FSDP models in colocate mode; earlier `GRPOTrainer._move_model_to_vllm`):
``llm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights([(name, tensor)])``, then
``llm.reset_prefix_cache()``. That attribute path exists only when the engine runs in this process, which
TRL gets with ``distributed_executor_backend="external_launcher"`` plus the torch.distributed env variables;
the engine is built the same way here. vLLM's ``load_weights`` takes Hugging Face parameter names and
handles its fused layouts (q/k/v -> qkv_proj, gate/up -> gate_up_proj) itself.
"""

from __future__ import annotations

import importlib.util
import os
import socket
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from onelayer.policy import sequence_logprobs
from onelayer.rollout.batch import RolloutBatch, left_pad
from onelayer.rollout.sampling import check_sampling_args

__all__ = ["VLLM_MISSING", "VLLMSampler", "outputs_to_batch", "policy_dir", "require_vllm", "vllm_available"]

VLLM_MISSING = "rollout_backend 'vllm' needs vLLM and a GPU: pip install 'onelayer[vllm]' on a CUDA machine"


def vllm_available() -> bool:
    """Whether vLLM is installed (looked up, not imported: importing vLLM is slow and touches CUDA)."""
    return importlib.util.find_spec("vllm") is not None


def require_vllm() -> None:
    """Raise `ConfigError` unless vLLM is installed and a CUDA GPU is visible (call it early to fail fast)."""
    from onelayer.config import ConfigError

    if not vllm_available() or not torch.cuda.is_available():
        raise ConfigError(VLLM_MISSING)


def outputs_to_batch(
    outputs: Sequence,
    prompts: list[list[int]],
    *,
    num_generations: int,
    eos_id: int | None,
    pad_id: int,
    device: torch.device | str | None = None,
) -> RolloutBatch:
    """Lay vLLM results out as a `RolloutBatch`, exactly as `onelayer.rollout.sample` does.

    ``outputs[i]`` is prompt i's result (a vLLM ``RequestOutput`` or anything shaped like one):
    ``outputs[i].outputs[j].token_ids`` are the G completions' token ids (EOS included when emitted) and
    ``outputs[i].outputs[j].logprobs`` is None or, per completion token, a dict ``token_id -> obj`` with
    ``obj.logprob`` (``SamplingParams(logprobs=0)`` gives the sampled token's entry). Tokens after a first
    EOS, if any, are dropped. ``T`` is the longest completion. Missing log-probs read as 0.
    """
    G = num_generations
    if len(outputs) != len(prompts):
        raise ValueError(f"got {len(outputs)} vLLM outputs for {len(prompts)} prompts")
    eos = -1 if eos_id is None else int(eos_id)
    rows: list[tuple[list[int], list[float]]] = []
    for i, out in enumerate(outputs):
        if len(out.outputs) != G:
            raise ValueError(f"prompt {i}: got {len(out.outputs)} completions, expected num_generations={G}")
        for comp in out.outputs:
            ids = [int(t) for t in comp.token_ids]
            if eos >= 0 and eos in ids:
                ids = ids[: ids.index(eos) + 1]
            lps = comp.logprobs
            rows.append((ids, [float(lps[k][t].logprob) if lps is not None else 0.0 for k, t in enumerate(ids)]))

    ids, pmask = left_pad(prompts, pad_id)
    B, T = len(rows), max((len(r[0]) for r in rows), default=0)
    tokens = torch.full((B, T), pad_id, dtype=torch.long)
    logps = torch.zeros((B, T), dtype=torch.float32)
    cmask = torch.zeros((B, T), dtype=torch.bool)
    for b, (toks, lps) in enumerate(rows):
        n = len(toks)
        tokens[b, :n] = torch.as_tensor(toks, dtype=torch.long)
        logps[b, :n] = torch.as_tensor(lps, dtype=torch.float32)
        cmask[b, :n] = True
    batch = RolloutBatch.assemble(ids, pmask, tokens, cmask, logps, G)
    return batch if device is None else batch.map(lambda t: t.to(device))


def policy_dir(model, tok, source: str, scratch: str | Path) -> str:
    """What vLLM should load: ``source`` when it is a directory or a hub name; a built-in model (which
    exists only in memory) is first saved with ``save_pretrained`` to ``scratch``."""
    from onelayer.models import BUILTIN_MODELS

    if Path(source).is_dir() or source not in BUILTIN_MODELS:
        return str(source)
    scratch = Path(scratch)
    model.save_pretrained(scratch)
    tok.save_pretrained(scratch)
    return str(scratch)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VLLMSampler:
    """A colocated vLLM engine that samples `RolloutBatch`es like `onelayer.rollout.sample`.

    ``model_path``: a model directory or hub name holding the policy's architecture and (initial) weights
    (`policy_dir` makes one for built-in models). ``dtype``: vLLM dtype (``"bfloat16"``, ``"float16"``,
    ``"float32"``, ``"auto"``) or a torch dtype. ``gpu_memory_utilization``: share of GPU memory vLLM may take
    (weights + KV cache); the training model shares the GPU. ``seed``: the engine's seed. ``max_model_len``:
    prompt + completion budget (default: the model's). ``recompute_logprobs``: see the module docstring.
    Further keyword arguments go to ``vllm.LLM``.
    """

    captures_hidden_states = False  # the engine hands out no hidden states (`rollout.sampler.Sampler`)

    def __init__(
        self,
        model_path: str | Path,
        *,
        dtype: str | torch.dtype = "bfloat16",
        gpu_memory_utilization: float = 0.3,
        seed: int = 0,
        max_model_len: int | None = None,
        recompute_logprobs: bool = True,
        **llm_kwargs,
    ):
        require_vllm()
        from onelayer.config import ConfigError

        try:
            from vllm import LLM
        except ImportError as exc:  # installed but broken (e.g. a CUDA/torch mismatch)
            raise ConfigError(f"{VLLM_MISSING} (importing vllm failed: {exc})") from None
        if isinstance(dtype, torch.dtype):
            dtype = str(dtype).removeprefix("torch.")
        # In-process engine, as in TRL's colocate mode: external_launcher makes this process vLLM's only
        # worker, so the model object (and its load_weights) is reachable for weight sync.
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
            os.environ.setdefault(key, value)
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        kwargs = dict(
            model=str(model_path),
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            seed=seed,
            max_model_len=max_model_len,
            distributed_executor_backend="external_launcher",
            # prompts and completions are token ids: no tokenizer, no detokenisation
            skip_tokenizer_init=True,
            # log-probs of the distribution sampled from (temperature applied); see the module docstring
            logprobs_mode="processed_logprobs",
            # TRL: vLLM v1's memory profiler is misled by the large default
            max_num_batched_tokens=4096,
        )
        kwargs.update(llm_kwargs)
        self.llm = LLM(**kwargs)
        self.recompute_logprobs = recompute_logprobs

    # -- weights -----------------------------------------------------------------------------------------

    def _engine_model(self):
        try:
            return self.llm.llm_engine.model_executor.driver_worker.model_runner.model
        except AttributeError:
            raise RuntimeError(
                "cannot reach the vLLM model for weight sync: the engine is not running in this process "
                "(onelayer builds it with distributed_executor_backend='external_launcher' and "
                "VLLM_ENABLE_V1_MULTIPROCESSING=0, as TRL's colocate mode does; do not override them)"
            ) from None

    @torch.no_grad()
    def sync_weights(self, model: torch.nn.Module, names: Iterable[str] | None = None) -> int:
        """Copy ``model``'s current tensors named ``names`` (default: those with ``requires_grad``) into the
        engine and drop its prefix cache. Returns how many tensors were sent."""
        params = dict(model.named_parameters())
        if names is None:
            names = [n for n, p in params.items() if p.requires_grad]
        unknown = [n for n in names if n not in params]
        if unknown:
            raise KeyError(f"not parameters of the model: {', '.join(unknown[:5])}")
        engine_model = self._engine_model()
        sent = 0
        for name in names:
            t = params[name].detach()
            if t.device.type == "cpu" and torch.cuda.is_available():
                t = t.to("cuda")
            # One tensor per call, as TRL does: vLLM's loader maps HF names (and fused shards) itself.
            engine_model.load_weights([(name, t)])
            sent += 1
        self.llm.reset_prefix_cache()
        return sent

    # -- sampling ----------------------------------------------------------------------------------------

    def sample(
        self,
        prompts: list[list[int]],
        *,
        num_generations: int = 1,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        greedy: bool = False,
        eos_id: int | None,
        pad_id: int,
        generator: torch.Generator | None = None,
        policy: torch.nn.Module | None = None,
        device: torch.device | str | None = None,
        stop_ids: torch.Tensor | None = None,
    ) -> RolloutBatch:
        """Same arguments and result as `onelayer.rollout.sample` (without the model): G completions per
        prompt, stopping at ``eos_id`` (never when it is None or -1) or after ``max_new_tokens``.

        ``generator`` (optional) draws the per-request vLLM seeds, so a seeded generator gives reproducible
        samples. ``policy`` is the training model, needed when ``recompute_logprobs`` is set; the batch is put
        on ``device``, else on the policy's device, else on CUDA.
        """
        check_sampling_args(num_generations, max_new_tokens, temperature, top_p, greedy)
        if self.recompute_logprobs and policy is None:
            raise ValueError("recompute_logprobs=True needs the training model: pass policy=model")
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        G = num_generations
        eos = -1 if eos_id is None else int(eos_id)
        stops = ([eos] if eos >= 0 else []) + ([] if stop_ids is None else [int(t) for t in stop_ids.tolist()])
        base = None
        if generator is not None:
            base = int(torch.randint(0, 2**30, (1,), generator=generator, device=generator.device))
        params = [
            SamplingParams(
                n=G,
                temperature=0.0 if greedy else temperature,
                top_p=1.0 if greedy else top_p,
                max_tokens=max_new_tokens,
                logprobs=0,  # the sampled token's log-prob only
                # vLLM gives child j of a request seed + j: spacing by G keeps every row's seed distinct
                seed=None if base is None else base + i * G,
                # stop on eos_id and the stop tokens alone (not on the generation config's EOS list), like `sample`
                ignore_eos=True,
                stop_token_ids=stops or None,
                detokenize=False,
            )
            for i in range(len(prompts))
        ]
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=list(p)) for p in prompts], sampling_params=params, use_tqdm=False
        )
        if device is None:
            device = next(policy.parameters()).device if policy is not None else "cuda"
        batch = outputs_to_batch(outputs, prompts, num_generations=G, eos_id=eos_id, pad_id=pad_id, device=device)
        if self.recompute_logprobs:
            batch.logprobs = recompute_logprobs(policy, batch, temperature=1.0 if greedy else temperature)
        return batch

    def __call__(self, model, prompts: list[list[int]], **kwargs) -> RolloutBatch:
        """Drop-in for ``onelayer.rollout.sample(model, prompts, ...)``: ``model`` is the training policy
        (used only to recompute log-probs and to place the batch)."""
        return self.sample(prompts, policy=model, **kwargs)


@torch.no_grad()
def recompute_logprobs(policy: torch.nn.Module, batch: RolloutBatch, *, temperature: float) -> torch.Tensor:
    """The batch's completion log-probs under ``policy`` (onelayer's convention), in eval mode."""
    was_training = policy.training
    policy.eval()
    try:
        return sequence_logprobs(policy, batch.input_ids, batch.attention_mask, batch.prompt_len,
                                 temperature=temperature, prompt_index=batch.prompt_index).float()
    finally:
        policy.train(was_training)
