"""`onelayer plan`: meta-device memory plans for full vs selected-layer training."""

import json
import shutil

import pytest
import torch

from onelayer.cli import main
from onelayer.config import ConfigError
from onelayer.models import ModelError, build_tiny
from onelayer.models.layer_spec import LayerSpecError
from onelayer.models.layers import copy_trainable, find_blocks, select_layers, trainable_parameters
from onelayer.models.plan import (
    activation_elements_per_token_per_block,
    block_shape,
    format_plan,
    meta_model,
    plan_memory,
    resolve_config,
    shipped_configs,
)

# Published totals from the model cards: (parameters, non-embedding parameters).
PUBLISHED = {
    "qwen3-0.6b": (0.6e9, 0.44e9),
    "qwen3-1.7b": (1.7e9, 1.4e9),
    "qwen3-4b": (4.0e9, 3.6e9),
    "qwen3-8b": (8.2e9, 6.95e9),
    "qwen2.5-1.5b": (1.54e9, 1.31e9),
    "qwen2.5-7b": (7.61e9, 6.53e9),
}
ENTRY_KEYS = {"total_params", "trainable_params", "param_bytes", "grad_bytes", "optimizer_bytes", "activation_bytes",
              "kv_cache_bytes", "reference_bytes", "total_bytes", "layer_indices"}


@pytest.mark.parametrize("name", sorted(set(shipped_configs()) | set(PUBLISHED)))
def test_shipped_configs_match_published_parameter_counts(name):
    # every shipped config, and every model with published totals, plans with the model card's counts
    if name not in PUBLISHED:
        pytest.fail(f"{name} is shipped, but PUBLISHED has no model-card totals to check it against: add them")
    plan = plan_memory(name, "all")
    total, non_embedding = PUBLISHED[name]
    assert plan["full"]["total_params"] == pytest.approx(total, rel=0.02)
    assert plan["non_embedding_params"] == pytest.approx(non_embedding, rel=0.02)
    assert plan["selected"] == plan["full"]


def test_tied_embeddings_count_once():
    plan = plan_memory("qwen3-0.6b", "all")  # tie_word_embeddings: true
    cfg, _ = resolve_config("qwen3-0.6b")
    assert plan["full"]["total_params"] == plan["non_embedding_params"] + cfg.vocab_size * cfg.hidden_size
    untied = plan_memory("qwen3-8b", "all")
    cfg8, _ = resolve_config("qwen3-8b")
    assert untied["full"]["total_params"] == untied["non_embedding_params"] + 2 * cfg8.vocab_size * cfg8.hidden_size


def test_plan_has_full_and_selected_with_optimizer_bytes():
    plan = plan_memory("qwen3-1.7b", "middle:1")
    assert {"model_config", "layers", "num_layers", "full", "selected", "assumptions", "total_ratio"} <= set(plan)
    for key in ("full", "selected"):
        assert ENTRY_KEYS <= set(plan[key])
        assert plan[key]["optimizer_bytes"] > 0
        assert plan[key]["total_bytes"] == sum(plan[key][k] for k in (
            "param_bytes", "grad_bytes", "optimizer_bytes", "activation_bytes", "reference_bytes"))
    assert plan["num_layers"] == 28 and plan["selected"]["layer_indices"] == [13]
    assert plan["full"]["layer_indices"] == list(range(28))
    assert "no separate master copy" in plan["assumptions"]["optimizer"]
    assert plan["assumptions"]["state_bytes_per_trainable_param"] == 16
    assert plan["total_ratio"] == pytest.approx(plan["selected"]["total_bytes"] / plan["full"]["total_bytes"])


