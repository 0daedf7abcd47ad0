"""Layer specs, block discovery, freezing, frozen-tensor verification and the reference-weight swap."""

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from onelayer.models.layer_spec import LayerSpecError, describe_layers, middle_layers, parse_layer_spec
from onelayer.models.layers import (
    block_lr_multipliers,
    copy_trainable,
    count_parameters,
    find_blocks,
    fingerprint_frozen,
    frozen_unchanged,
    param_groups,
    select_layers,
    swap_weights,
    trainable_parameters,
)

transformers.utils.logging.set_verbosity_error()

SMALL = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64, vocab_size=64)


def tiny(arch: str, layers: int = 4, **extra):
    torch.manual_seed(0)
    if arch == "gpt2":
        cfg = transformers.GPT2Config(n_layer=layers, n_embd=32, n_head=2, vocab_size=64, n_positions=64)
    elif arch == "gpt_neox":
        cfg = transformers.GPTNeoXConfig(num_hidden_layers=layers, **SMALL)
    elif arch == "phi":
        cfg = transformers.PhiConfig(num_hidden_layers=layers, **SMALL)
    else:
        config_cls = {
            "qwen2": transformers.Qwen2Config,
            "qwen3": transformers.Qwen3Config,
            "llama": transformers.LlamaConfig,
            "mistral": transformers.MistralConfig,
        }[arch]
        kw = dict(SMALL, num_hidden_layers=layers, num_key_value_heads=1, head_dim=16)
        cfg = config_cls(**kw)
    for k, v in extra.items():
        setattr(cfg, k, v)
    return AutoModelForCausalLM.from_config(cfg).eval()


# --- spec grammar ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("all", list(range(8))),
        (" ALL ", list(range(8))),
        ("none", []),
        ("7", [7]),
        ("3,5", [3, 5]),
        ("5, 3 ,3", [3, 5]),
        ("2-5", [2, 3, 4, 5]),
        ("2 - 5", [2, 3, 4, 5]),
        ("-1", [7]),
        ("0,-1", [0, 7]),
        ("-3--1", [5, 6, 7]),
        ("1,3-4", [1, 3, 4]),
        ("middle:1", [3]),
        ("middle:2", [3, 4]),
        ("Middle : 3", [2, 3, 4]),
        ("middle:8", list(range(8))),
        ("0,middle:2", [0, 3, 4]),
    ],
)
def test_parse_layer_spec(spec, expected):
    assert parse_layer_spec(spec, 8) == expected


def test_middle_rule():
    assert middle_layers(1, 8) == [3]
    assert middle_layers(2, 8) == [3, 4]
    assert middle_layers(1, 7) == [3]
    assert middle_layers(2, 7) == [2, 3]
    assert middle_layers(3, 7) == [2, 3, 4]
    assert parse_layer_spec("middle:1", 1) == [0]


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("99", "index 99 is out of range"),
        ("8", "valid indices 0..7, or -8..-1"),
        ("-9", "index -9 is out of range"),
        ("2-9", "index 9"),
        ("5-2", "empty"),
        ("middle:0", "k=0"),
        ("middle:9", "k=9"),
        ("top:0@x.csv", "k=0"),
        ("", "empty spec"),
        ("3,", "empty item"),
        ("all,3", "stand alone"),
        ("foo", "cannot parse 'foo'"),
        ("1.5", "cannot parse"),
        ("middle", "cannot parse"),
        ("top:2", "cannot parse"),
        ("3..5", "cannot parse"),
    ],
)
def test_parse_errors_name_spec_and_layer_count(spec, fragment):
    with pytest.raises(LayerSpecError) as info:
        parse_layer_spec(spec, 8)
    msg = str(info.value)
    assert fragment in msg
    assert repr(spec) in msg
    assert "8 layers" in msg


def test_malformed_spec_lists_grammar():
    with pytest.raises(LayerSpecError, match="middle:K"):
        parse_layer_spec("layer3", 8)


def test_out_of_range_message_exact():
    with pytest.raises(LayerSpecError) as info:
        parse_layer_spec("99", 8)
    assert str(info.value) == (
        "layer spec '99': index 99 is out of range; this model has 8 layers (valid indices 0..7, or -8..-1)"
    )


def test_describe_layers():
    assert describe_layers(list(range(8)), 8) == "all"
    assert describe_layers([], 8) == "none"
    assert describe_layers([3], 8) == "L3"
    assert describe_layers([2, 3, 4, 5], 8) == "L2-5"
    assert describe_layers([1, 3], 8) == "L1,3"
    assert describe_layers([4, 3, 1], 8) == "L1,3-4"


# --- top:k@FILE -----------------------------------------------------------------------------------


