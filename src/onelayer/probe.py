"""`onelayer probe`: rank layers without a sweep, at a fraction of its compute, and check the ranking.

Three probes from different families behind one interface (`PROBES`: name -> function of a `ProbeContext`
returning one score per block, higher = more promising):

- `short_runs` (training): each block trained alone for a few steps (the budget's share of the sweep's
  steps); score = the early reward gain, mean training reward over the last third of the steps minus
  over the first third;
- `grad_norm` and `adam_step` (first order, from the base policy's own RL gradient over a few rollout
  batches, no update): per block ‖g_l‖₂, and the predicted one-step improvement under Adam, lr·‖g_l‖₁
  (Adam's first step moves every weight by about lr in the direction of its gradient's sign);
- `block_influence` (activations only): 1 − cos(h_in, h_out) of each block, averaged over the rollout
  batches' real tokens.

Cost is counted in matrix-multiply FLOPs of RL steps (`bench.floor.step_flops` on the task's own prompts):
the sweep replaced is the L single-layer runs plus the full run at the task's step count. `probe.csv`
has every probe's score and rank per layer; `probe_<name>.csv` has the layer/contribution columns that
`--layers top:k@FILE` reads. `--validate SWEEP` compares each probe (and the position-only inverted-U
null) with the sweep's C_l: Spearman ρ with a bootstrap CI over layers, ρ after regressing a quadratic
in relative depth out of both, and top-k overlap against chance; with `--recipe-k K` (default 3) it also
trains Only-BK on each ranking (every probe's, the sweep's C_l and position's Mid-K) on the sweep's training
settings, against full RL, through the recipes' store (OUT/recipes/), so the ranking is judged by the
recipe it would pick.
"""

from __future__ import annotations

import csv
import io
import statistics
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from onelayer.config import REQUIRED, ConfigError, TrainConfig, make_config, setting
from onelayer.io import atomic_write_json, atomic_write_text, read_jsonl


@dataclass
class ProbeSpec:
    """What `onelayer probe` ranks and how (its flags are generated from these fields)."""

    out: str = setting(REQUIRED, "output directory (probe.csv, probe_<name>.csv, probe.json)")
    model: str = setting("tiny-qwen3", "model to probe (as in train)")
    task: str = setting("arith", "task to probe on (as in train)")
    algo: str = setting("grpo", "algorithm preset of the rollouts and gradients")
    budget: float = setting(0.1, "largest share of the sweep's training-step FLOPs a probe may use")
    probes: list = setting(["short_runs", "grad_norm", "adam_step", "block_influence"], "probes to run")
    batches: int = setting(4, "rollout batches of the gradient and activation probes")
    seed: int = setting(0, "seed of the rollouts and the short runs")
    threads: int | None = setting(None, "torch CPU threads", default_doc="torch's choice")
    against: str | None = setting(None, "a finished sweep directory: compare every probe with its C_l",
                                  flag="--validate", default_doc="no validation")
    recipe_k: int = setting(3, "with --validate: train Only-Bk on each probe's top k (and the sweep's, and Mid-k) "
                               "and report its score against full RL; 0: no recipe runs")
    recipe_seeds: list = setting([0, 1, 2], "seeds of the recipe runs of --recipe-k")
    reuse: list = setting([], "another sweep or recipes directory whose finished jobs with the same config are "
                              "copied instead of rerun", flag="--reuse", repeat=True)
    workers: int = setting(1, "parallel training processes of the recipe runs")

    def validate(self) -> None:
        unknown = [p for p in self.probes if p not in PROBES]
        if unknown:
            raise ConfigError(f"probe: unknown probe(s) {unknown}; valid: {', '.join(PROBES)}")
        if not 0 < self.budget <= 1:
            raise ConfigError(f"probe: --budget {self.budget} must be in (0, 1]")
        if self.batches < 1:
            raise ConfigError(f"probe: --batches {self.batches} must be at least 1")
        if self.recipe_k < 0 or self.workers < 1 or not self.recipe_seeds:
            raise ConfigError("probe: --recipe-k must be >= 0, --workers >= 1 and --recipe-seeds must list a seed")


@dataclass
class ProbeContext:
    spec: ProbeSpec
    cfg: TrainConfig  # the training settings the sweep would use (task defaults filled in)
    out: Path
    num_layers: int
    step_flops: dict  # 'full', 'rollout' and each block index -> FLOPs of one RL step (of its rollout)
    log: object