@pytest.mark.parametrize("dtype,frozen_bytes", [("bf16", 2), ("fp32", 4)])
def test_middle_one_optimizer_is_one_block(dtype, frozen_bytes):
    plan = plan_memory("qwen3-8b", "middle:1", dtype=dtype)
    model = meta_model(resolve_config("qwen3-8b")[0])
    _, blocks = find_blocks(model)
    block_params = sum(p.numel() for p in blocks[17].parameters())
    sel, full = plan["selected"], plan["full"]
    assert sel["layer_indices"] == [17]
    assert sel["trainable_params"] == block_params
    # trainable tensors and their AdamW moments are fp32 whatever the compute dtype
    assert sel["optimizer_bytes"] == 8 * block_params
    assert full["optimizer_bytes"] == 8 * full["total_params"]
    assert sel["optimizer_bytes"] < 0.05 * full["optimizer_bytes"]
    # frozen weights stay resident at the compute dtype (the default frozen dtype); gradients exist only for the block
    assert full["param_bytes"] == 4 * full["total_params"]
    assert sel["param_bytes"] == 4 * block_params + frozen_bytes * (full["total_params"] - block_params)
    assert sel["grad_bytes"] == 4 * block_params


def test_full_plan_is_16_bytes_per_parameter_and_frozen_tensors_use_the_frozen_dtype():
    full = plan_memory("qwen3-1.7b", "all")["full"]
    assert full["trainable_params"] == full["total_params"]
    assert full["param_bytes"] + full["grad_bytes"] + full["optimizer_bytes"] == 16 * full["total_params"]
    for frozen_dtype, frozen_bytes in ((None, 2), ("fp16", 2), ("float32", 4)):
        plan = plan_memory("qwen3-1.7b", "5", dtype="bf16", frozen_dtype=frozen_dtype)
        sel = plan["selected"]
        frozen = sel["total_params"] - sel["trainable_params"]
        assert sel["layer_indices"] == [5] and frozen > 0.9 * sel["total_params"]
        assert sel["param_bytes"] == 4 * sel["trainable_params"] + frozen_bytes * frozen, frozen_dtype
        assert sel["grad_bytes"] + sel["optimizer_bytes"] == 12 * sel["trainable_params"]
        assert plan["assumptions"]["state_bytes_per_frozen_param"] == frozen_bytes
    assert plan["frozen_dtype"] == "float32" and "frozen parameters at float32" in plan["assumptions"]["weights"]


def test_half_frozen_dtype_needs_a_half_compute_dtype_as_in_the_trainer(capsys):
    with pytest.raises(ConfigError):
        plan_memory("qwen3-0.6b", "1", dtype="fp32", frozen_dtype="bf16")
    assert main(["plan", "--model-config", "qwen3-0.6b", "--layers", "1", "--dtype", "float32",
                 "--frozen-dtype", "bfloat16"]) == 2
    assert "half-precision compute dtype" in capsys.readouterr().err
    assert plan_memory("qwen3-0.6b", "1", dtype="fp32", frozen_dtype="fp32")["frozen_dtype"] == "float32"  # the alias


def test_activations_start_at_the_lowest_trainable_block():
    full = plan_memory("qwen3-4b", "all", batch_size=2, seq_len=256)
    middle = plan_memory("qwen3-4b", "middle:1", batch_size=2, seq_len=256)
    first = plan_memory("qwen3-4b", "0,-1", batch_size=2, seq_len=256)
    nothing = plan_memory("qwen3-4b", "none", batch_size=2, seq_len=256)
    assert middle["selected"]["lowest_trainable_block"] == 17
    assert middle["selected"]["activation_bytes"] < middle["full"]["activation_bytes"]
    assert first["selected"]["activation_bytes"] == full["full"]["activation_bytes"]  # block 0 trains
    assert nothing["selected"]["activation_bytes"] == 0 and nothing["selected"]["optimizer_bytes"] == 0
    # the difference between full and middle:1 is exactly the 17 blocks below block 17
    shape = block_shape(resolve_config("qwen3-4b")[0])
    per_block = 2 * 256 * activation_elements_per_token_per_block(shape) * 2
    assert middle["full"]["activation_bytes"] - middle["selected"]["activation_bytes"] == 17 * per_block


def test_embeddings_and_head_options_follow_the_trainer():
    emb = plan_memory("qwen3-0.6b", "middle:1", train_embeddings=True)
    assert emb["selected"]["lowest_trainable_block"] == 0  # gradients must reach the embeddings
    head = plan_memory("qwen3-8b", "none", train_lm_head=True)
    assert head["selected"]["lowest_trainable_block"] == 36 and head["selected"]["layer_indices"] == []
    assert head["selected"]["trainable_params"] == 151936 * 4096


