"""One job over several processes: data-parallel (DDP) or sharded (FSDP2) training through torch.distributed.

`onelayer train --nproc N` (or `torchrun --nproc-per-node N -m onelayer train ...`) runs the same loop in N
processes. The loop asks a `Parallel` (from `init`) for the few things that differ from one process:

- `shard(items)`: every rank draws the step's global prompts with the same generator and keeps its
  contiguous share, so a group (a prompt's G completions) never straddles ranks;
- `rollout_seed(seed)`: rank r samples its rollout from its own stream (rank 0's is the one-process one);
- `advantages(exp, fn)`: the estimator runs on the whole step's rewards (gathered); each rank keeps its rows;
- `wrap(model)`: DDP (gradients averaged in the backward) or FSDP2 (`fully_shard` on each decoder block,
  then the root, so tied embeddings stay in one unit);
- `forward(fn)`: the differentiable forward, through DDP's wrapper when DDP runs;
- `minibatches`: the one-process minibatches of the whole step's rows (one permutation, drawn by rank 0),
  each rank running its own rows of each;
- `denominator`, `backward`, `loss_stats`: the loss normaliser is the whole minibatch's (summed over ranks)
  and the loss is scaled by N before the gradient average, so the N-process gradient is the one-process
  gradient of the same global batch;
- `full_weights(model)`: FSDP's weights gathered for a rollout or an eval, with no collective inside (ranks
  may run different numbers of decode steps);
- `reference(model, weights)`: the KL reference's weights in the model for its forward (FSDP: this rank's
  shards of them copied in, then gathered);
- `scores` (a check's or an eval's, the same list on every rank), `save_checkpoint` / `load_checkpoint`
  (`torch.distributed.checkpoint`), `full_state_dict`, `main` (rank 0 writes the run directory's files,
  the best check's weights included), `barrier` and `close`.

A process torchrun started leaves through `run_and_leave` (`os._exit` with the command's status once its
outputs are flushed), so a library thread stuck in the interpreter's teardown cannot hang a finished job.

One process (no torchrun environment) is `Parallel()`: every call is the identity or a no-op, and the
one-process run computes exactly what it did before.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import inspect
import logging
import math
import os
import subprocess
import sys
import traceback
import typing
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from onelayer.config import ConfigError
from onelayer.models.layers import swap_weights

PARALLEL = ("auto", "ddp", "fsdp")
# rank r > 0 samples from seed + r * _RANK_STRIDE: apart from every (seed, step) stream of rank 0
_RANK_STRIDE = 1 << 40


def launched() -> bool:
    """Is this process one of several started by torchrun (or `onelayer train --nproc`)?"""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def check(cfg, world: int, device: str) -> None:
    """The settings a run of `world` processes cannot take, each a one-line ConfigError."""
    if world <= 1:
        return
    if device.startswith("cuda") and world > torch.cuda.device_count():
        raise ConfigError(f"--nproc {world}: only {torch.cuda.device_count()} CUDA device(s) here; one process per device")
    if cfg.prompts_per_step is not None and cfg.prompts_per_step % world:
        raise ConfigError(f"prompts_per_step {cfg.prompts_per_step} does not divide by --nproc {world}: each process "
                          "rolls out whole groups of an equal share of the prompts")
    if cfg.rollout_backend != "hf":
        raise ConfigError(f"rollout_backend {cfg.rollout_backend} with --nproc {world} is not supported; use --nproc 1")


def choose_method(requested: str, state_bytes: int, device_bytes: int | None) -> tuple[str, str]:
    """(ddp or fsdp, why): `requested` unless auto; auto is fsdp when the weights plus gradients and AdamW
    state (`state_bytes`, the planner's estimate) would not fit one device's memory (`device_bytes`)."""
    if requested not in PARALLEL:
        raise ConfigError(f"--parallel {requested!r}: must be one of {', '.join(PARALLEL)}")
    if requested != "auto":
        return requested, "asked for"
    gib = 2**30
    if device_bytes is not None and state_bytes > device_bytes:
        return "fsdp", (f"auto: weights + gradients + AdamW state {state_bytes / gib:.2f} GiB > "
                        f"{device_bytes / gib:.2f} GiB per process")
    room = "unknown" if device_bytes is None else f"{device_bytes / gib:.2f} GiB"
    return "ddp", f"auto: weights + gradients + AdamW state {state_bytes / gib:.2f} GiB fit one process ({room})"


def device_memory(device: str, world: int) -> int | None:
    """Bytes one process may use: its GPU's memory, or on CPU the machine's memory shared by `world` processes."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_properties(torch.device(device)).total_memory
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // world
    except (ValueError, OSError, AttributeError):
        return None


class _Call(nn.Module):
    """What DDP wraps: the policy as a submodule (its parameters are DDP's), and a forward that runs any function
    of it, so the trainer's own forwards (lean path, frozen-prefix reuse) run inside DDP's forward."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn, *args):
        return fn(*args)


@dataclasses.dataclass
class Parallel:
    """This process's place in the job (`init`), and the distributed steps the loop calls."""

    world: int = 1
    rank: int = 0
    local_rank: int = 0
    method: str = "none"  # none (one process), ddp or fsdp
    note: str = ""  # why that method
    device: str = "cpu"
    _ddp: nn.Module | None = None
    _blocks: list = dataclasses.field(default_factory=list)

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def describe(self) -> dict:
        return {"world_size": self.world, "method": self.method, "why": self.note}

    # ----------------------------------------------------------------------------- data

    def rollout_seed(self, seed: int) -> int:
        return seed + self.rank * _RANK_STRIDE

    def shard(self, items: list) -> list:
        """This rank's contiguous share of the step's global prompts (all ranks drew the same list)."""
        if len(items) % self.world:
            raise ConfigError(f"{len(items)} prompts this step do not divide by --nproc {self.world} (fewer train "
                              "items than prompts_per_step?)")
        k = len(items) // self.world
        return items[self.rank * k:(self.rank + 1) * k]

    def advantages(self, exp, compute):
        """`compute(exp)` on the whole step's experience (every rank's rewards, ids offset so groups and episodes
        stay distinct), this rank's rows of it; the step's reward_mean / reward_std become the whole step's."""
        if not self.active:
            return compute(exp)
        from onelayer.algos import episode_returns

        parts = self._gather((exp.step_rewards, exp.traj_ids, exp.group_ids, list(exp.anchors)))
        rewards, trajs, groups, anchors = [], [], [], []
        t_off = g_off = row = 0
        for r, (rw, tr, gr, an) in enumerate(parts):
            if r == self.rank:
                mine = slice(row, row + len(rw))
            rewards.append(rw)
            trajs.append(tr + t_off)
            groups.append(gr + g_off)
            anchors.extend(an)
            t_off += int(tr.max()) + 1 if len(tr) else 0
            g_off += int(gr.max()) + 1 if len(gr) else 0
            row += len(rw)
        whole = dataclasses.replace(exp, step_rewards=torch.cat(rewards), traj_ids=torch.cat(trajs),
                                    group_ids=torch.cat(groups), anchors=anchors)
        returns, _, _ = episode_returns(whole.step_rewards, whole.traj_ids, whole.group_ids)
        exp.metrics["reward_mean"] = returns.mean().item()
        exp.metrics["reward_std"] = returns.std().item() if len(returns) > 1 else 0.0
        return compute(whole)[mine]

    def metrics(self, metrics: dict) -> dict:
        """The step's metrics over all ranks: times the slowest rank's, other numbers the mean of the
        ranks' (ranks hold equal shares; the update's and the rewards' are already the whole step's)."""
        if not self.active:
            return metrics
        keys = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
        every = torch.stack(self._gather(torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64)))
        out = dict(metrics)
        for i, k in enumerate(keys):
            col = every[:, i]
            value = col.max().item() if k.endswith("_s") or k == "seconds" else col.mean().item()
            out[k] = type(metrics[k])(value) if isinstance(metrics[k], int) else value
        return out

    # ----------------------------------------------------------------------------- model and update

    def parallelize(self, model: nn.Module, cfg, precision, forward: str, reuse_at: int | None, *, beta: float,
                    log=print) -> tuple[str, int | None]:
        """Choose DDP or FSDP (`choose_method`) and wrap `model`; returns the forward path and the frozen-prefix
        block as they are under that method (FSDP: the model's own forward, no prefix reuse, with the reasons)."""
        from onelayer.models.plan import training_state_bytes

        self.method, self.note = choose_method(cfg.parallel, training_state_bytes(model, beta),
                                               device_memory(self.device, self.world))
        half = precision.compute if precision.mixed and self.device.startswith("cuda") else None
        self.wrap(model, cfg.block_path, half)
        log(f"{self.world} processes, {self.method} ({self.note})")
        if self.method == "fsdp":
            why = "FSDP: the training forward runs the sharded modules, whose hooks gather their weights"
            if forward == "lean":
                forward = f"hf ({why}; the lean paths read the weights directly)"
            if reuse_at is not None:
                self.note += f"; frozen-prefix reuse off ({why}, from the embeddings on)"
                log(f"frozen-prefix reuse off: {why}")
                reuse_at = None
        return forward, reuse_at

    def wrap(self, model: nn.Module, block_path: str | None = None, param_dtype: torch.dtype | None = None) -> nn.Module:
        """DDP or FSDP2 around `model` (requires_grad already set); the model itself is returned (FSDP shards it
        in place; DDP's wrapper is kept here for `forward`)."""
        if not self.active or not any(p.requires_grad for p in model.parameters()):
            return model
        if self.method == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            cuda = self.device.startswith("cuda")
            # the buffers (rotary tables) are equal everywhere: no broadcast before every forward
            newer = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
            quiet = {"forward_sync_buffers": False} if newer else {"broadcast_buffers": False}
            self._ddp = DistributedDataParallel(_Call(model), device_ids=[self.local_rank] if cuda else None, **quiet)
            return model
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        from onelayer.models.layers import find_blocks

        # GPU with a half-precision compute dtype: all-gather at it, reduce gradients in float32; CPU: float32
        mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else MixedPrecisionPolicy()
        self._blocks = list(find_blocks(model, block_path)[1])
        for block in self._blocks:
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp, reshard_after_forward=False)  # embeddings, final norm, (tied) head
        return model

    def forward(self, fn):
        """`fn` (the differentiable forward of some rows) as the update must call it: through DDP's wrapper."""
        if self._ddp is None:
            return fn
        ddp = self._ddp
        return lambda *args: ddp(fn, *args)

    def minibatches(self, rows: int, size: int | None, generator: torch.Generator) -> list[torch.Tensor]:
        """One pass's minibatches of this rank's `rows` rows (`size`: rows per optimizer step, None: all of them),
        as local row indices. One process: a random permutation of the rows, split. Several: the same of the
        whole step's rows (rank 0 draws it with its generator, every rank gets it), each rank keeping its own
        rows of each minibatch, so the minibatches are the one-process ones of the same global batch; a rank may
        hold none of a minibatch's rows (an empty index: the update still takes part in its collectives)."""
        if not self.active:
            return list(torch.randperm(rows, generator=generator).split(size or rows))
        counts = self._gather(rows)
        start, total = sum(counts[:self.rank]), sum(counts)
        perm = self.broadcast(torch.randperm(total, generator=generator) if self.main else None)
        return [mine[(mine >= start) & (mine < start + rows)] - start for mine in perm.split(size or total)]

    def denominator(self, local: torch.Tensor) -> torch.Tensor | None:
        """The loss normaliser of the whole minibatch (summed over ranks); None on one process (the local one)."""
        if not self.active:
            return None
        total = local.detach().double().reshape(1).clone()
        dist.all_reduce(total)
        return total.to(local.dtype).reshape(())

    def backward(self, loss: torch.Tensor) -> None:
        """DDP and FSDP average gradients over ranks; each rank's loss (its share of the whole minibatch's sum)
        is scaled by N, so the average is the whole minibatch's gradient."""
        (loss * self.world if self.active else loss).backward()

    def loss_stats(self, stats: dict, tokens: float) -> dict:
        """`policy_loss`'s stats of the whole minibatch: the loss summed over ranks (each rank's is its share),
        the token means weighted by each rank's (weighted) token count."""
        if not self.active:
            return stats
        keys = sorted(stats)
        t = torch.tensor([stats[k] * (1.0 if k == "loss" else tokens) for k in keys] + [tokens], dtype=torch.float64)
        dist.all_reduce(t)
        total = t[-1].item()
        return {k: t[i].item() if k == "loss" else (t[i].item() / total if total > 0 else 0.0) for i, k in enumerate(keys)}

    def clip_grad_norm(self, params: list, max_norm: float) -> float:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if hasattr(norm, "full_tensor"):  # FSDP: a DTensor
            norm = norm.full_tensor()
        return float(norm)

    @contextlib.contextmanager
    def reference(self, model: nn.Module, weights: dict):
        """`model` with the KL reference's trainable tensors (`weights`, `copy_trainable` of the wrapped model:
        this rank's shards under FSDP) inside, for a forward under no_grad. One process and DDP: the tensors
        swapped in (`swap_weights`). FSDP: the shards copied into the sharded parameters and back after, with
        every unit gathered inside (`full_weights`), so the reference is never held whole."""
        if self.method != "fsdp":
            with swap_weights(model, weights):
                yield model
            return
        params = dict(model.named_parameters())
        with torch.no_grad():
            current = {name: params[name].detach().clone() for name in weights}
            for name, w in weights.items():
                params[name].copy_(w)
        try:
            with self.full_weights(model):
                yield model
        finally:
            with torch.no_grad():
                for name, w in current.items():
                    params[name].copy_(w)

    @contextlib.contextmanager
    def full_weights(self, model: nn.Module):
        """FSDP: every unit's weights gathered (and kept gathered through each forward) inside, resharded after,
        so a rollout or an eval runs no collective and ranks may decode different numbers of steps."""
        if self.method != "fsdp" or not self._blocks:
            yield
            return
        units = [model, *self._blocks]
        model.set_reshard_after_forward(False)
        for unit in units:
            unit.unshard()
        try:
            yield
        finally:
            for block in self._blocks:
                block.set_reshard_after_forward(True, recurse=False)
            for unit in units:
                unit.reshard()

    # ----------------------------------------------------------------------------- evaluation and files

    def scores(self, fn, items: list, shardable: bool = True) -> list:
        """`fn(items)` (per-item scores, in order), split over the ranks when `shardable` (deterministic per item:
        greedy scoring); else rank 0 scores all of them. Every rank gets the whole list."""
        if not self.active:
            return fn(items)
        if not shardable:
            box = [fn(items) if self.main else None]
            dist.broadcast_object_list(box, src=0)
            return box[0]
        k = math.ceil(len(items) / self.world)
        mine = items[self.rank * k:(self.rank + 1) * k]
        return [s for part in self._gather(fn(mine) if mine else []) for s in part]

    def full_state_dict(self, model: nn.Module) -> dict | None:
        """Every tensor of `model` at full size on CPU (rank 0; None elsewhere); None on one process or DDP,
        where the model's own tensors are whole."""
        if self.method != "fsdp":
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return sd if self.main else None

    def save_pretrained(self, model: nn.Module, path: Path, full: dict | None = None) -> None:
        """Rank 0 writes `model` with save_pretrained: under FSDP from `full` (`full_state_dict`)."""
        if not self.main:
            return
        if full is None:
            model.save_pretrained(path)
            return
        names = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
        full = {k: v for k, v in full.items() if k in names}  # a tied head is the embedding: saved once, as usual
        cls = model.__class__
        model.__class__ = next(c for c in cls.__mro__[1:] if c.__name__ == cls.__name__.removeprefix("FSDP"))
        try:  # config.json records the model's own class, not FSDP's subclass of it
            model.save_pretrained(path, state_dict=full)
        finally:
            model.__class__ = cls

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def close(self) -> None:
        """The end of a finished job: a barrier, then the process group destroyed. DDP's reducer is freed first,
        while the group lives on: freeing it holds the GIL, and when it held the group's last reference the
        group's destructor waited for gloo's worker thread, itself waiting for the GIL to free a finished
        collective's tensors (a worker hung there after its job was done)."""
        if self.active and dist.is_initialized():
            dist.barrier()
            self._ddp = None
            gc.collect()  # the DDP module's reference cycles, with its reducer
            dist.destroy_process_group()

    def _gather(self, obj) -> list:
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


