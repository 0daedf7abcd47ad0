"""Checkpoints of a layer-selective run: only trainable tensors, optimizer state and the step.

Frozen tensors never change, so they are not saved: a resumed run reloads the same base model and
overwrites the trainable tensors. Each checkpoint is written to a temporary directory and renamed into
place, so a run killed mid-save keeps its previous checkpoint intact.

One process writes safetensors and `optimizer.pt`. Several processes (`train.distributed`) write one
sharded checkpoint with `torch.distributed.checkpoint` (each rank its shards, addressed by parameter
name), which any number of processes, one included, can load: a killed job resumes on another count.
The train-split check's best weights (`train.selection`) are one safetensors file on any count:
`save_trainable` and `load_trainable` take the job's `Parallel`, rank 0 writing whole tensors (gathered
under FSDP) and every rank loading them (keeping its shards under FSDP).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from onelayer.io import atomic_write_json, read_json, replace_dir


def save_trainable(path: Path, model, parallel=None) -> None:
    """The trainable tensors of `model` to one safetensors file. Under `parallel` every rank calls it and rank 0
    writes (under FSDP the tensors gathered whole first, every rank taking part)."""
    tensors = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}  # a tied head once
    if parallel is not None and parallel.method == "fsdp":
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        whole = get_model_state_dict(model, options=_options(full_state_dict=True, cpu_offload=True))
        tensors = {n: whole[n] for n in tensors if n in whole}  # rank 0's; the other ranks' are empty
    if parallel is None or parallel.main:
        save_file({n: t.contiguous().cpu() for n, t in tensors.items()}, path)


def load_trainable(path: Path, model, parallel=None) -> None:
    """Copy the tensors saved by `save_trainable` back into `model`'s parameters (every rank reads the file;
    under FSDP each keeps its shards of them)."""
    if parallel is not None and parallel.method == "fsdp":
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(model, load_file(path), options=_options(full_state_dict=True, strict=False))
        return
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in load_file(path).items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))


def save_checkpoint(ckpt_dir: Path, model, optimizer, state: dict, parallel=None) -> None:
    """Trainable tensors, optimizer state and `state` (step, config hash); sharded when `parallel` is active
    (every rank calls it)."""
    if parallel is not None and parallel.active:
        return save_sharded(ckpt_dir, model, optimizer, state, parallel)
    tmp = ckpt_dir.with_name(ckpt_dir.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_trainable(tmp / "trainable.safetensors", model)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    atomic_write_json(tmp / "state.json", state)
    replace_dir(tmp, ckpt_dir)


class CheckpointError(RuntimeError):
    """A run's checkpoint exists but cannot be read (truncated, edited, or from another model or layer set)."""


def load_checkpoint(ckpt_dir: Path, model, optimizer, parallel=None) -> dict | None:
    """Restore trainable tensors and optimizer state; returns the saved state dict, or None. Reads either
    format on any number of processes (every rank calls it). A checkpoint that cannot be read raises
    `CheckpointError` before anything of the run directory is changed."""
    if not (ckpt_dir / "state.json").is_file():
        return None
    try:
        state = read_json(ckpt_dir / "state.json")
        if (ckpt_dir / ".metadata").is_file():
            load_sharded(ckpt_dir, model, optimizer)
        elif parallel is not None and parallel.active:
            _load_whole_into_sharded(ckpt_dir, model, optimizer)
        else:
            load_trainable(ckpt_dir / "trainable.safetensors", model)
            optimizer.load_state_dict(torch.load(ckpt_dir / "optimizer.pt", weights_only=True))
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            raise ValueError("state.json holds no step")
    except Exception as exc:  # noqa: BLE001 - any unreadable part: one message, nothing changed
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(
            f"the checkpoint in {ckpt_dir} cannot be read ({type(exc).__name__}: {first}); metrics.jsonl and the "
            f"rest of the run directory are untouched. Move {ckpt_dir} aside to start the run from step 0, or "
            "pass another --out") from None
    return state


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, **kw)


def save_sharded(ckpt_dir: Path, model, optimizer, state: dict, parallel) -> None:
    """The trainable tensors and AdamW state through `torch.distributed.checkpoint` (each rank writes its shards;
    rank 0 the metadata, `state.json` and the rename into place)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    tmp = ckpt_dir.with_name(ckpt_dir.name + ".tmp")
    if parallel.main:
        shutil.rmtree(tmp, ignore_errors=True)
    parallel.barrier()
    msd, osd = get_state_dict(model, optimizer, options=_options())
    dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=str(tmp))
    if parallel.main:  # dcp.save returns on rank 0 once every rank's shards are written
        atomic_write_json(tmp / "state.json", {**state, "world_size": parallel.world})
        replace_dir(tmp, ckpt_dir)
    parallel.barrier()


def load_sharded(ckpt_dir: Path, model, optimizer) -> None:
    """A `save_sharded` checkpoint into `model` and `optimizer`, however they are sharded now (or not at all)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, optimizer, options=_options())
    sd = {"model": msd, "optimizer": osd}
    dcp.load(sd, checkpoint_id=str(ckpt_dir))
    set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optimizer"],
                   options=_options(strict=False))  # the frozen tensors are the base model's, not in the checkpoint


def _load_whole_into_sharded(ckpt_dir: Path, model, optimizer) -> None:
    """A one-process checkpoint (safetensors, optimizer.pt keyed by position) into a DDP or FSDP job: the optimizer
    state re-keyed by parameter name, then both set from full tensors on every rank."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    saved = torch.load(ckpt_dir / "optimizer.pt", weights_only=True)
    osd = {"state": {order[int(i)]: st for i, st in saved["state"].items()},
           "param_groups": [{**g, "params": [order[int(i)] for i in g["params"]]} for g in saved["param_groups"]]}
    set_state_dict(model, optimizer, model_state_dict=load_file(ckpt_dir / "trainable.safetensors"), optim_state_dict=osd,
                   options=_options(full_state_dict=True, strict=False))