def test_top_k_from_contributions_csv(tmp_path):
    f = tmp_path / "contributions.csv"
    f.write_text(
        "condition,layer,relative_depth,contribution,ci_low,ci_high\n"
        "a,0,0.0,0.1,0,0\n"
        "a,1,0.25,0.9,0,0\n"
        "a,2,0.5,0.5,0,0\n"
        "a,3,0.75,0.2,0,0\n"
        "b,0,0.0,0.1,0,0\n"
        "b,1,0.25,0.1,0,0\n"  # layer 1 mean over conditions = 0.5
        "b,2,0.5,0.8,0,0\n"  # layer 2 mean = 0.65
        "b,3,0.75,0.3,0,0\n"
        "b,full,,1.0,0,0\n"  # non-integer layer rows are skipped
    )
    assert parse_layer_spec(f"top:1@{f}", 4) == [2]
    assert parse_layer_spec(f"top:2@{f}", 4) == [1, 2]
    assert parse_layer_spec(f" top : 3 @ {f} ", 4) == [1, 2, 3]
    assert parse_layer_spec(f"0,top:1@{f}", 4) == [0, 2]


def test_top_k_without_condition_averages_rows(tmp_path):
    f = tmp_path / "c.csv"
    f.write_text("layer,contribution\n0,0.2\n0,0.4\n1,0.35\n")
    assert parse_layer_spec(f"top:1@{f}", 2) == [1]


def test_top_k_errors(tmp_path):
    with pytest.raises(LayerSpecError, match="does not exist.*4 layers"):
        parse_layer_spec(f"top:1@{tmp_path / 'missing.csv'}", 4)
    bad = tmp_path / "bad.csv"
    bad.write_text("layer,score\n0,1\n")
    with pytest.raises(LayerSpecError, match="lacks column.*contribution"):
        parse_layer_spec(f"top:1@{bad}", 4)
    few = tmp_path / "few.csv"
    few.write_text("layer,contribution\n0,1\n")
    with pytest.raises(LayerSpecError, match="ranks only 1"):
        parse_layer_spec(f"top:2@{few}", 4)
    with pytest.raises(LayerSpecError, match="k=5"):
        parse_layer_spec(f"top:5@{few}", 4)
    other = tmp_path / "other.csv"
    other.write_text("layer,contribution\n6,1\n")
    with pytest.raises(LayerSpecError, match="layer 6.*4 layers"):
        parse_layer_spec(f"top:1@{other}", 4)


def _profile(tmp_path, values, num_layers=None):
    """A contributions.csv over len(values) layers (relative depth as a sweep writes it)."""
    L = num_layers or len(values)
    f = tmp_path / "contributions.csv"
    f.write_text("condition,layer,relative_depth,contribution\n" + "".join(
        f"c,{i},{i / (L - 1)},{v}\n" for i, v in enumerate(values)))
    return f


def test_bottom_k_is_the_worst_k_and_ties_go_to_the_lower_index(tmp_path):
    f = _profile(tmp_path, [0.5, 0.1, 0.9, 0.1, 0.3])
    assert parse_layer_spec(f"bottom:1@{f}", 5) == [1]
    assert parse_layer_spec(f"bottom:3@{f}", 5) == [1, 3, 4]
    assert parse_layer_spec(f"top:2@{f}", 5) == [0, 2]
    with pytest.raises(LayerSpecError, match="bottom 6|k=6"):
        parse_layer_spec(f"bottom:6@{f}", 5)


def test_a_profile_from_another_model_is_refused(tmp_path):
    f = _profile(tmp_path, [0.5, 0.1, 0.9, 0.1])  # measured on 4 layers
    with pytest.raises(LayerSpecError, match="measured on a model with 4 layers.*this model has 8 layers"):
        parse_layer_spec(f"top:2@{f}", 8)


def test_random_k_is_seeded_distinct_and_differs_between_draws():
    draws = {tuple(parse_layer_spec(f"random:3@{seed}", 12)) for seed in range(6)}
    assert len(draws) > 1  # several draws give several sets
    for d in draws:
        assert len(set(d)) == 3 and all(0 <= i < 12 for i in d) and list(d) == sorted(d)
    assert parse_layer_spec("random:3", 12) == parse_layer_spec("random:3@0", 12)  # default seed 0
    assert parse_layer_spec("random:3@5", 12) == parse_layer_spec("random:3@5", 12)
    with pytest.raises(LayerSpecError, match="k=13"):
        parse_layer_spec("random:13", 12)