def init(cfg, device: str) -> tuple[Parallel, str]:
    """This process's `Parallel` and device: one process without a torchrun environment, else the process group
    joined (gloo on CPU, nccl on CUDA, one device per process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Parallel(), device
    if cfg.nproc > 1 and cfg.nproc != world:
        raise ConfigError(f"--nproc {cfg.nproc} under torchrun with {world} processes: give one of them")
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        check(cfg, world, device)
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        # a collective that waits this long (a rank died or took another path) fails instead of hanging
        timeout = timedelta(seconds=float(os.environ.get("ONELAYER_DIST_TIMEOUT", "1800")))
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=timeout)
    return Parallel(world=world, rank=rank, local_rank=local, device=device), device


def precheck(cfg, out) -> None:
    """What `check` and a resume would reject, before `launch` starts any process (ConfigError, one line)."""
    from onelayer import rundir, tasks
    from onelayer.train.setup import resolve_device, with_task_defaults

    rundir.check_resumable(cfg, Path(out))
    check(with_task_defaults(cfg, tasks.make(cfg.task, **cfg.task_opts)), cfg.nproc, resolve_device(cfg.device))


def run_and_leave(main) -> typing.NoReturn:
    """Run `main()` (a command's entry, returning its exit status) as one process of a torchrun job and `leave`
    with that status: a SystemExit's, or 1 for an uncaught exception (its traceback printed first)."""
    try:
        code = main()
    except SystemExit as exc:
        code = exc.code
    except BaseException:  # noqa: BLE001 - reported here: the process leaves without Python's own handler
        traceback.print_exc()
        code = 1
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)  # what SystemExit("message") prints
        code = 1
    leave(code or 0)


def leave(code: int) -> typing.NoReturn:
    """End this process with `code` through `os._exit`, stdout, stderr and logging flushed first. A finished job
    has written its run directory and destroyed its process group (`Parallel.close`) by then; leaving without
    the interpreter's teardown means no thread a library left behind (gloo's) can hang the process, and with
    it the job."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def launch(argv: list[str], nproc: int) -> int:
    """Run `onelayer ARGV` in `nproc` processes on this machine (torchrun, a free port); its exit status. The
    processes get ARGV without --nproc (torchrun's world size says it; torchrun would read --nproc as its own)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(Path(__file__).parents[2]),
                                                                   os.environ.get("PYTHONPATH")) if p)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "onelayer", *without_flag(argv, "--nproc")]
    return subprocess.call(cmd, env=env)


def without_flag(argv: list[str], flag: str) -> list[str]:
    """`argv` without `flag VALUE` and `flag=VALUE`."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == flag:
            skip = True
        elif not arg.startswith(flag + "="):
            out.append(arg)
    return out