# ------------------------------------------------------------------------------------------- probes


def short_runs(ctx: ProbeContext) -> tuple[list[float], float]:
    """Each block alone for k steps; the early reward gain. Returns (scores, FLOPs used)."""
    from onelayer.train.loop import run

    single = sum(ctx.step_flops[i] for i in range(ctx.num_layers))
    k = max(3, int(ctx.spec.budget * sweep_flops(ctx) / single))
    scores = []
    for layer in range(ctx.num_layers):
        out = ctx.out / "short_runs" / f"L{layer}"
        run(replace(ctx.cfg, layers=str(layer), max_steps=k, save_model=False, check_every=0, progress=False),
            out, log=lambda *_: None)
        reward = [m["reward_mean"] for m in read_jsonl(out / "metrics.jsonl")]
        third = max(1, len(reward) // 3)
        scores.append(statistics.mean(reward[-third:]) - statistics.mean(reward[:third]))
    ctx.log(f"probe short_runs: {k} steps per block")
    return scores, k * single


def _base_policy(ctx: ProbeContext):
    """The base policy with every parameter trainable (for gradients) and the task, formatted."""
    from onelayer import tasks
    from onelayer.models.layers import select_layers
    from onelayer.train.setup import format_task, load_model

    task = tasks.make(ctx.cfg.task, **ctx.cfg.task_opts)
    model, tok, _ = load_model(ctx.cfg, task, ctx.cfg.max_completion_length, "cpu", lambda *_: None)
    task, _ = format_task(ctx.cfg, task, tok)
    select_layers(model, "all", train_non_block=True)
    return model, tok, task


def _rollouts(ctx: ProbeContext, model, tok, task):
    """`batches` rollout batches of the base policy with their advantages (the RL loss's inputs)."""
    import random

    from onelayer.algos import get_preset
    from onelayer.train.experience import advantages, collect

    items = task.items("train")
    preset = get_preset(ctx.cfg.algo)
    out = []
    for b in range(ctx.spec.batches):
        rng = random.Random(f"probe:{ctx.spec.seed}:{b}")
        gen = torch.Generator().manual_seed(ctx.spec.seed * 1_000_003 + b)
        exp = collect(model.eval(), tok, task, rng.sample(items, min(ctx.cfg.prompts_per_step, len(items))),
                      num_generations=ctx.cfg.num_generations, max_new_tokens=ctx.cfg.max_completion_length,
                      temperature=ctx.cfg.temperature, top_p=ctx.cfg.top_p, generator=gen)
        out.append((exp.batch, advantages(exp, preset, ctx.cfg.scale_rewards or preset.scale)))
    return out


def _block_gradients(ctx: ProbeContext) -> tuple[list[torch.Tensor], float]:
    """Per block, its parameters' summed RL-loss gradient over the rollout batches (flattened)."""
    from onelayer.algos import get_preset, policy_loss
    from onelayer.models.layers import find_blocks
    from onelayer.policy import sequence_logprobs

    model, tok, task = _base_policy(ctx)
    preset = get_preset(ctx.cfg.algo)
    model.zero_grad(set_to_none=True)
    for batch, adv in _rollouts(ctx, model, tok, task):
        logp = sequence_logprobs(model.train(), batch.input_ids, batch.attention_mask, batch.prompt_len,
                                 temperature=ctx.cfg.temperature, prompt_index=batch.prompt_index)
        loss, _ = policy_loss(logp, batch.logprobs, adv, batch.completion_mask, clip_eps=ctx.cfg.epsilon,
                              agg=ctx.cfg.loss_type or preset.loss_agg, norm_len=ctx.cfg.max_completion_length)
        loss.backward()
    _, blocks = find_blocks(model, ctx.cfg.block_path)
    grads = [torch.cat([p.grad.flatten() for p in block.parameters() if p.grad is not None]) for block in blocks]
    return grads, ctx.spec.batches * ctx.step_flops["full"]


def grad_norm(ctx: ProbeContext) -> tuple[list[float], float]:
    grads, flops = _block_gradients(ctx)
    return [float(g.norm()) for g in grads], flops


def adam_step(ctx: ProbeContext) -> tuple[list[float], float]:
    grads, flops = _block_gradients(ctx)
    return [ctx.cfg.learning_rate * float(g.abs().sum()) for g in grads], flops


@torch.no_grad()
def block_influence(ctx: ProbeContext) -> tuple[list[float], float]:
    """1 − cos(h_in, h_out) per block over the rollout batches' real tokens (forward hooks on the blocks)."""
    from onelayer.models.layers import find_blocks

    model, tok, task = _base_policy(ctx)
    _, blocks = find_blocks(model, ctx.cfg.block_path)
    seen: dict[int, list] = {i: [] for i in range(len(blocks))}

    def hook(i):
        def record(module, args, kwargs, output):
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = output[0] if isinstance(output, tuple) else output
            seen[i].append(torch.nn.functional.cosine_similarity(h_in.float(), h_out.float(), dim=-1))
        return record

    handles = [b.register_forward_hook(hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        masks = []
        for batch, _ in _rollouts(ctx, model, tok, task):
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
            masks.append(batch.attention_mask.bool())
    finally:
        for h in handles:
            h.remove()
    scores = [float(torch.cat([(1 - c)[m] for c, m in zip(seen[i][-len(masks):], masks)]).mean())
              for i in range(len(blocks))]
    return scores, ctx.spec.batches * ctx.step_flops["rollout"]  # the rollouts; the scoring forward is smaller


PROBES = {"short_runs": short_runs, "grad_norm": grad_norm, "adam_step": adam_step, "block_influence": block_influence}


# --------------------------------------------------------------------------------------------- cost


def _step_flops(cfg: TrainConfig, task, tok, num_layers: int) -> dict:
    """FLOPs of one RL step of the full run and of each single-block run, on the task's own prompts."""
    from onelayer.bench.floor import step_flops
    from onelayer.models import load_policy

    model, _ = load_policy(cfg.model)
    items = task.items("train")[: cfg.prompts_per_step]
    lens = [len(tok(it["prompt"]).input_ids) for it in items]
    common = dict(prompt_lens=lens, num_generations=cfg.num_generations, new_tokens=cfg.max_completion_length)
    full = step_flops(model.config, lowest_trainable=0, trainable_blocks=num_layers, train_head=True, **common)
    out = {"full": full["total"], "rollout": full["rollout"]}
    for layer in range(num_layers):
        out[layer] = step_flops(model.config, lowest_trainable=layer, trainable_blocks=1, train_head=False,
                                **common)["total"]
    return out


def sweep_flops(ctx: ProbeContext) -> float:
    """The sweep a probe replaces: every single-layer run and the full run, at the task's step count."""
    return ctx.cfg.max_steps * (ctx.step_flops["full"] + sum(ctx.step_flops[i] for i in range(ctx.num_layers)))


# ------------------------------------------------------------------------------------------- running


def ranks(scores: list[float]) -> list[int]:
    """Rank 1 = the highest score (ties: the lower layer first)."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    out = [0] * len(scores)
    for r, i in enumerate(order, 1):
        out[i] = r
    return out


def run_probes(spec: ProbeSpec, log=print) -> dict:
    """Run every probe of `spec`, write OUT/probe.csv, OUT/probe_<name>.csv and OUT/probe.json."""
    from onelayer import tasks
    from onelayer.models import load_policy, model_num_layers
    from onelayer.train.setup import setup_torch, with_task_defaults

    if spec.against and not (Path(spec.against) / "contributions.csv").is_file():  # before any probe runs
        raise ConfigError(f"probe --validate {spec.against!r}: no contributions.csv there; pass a finished sweep's --out")
    cfg = make_config({"model": spec.model, "task": spec.task, "algo": spec.algo, "seed": spec.seed,
                       "threads": spec.threads, "progress": False})
    setup_torch(cfg)
    task = tasks.make(cfg.task, **cfg.task_opts)
    cfg = with_task_defaults(cfg, task)
    out = Path(spec.out)
    out.mkdir(parents=True, exist_ok=True)
    L = model_num_layers(cfg.model)
    _, tok = load_policy(cfg.model)
    ctx = ProbeContext(spec, cfg, out, L, _step_flops(cfg, task, tok, L), log)
    total = sweep_flops(ctx)
    results = {}
    for name in spec.probes:
        scores, flops = PROBES[name](ctx)
        results[name] = {"scores": scores, "ranks": ranks(scores), "flops": flops, "fraction": flops / total,
                         "within_budget": flops <= spec.budget * total}
        if not results[name]["within_budget"]:
            log(f"warning: probe {name} used {flops / total:.1%} of the sweep's FLOPs, over --budget {spec.budget:.0%} "
                "(fewer --batches, or a larger budget)")
        log(f"probe {name}: {flops / total:.1%} of the sweep's training-step FLOPs; ranking "
            + " > ".join(f"L{i}" for i in sorted(range(L), key=lambda i: results[name]["ranks"][i])))
        _write_profile(out / f"probe_{name}.csv", scores)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["probe", "layer", "relative_depth", "score", "rank"])
    for name, r in results.items():
        writer.writerows([name, i, i / max(1, L - 1), r["scores"][i], r["ranks"][i]] for i in range(L))
    atomic_write_text(out / "probe.csv", buf.getvalue())
    record = {"model": cfg.model, "task": cfg.task, "algo": cfg.algo, "num_layers": L, "sweep_flops": total,
              "budget": spec.budget, "probes": results}
    if spec.against:
        record["validation"] = validate_against(results, Path(spec.against), L)
        if spec.recipe_k:
            recipe_scores(spec, cfg, results, record["validation"], out, log)
        log(format_validation(record["validation"]))
    atomic_write_json(out / "probe.json", record)
    return record


def _write_profile(path: Path, scores: list[float]) -> None:
    """A contributions-shaped file of one probe's scores, for `--layers top:k@FILE`."""
    L = len(scores)
    atomic_write_text(path, "layer,relative_depth,contribution\n"
                      + "".join(f"{i},{i / max(1, L - 1)},{v}\n" for i, v in enumerate(scores)))


# ----------------------------------------------------------------------------------------- validation


def _residual(y: np.ndarray, d: np.ndarray) -> np.ndarray:
    """y with a quadratic in relative depth regressed out (least squares)."""
    X = np.stack([np.ones_like(d), d, d * d], 1)
    return y - X @ np.linalg.lstsq(X, y, rcond=None)[0]


def rank_agreement(scores, contributions, depths, *, k: int = 3, n_boot: int = 2000, seed: int = 0) -> dict:
    """Spearman ρ of a probe's scores with C_l (bootstrap CI over layers), ρ with depth's quadratic regressed
    out of both, and the top-k overlap against its chance value k²/L."""
    from scipy.stats import spearmanr

    s, c, d = (np.asarray(x, dtype=float) for x in (scores, contributions, depths))
    L = len(s)
    rng = np.random.default_rng(seed)
    boot = []
    for _ in range(n_boot):
        idx = rng.integers(0, L, L)
        if len(set(s[idx])) > 1 and len(set(c[idx])) > 1:
            boot.append(spearmanr(s[idx], c[idx]).statistic)
    top = lambda x: set(np.argsort(-x, kind="stable")[:k].tolist())  # noqa: E731
    rs = _residual(s, d)
    # a score that is itself a quadratic in depth (the position null) has nothing left once depth is out
    detrended = float(spearmanr(rs, _residual(c, d)).statistic) if np.abs(rs).max() > 1e-9 * (np.abs(s).max() + 1e-30) \
        else float("nan")
    return {"rho": float(spearmanr(s, c).statistic), "rho_ci": [float(q) for q in np.quantile(boot, [0.025, 0.975])],
            "rho_detrended": detrended,
            "top_k": k, "overlap": len(top(s) & top(c)), "overlap_chance": k * k / L}


def validate_against(results: dict, sweep: Path, num_layers: int) -> dict:
    """Every probe (and the position-only inverted-U null) against the sweep's C_l."""
    path = sweep / "contributions.csv"
    if not path.is_file():
        raise ConfigError(f"probe --validate {str(sweep)!r}: no contributions.csv there; pass a finished sweep's --out")
    with path.open() as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("contribution") not in ("", "nan")]
    by_layer = {}
    for r in rows:
        by_layer.setdefault(int(r["layer"]), []).append(float(r["contribution"]))
    if sorted(by_layer) != list(range(num_layers)):
        raise ConfigError(f"probe --validate: {path} ranks layers {sorted(by_layer)}, the probed model has "
                          f"{num_layers}; validate against a sweep of the same model")
    c = [statistics.mean(by_layer[i]) for i in range(num_layers)]
    d = [i / max(1, num_layers - 1) for i in range(num_layers)]
    out = {name: rank_agreement(r["scores"], c, d) for name, r in results.items()}
    out["position (inverted U)"] = rank_agreement([-(x - 0.5) ** 2 for x in d], c, d)
    return out


def recipe_scores(spec: ProbeSpec, cfg: TrainConfig, results: dict, validation: dict, out: Path, log=print) -> None:
    """Only-Bk trained on each ranking (every probe's, the sweep's C_l, and position's Mid-k) on the sweep's
    training settings and `spec.recipe_seeds`, against full RL; adds `recipe` (blocks, score, Δ vs full with
    CIs) to each entry of `validation`. Rankings that pick the same blocks share their runs."""
    from onelayer.config import SweepConfig
    from onelayer.models import model_num_layers
    from onelayer.models.layer_spec import parse_layer_spec
    from onelayer.sweep.recipes import Recipe, run_recipe_jobs
    from onelayer.sweep.store import sweep_condition

    contributions, condition, plan = sweep_condition(spec.against, f"{cfg.model}/{cfg.task}/{cfg.algo}",
                                                     "probe --validate")
    train, L, k = dict(plan["spec"].get("train") or {}), model_num_layers(cfg.model), spec.recipe_k

    def blocks(layer_spec: str) -> str:  # the spec grammar a user's --layers goes through (k > L is refused)
        return ",".join(map(str, parse_layer_spec(layer_spec, L)))

    # each probe's pick is what `--layers top:k@OUT/probe_NAME.csv` trains
    picks = {name: blocks(f"top:{k}@{out / f'probe_{name}.csv'}") for name in results}
    picks["sweep C_l"] = blocks(f"top:{k}@{contributions}")
    picks["position (inverted U)"] = blocks(f"middle:{k}")  # Mid-k
    recipes_ = [Recipe("full", "full", None, "all", {})]
    recipes_ += [Recipe(f"only-{b.replace(',', '.')}", "only", k, b, {}) for b in dict.fromkeys(picks.values())]
    run = SweepConfig(out=str(out / "recipes"), executor="processes" if spec.workers > 1 else "local",
                      workers=spec.workers)
    rows = run_recipe_jobs(recipes_, spec.recipe_seeds, condition, train, out / "recipes", run,
                           [Path(spec.against), *map(Path, spec.reuse)], {"probe_recipes_from": spec.against}, log)
    by_layers = {r["layers"]: r for r in rows}
    full = by_layers.get("all", {})
    for name, blocks in picks.items():
        row = by_layers.get(blocks, {})
        validation.setdefault(name, {})["recipe"] = {
            "k": k, "blocks": blocks, "score": row.get("score"), "ci": [row.get("ci_low"), row.get("ci_high")],
            "delta_vs_full": row.get("delta_vs_full"), "delta_ci": [row.get("delta_ci_low"), row.get("delta_ci_high")],
            "n_seeds": row.get("n_seeds"), "full_score": full.get("score")}


def format_validation(v: dict) -> str:
    lines = [f"{'probe':<22} {'rho [95% CI]':<24} {'rho detrended':>13} {'top-k overlap':>14}"
             + (f"  {'Only-Bk blocks: score, delta vs full [95% CI]'}" if any("recipe" in r for r in v.values()) else "")]
    for name, r in v.items():
        line = (f"{name:<22} {r['rho']:+.2f} [{r['rho_ci'][0]:+.2f}, {r['rho_ci'][1]:+.2f}]{'':<6} "
                f"{r['rho_detrended']:>+13.2f} {r['overlap']:>5} of {r['top_k']} (chance {r['overlap_chance']:.1f})"
                if "rho" in r else f"{name:<22} {'(the reference ranking)':<54}")
        rec = r.get("recipe")
        if rec and rec["score"] is not None:
            line += (f"  {rec['blocks']}: {rec['score']:.1%}, {rec['delta_vs_full']:+.1%} "
                     f"[{rec['delta_ci'][0]:+.1%}, {rec['delta_ci'][1]:+.1%}] ({rec['n_seeds']} seeds)")
        lines.append(line)
    return "\n".join(lines)