def test_layer_lr_groups_get_the_resolved_rates_and_frozen_blocks_stay_identical(tmp_path):
    model = tiny("qwen3", layers=4)
    sel = select_layers(model, "all", train_non_block=True)
    f = _profile(tmp_path, [0.1, 0.9, 0.5, 0.2])
    mult = block_lr_multipliers(sel.indices, sel.num_layers, {f"top:2@{f}": 2.0, "0": 0.5}, "all")
    assert mult == {0: 0.5, 1: 2.0, 2: 2.0, 3: 1.0}
    groups = param_groups(model, sel, mult)
    assert sorted(g["lr_mult"] for g in groups) == [0.5, 1.0, 2.0]
    ids = {m: {id(p) for p in g["params"]} for g in groups for m in [g["lr_mult"]]}
    assert {id(p) for p in model.model.layers[1].parameters()} <= ids[2.0]
    assert {id(p) for p in model.model.layers[0].parameters()} <= ids[0.5]
    assert id(model.model.embed_tokens.weight) in ids[1.0]  # outside the blocks: the base rate
    assert sum(len(g["params"]) for g in groups) == len(trainable_parameters(model))
    # one multiplier: exactly the plain parameter list
    single = param_groups(model, sel, {i: 1.0 for i in sel.indices})
    assert len(single) == 1 and single[0]["params"] == trainable_parameters(model)
    # a rate for a frozen block is an error, not a silent no-op
    sel = select_layers(model, "1-2")
    with pytest.raises(LayerSpecError, match=r"block\(s\) \[0\] are frozen"):
        block_lr_multipliers(sel.indices, sel.num_layers, {"0-1": 2.0}, "1-2")
    with pytest.raises(LayerSpecError, match="positive number"):
        block_lr_multipliers(sel.indices, sel.num_layers, {"1": 0}, "1-2")
    # frozen blocks stay bit-identical under grouped rates
    fp = fingerprint_frozen(model)
    opt = torch.optim.AdamW(param_groups(model, sel, {1: 2.0, 2: 1.0}), lr=1e-2)
    ids_ = torch.randint(0, 64, (2, 6))
    model(ids_, labels=ids_).loss.backward()
    opt.step()
    assert frozen_unchanged(model, fp) == (True, [])


# --- block discovery ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arch, path",
    [
        ("qwen2", "model.layers"),
        ("qwen3", "model.layers"),
        ("llama", "model.layers"),
        ("mistral", "model.layers"),
        ("phi", "model.layers"),
        ("gpt2", "transformer.h"),
        ("gpt_neox", "gpt_neox.layers"),
    ],
)
def test_find_blocks(arch, path):
    model = tiny(arch, layers=3)
    found, blocks = find_blocks(model)
    assert found == path
    assert isinstance(blocks, torch.nn.ModuleList)
    assert len(blocks) == 3
    assert blocks is model.get_submodule(path)


class Wrapped(torch.nn.Module):
    """An unusual layout: no known path, blocks nested under a custom name."""

    def __init__(self):
        super().__init__()
        self.config = transformers.PretrainedConfig(num_hidden_layers=3)
        self.embed = torch.nn.Embedding(10, 8)
        self.stack = torch.nn.Module()
        self.stack.heads = torch.nn.ModuleList([torch.nn.Linear(8, 1) for _ in range(3)])
        self.stack.blocks = torch.nn.ModuleList([torch.nn.Linear(8, 8) for _ in range(3)])
        mixed = [torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8)]
        self.stack.mixed = torch.nn.ModuleList(mixed)


def test_find_blocks_discovery_and_explicit_path():
    model = Wrapped()
    path, blocks = find_blocks(model)
    assert path == "stack.blocks" and blocks is model.stack.blocks
    assert find_blocks(model, "stack.heads")[0] == "stack.heads"
    with pytest.raises(LayerSpecError, match="'stack.nope'"):
        find_blocks(model, "stack.nope")
    with pytest.raises(LayerSpecError, match="'embed'"):
        find_blocks(model, "embed")


def test_find_blocks_explicit_path_on_hf_model():
    model = tiny("qwen3")
    path, blocks = find_blocks(model, "model.layers")
    assert path == "model.layers" and len(blocks) == 4


def test_find_blocks_failure_suggests_explicit_path():
    model = Wrapped()
    model.config.num_hidden_layers = 5
    with pytest.raises(LayerSpecError, match="pass the attribute path"):
        find_blocks(model)


# --- freezing -------------------------------------------------------------------------------------