def test_beta_adds_a_reference_copy_of_trainable_tensors():
    plan = plan_memory("qwen2.5-1.5b", "3-4", beta=0.04)
    assert plan["selected"]["reference_bytes"] == 4 * plan["selected"]["trainable_params"]  # fp32 copies
    assert plan_memory("qwen2.5-1.5b", "3-4")["selected"]["reference_bytes"] == 0


def test_plans_on_meta_without_memory(monkeypatch):
    import onelayer.models.plan as planning

    built = []
    monkeypatch.setattr(planning, "meta_model", lambda config: built.append(meta_model(config)) or built[-1])
    plan = plan_memory("qwen3-8b", "middle:1")
    assert plan["full"]["total_params"] > 8e9
    # one model, built for both plans, and none of its 8 B parameters ever got storage
    assert len(built) == 1 and sum(p.numel() for p in built[0].parameters()) == plan["full"]["total_params"]
    assert {t.device.type for t in (*built[0].parameters(), *built[0].buffers())} == {"meta"}
    model = meta_model(resolve_config("qwen3-8b")[0])
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert {b.device.type for b in model.buffers()} <= {"meta"}


def test_config_json_path_and_directory(tmp_path):
    shutil.copy(shipped_configs()["qwen3-0.6b"], tmp_path / "config.json")
    by_name = plan_memory("QWEN3-0.6B", "2-5")
    assert plan_memory(str(tmp_path / "config.json"), "2-5")["selected"] == by_name["selected"]
    assert plan_memory(str(tmp_path), "2-5")["full"] == by_name["full"]
    assert plan_memory("Qwen/Qwen3-0.6B", "2-5")["full"] == by_name["full"]


def test_tiny_builtin_matches_the_real_model():
    plan = plan_memory("tiny-qwen3", "3")
    model, _ = build_tiny("tiny-qwen3")
    sel = select_layers(model, "3")
    assert plan["selected"]["trainable_params"] == sel.trainable_params
    assert plan["full"]["total_params"] == sel.total_params


def test_activation_estimate_is_close_to_autograd():
    """The per-block formula against the tensors autograd really saves (tiny-qwen3, fp32, CPU)."""
    model, _ = build_tiny("tiny-qwen3")
    ids = torch.randint(3, 90, (2, 64))

    def saved_bytes(spec):
        select_layers(model, spec, train_non_block=spec == "all")
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            torch.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), -1).mean()
        weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        return sum(n for ptr, n in storages.items() if ptr not in weights)

    for spec in ("all", "3", "7"):
        plan = plan_memory("tiny-qwen3", spec, dtype="fp32", batch_size=2, seq_len=64)
        estimate = plan["selected"]["activation_bytes"]
        assert estimate == pytest.approx(saved_bytes(spec), rel=0.35), spec


def test_cli_prints_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", "--model-config", "qwen3-8b", "--layers", "middle:1", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "optimizer GiB" in text and "selected / full total" in text
    assert "compute bfloat16; trainable weights + gradients + AdamW states float32 (16 B/param), frozen bfloat16" in text
    plan = json.loads(out.read_text())
    assert {"model_config", "layers", "full", "selected", "assumptions"} <= set(plan)
    assert plan["model_config"] == "qwen3-8b" and plan["layers"] == "middle:1"
    assert ENTRY_KEYS <= set(plan["full"]) and ENTRY_KEYS <= set(plan["selected"])
    assert (plan["dtype"], plan["trainable_dtype"], plan["frozen_dtype"]) == ("bfloat16", "float32", "bfloat16")
    assert plan["adam_states"] == "float32"
    assert not list(tmp_path.glob(".*.tmp"))
    assert main(["plan", "--model-config", "qwen3-8b", "--layers", "middle:1", "--frozen-dtype", "fp32",
                 "--json", str(out)]) == 0
    capsys.readouterr()
    assert json.loads(out.read_text())["selected"]["param_bytes"] == 4 * plan["selected"]["total_params"]


def test_cli_unknown_config_is_a_one_line_error(capsys):
    assert main(["plan", "--model-config", "qwen9-1b", "--layers", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "qwen9-1b" in err
    assert all(name in err for name in PUBLISHED)
    with pytest.raises(ModelError):
        resolve_config("qwen9-1b")


def test_cli_out_of_range_layer_matches_the_trainer(capsys):
    model, _ = build_tiny("tiny-qwen3")
    with pytest.raises(LayerSpecError) as trainer_error:
        select_layers(model, "9", train_non_block=False)  # the trainer's call
    assert main(["plan", "--model-config", "tiny-qwen3", "--layers", "9"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"onelayer: error: {trainer_error.value}"
    assert main(["plan", "--model-config", "qwen3-8b", "--layers", "36"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "36 layers" in err


def test_cli_rejects_bad_sizes(capsys):
    assert main(["plan", "--model-config", "qwen3-0.6b", "--layers", "1", "--seq-len", "0"]) == 2
    assert "--seq-len" in capsys.readouterr().err


def _held_bytes(model, spec: str, layout: str) -> dict[str, int]:
    """Weights, gradients, AdamW moments and KL reference a tiny model really holds after one step."""
    select_layers(model, spec, train_non_block=spec == "all")
    if layout == "fp32":
        from onelayer.train.precision import Precision

        Precision.from_config("bfloat16", None, "cpu").apply(model)  # the trainer's call (train/loop.py)
    else:
        model.to(torch.bfloat16)
    params = trainable_parameters(model)
    opt = torch.optim.AdamW(params)
    sum(p.float().sum() for p in params).backward()
    opt.step()

    def size(tensors):
        return sum(t.numel() * t.element_size() for t in tensors)

    return {
        "param_bytes": size(model.parameters()),  # a tied tensor is listed once
        "grad_bytes": size(p.grad for p in params),
        "optimizer_bytes": size(t for st in opt.state.values() for k, t in st.items() if k != "step"),
        "reference_bytes": size(copy_trainable(model).values()),
    }


@pytest.mark.parametrize("layout", ["fp32", "weights"])
@pytest.mark.parametrize("spec", ["middle:1", "all"])
def test_plan_matches_what_the_trainer_holds(layout, spec):
    """Default layout: what onelayer train --dtype bfloat16 holds (fp32 trainable tensors, gradients and AdamW
    moments, bf16 frozen tensors). `--adam-states weights`: torch.optim.AdamW on bf16 parameters as they are."""
    plan = plan_memory("tiny-qwen3", spec, dtype="bf16", adam_states=layout, beta=0.04)
    model, _ = build_tiny("tiny-qwen3")
    held = _held_bytes(model, spec, layout)
    assert {k: plan["selected"][k] for k in held} == held
    warned = "not what onelayer trains with" in plan["assumptions"]["optimizer"]
    assert warned == (layout == "weights")
    per_param = 16 if layout == "fp32" else 8
    sel = plan["selected"]
    assert sel["param_bytes"] - (sel["total_params"] - sel["trainable_params"]) * 2 + sel["grad_bytes"] \
        + sel["optimizer_bytes"] == per_param * sel["trainable_params"]


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_per_rank_memory_of_a_job_over_several_processes(parallel):
    """FSDP shards weights (frozen ones too), gradients and AdamW state 1/N and holds the gathered root unit and
    two blocks; DDP replicates everything; activations are per rank's micro-batch either way."""
    one = plan_memory("qwen3-8b", "middle:1", batch_size=4)
    four = plan_memory("qwen3-8b", "middle:1", batch_size=4, nproc=4, parallel=parallel)
    assert "per_rank" not in one["selected"]
    for name in ("full", "selected"):
        whole, rank = four[name], four[name]["per_rank"]
        for key in ("param_bytes", "grad_bytes", "optimizer_bytes"):
            assert rank[key] == (whole[key] if parallel == "ddp" else -(-whole[key] // 4)), key
        assert rank["activation_bytes"] == whole["activation_bytes"] == one[name]["activation_bytes"]
        assert (rank["gathered_bytes"] > 0) == (parallel == "fsdp")
        assert rank["total_bytes"] <= whole["total_bytes"] + rank["gathered_bytes"]
    assert "per rank of 4 processes" in format_plan(four)