def test_select_layers_freezes_all_but_block():
    model = tiny("qwen3")
    sel = select_layers(model, "2")
    assert sel.indices == [2] and sel.num_layers == 4 and sel.block_path == "model.layers"
    assert sel.label == "L2"
    assert sel.trainable_names
    for name, p in model.named_parameters():
        assert p.requires_grad == name.startswith("model.layers.2."), name
    block = model.model.layers[2]
    names = set(sel.trainable_names)
    assert any("self_attn" in n for n in names) and any("mlp" in n for n in names)
    assert any("layernorm" in n for n in names)
    assert sel.trainable_params == sum(p.numel() for p in block.parameters())
    trainable, total = count_parameters(model)
    assert (trainable, total) == (sel.trainable_params, sel.total_params)
    assert total == sum(p.numel() for p in model.parameters())
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert trainable + frozen == total
    assert not model.model.embed_tokens.weight.requires_grad
    assert not model.model.norm.weight.requires_grad
    assert sum(p.numel() for p in trainable_parameters(model)) == trainable


def test_select_layers_reselect_and_none_all():
    model = tiny("gpt2")
    select_layers(model, "all")
    sel = select_layers(model, "none")
    assert sel.trainable_params == 0 and sel.trainable_names == [] and sel.label == "none"
    sel = select_layers(model, "all")
    assert sel.label == "all"
    assert all(n.startswith("transformer.h.") for n in sel.trainable_names)
    full = select_layers(model, "all", train_non_block=True)
    assert full.trainable_params == full.total_params


def test_select_layers_embeddings_and_tied_head():
    model = tiny("qwen3", tie_word_embeddings=True)
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    sel = select_layers(model, "1", train_lm_head=True)
    assert model.model.embed_tokens.weight.requires_grad  # one shared tensor
    assert "model.embed_tokens.weight" in sel.trainable_names

    untied = tiny("llama", tie_word_embeddings=False)
    sel = select_layers(untied, "1", train_embeddings=True)
    assert "model.embed_tokens.weight" in sel.trainable_names
    assert "lm_head.weight" not in sel.trainable_names
    sel = select_layers(untied, "1", train_lm_head=True)
    assert "lm_head.weight" in sel.trainable_names
    assert "model.embed_tokens.weight" not in sel.trainable_names


# --- frozen verification and reference swap -------------------------------------------------------


def _step(model, ids):
    opt = torch.optim.AdamW(trainable_parameters(model), lr=1e-2, weight_decay=0.1)
    loss = model(ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad()


def test_optimizer_step_leaves_frozen_tensors_bit_identical():
    model = tiny("qwen3")
    select_layers(model, "1")
    fp = fingerprint_frozen(model)
    assert "model.embed_tokens.weight" in fp and "model.layers.1.mlp.up_proj.weight" not in fp
    assert any(name.endswith("inv_freq") for name in fp)  # buffers are checked too
    before = model.model.layers[1].mlp.up_proj.weight.detach().clone()
    _step(model, torch.randint(0, 64, (2, 6)))
    assert not torch.equal(before, model.model.layers[1].mlp.up_proj.weight)
    ok, changed = frozen_unchanged(model, fp)
    assert ok and changed == []


def test_frozen_unchanged_detects_inplace_edit():
    model = tiny("gpt_neox").to(torch.bfloat16)
    select_layers(model, "0")
    fp = fingerprint_frozen(model)
    with torch.no_grad():
        w = model.gpt_neox.layers[2].attention.dense.weight
        w.view(-1)[0] = w.view(-1)[0].item() + 1.0
    ok, changed = frozen_unchanged(model, fp)
    assert not ok and changed == ["gpt_neox.layers.2.attention.dense.weight"]


def test_swap_weights_gives_reference_and_restores():
    model = tiny("qwen3")
    select_layers(model, "middle:1")
    ids = torch.randint(0, 64, (2, 6))
    with torch.no_grad():
        ref_logits = model(ids).logits
    ref = copy_trainable(model)
    assert set(ref) == {n for n, p in model.named_parameters() if p.requires_grad}
    _step(model, ids)
    with torch.no_grad():
        new_logits = model(ids).logits
        assert not torch.equal(new_logits, ref_logits)
        with swap_weights(model, ref):
            assert torch.equal(model(ids).logits, ref_logits)
        assert torch.equal(model(ids).logits, new_logits)
        with pytest.raises(RuntimeError, match="boom"):
            with swap_weights(model, ref):
                raise RuntimeError("boom")
        assert torch.equal(model(ids).logits, new_logits)
    # the optimizer still owns the same Parameter objects after a swap
    _step(model, ids)


def test_swap_weights_rejects_mismatch():
    model = tiny("qwen3")
    with pytest.raises(KeyError):
        with swap_weights(model, {"nope": torch.zeros(1)}):
            pass
    with pytest.raises(ValueError, match="model.norm.weight"):
        with swap_weights(model, {"model.norm.weight": torch.zeros(3)}):
            pass
