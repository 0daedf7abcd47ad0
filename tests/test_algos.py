"""Unit tests for onelayer.algos against hand-computed numbers (worked out in the comments)."""

import math

import pytest
import torch

from onelayer.algos import (
    ADVANTAGES,
    LOSS_AGGREGATIONS,
    PRESETS,
    AlgoPreset,
    anchor_group_stats,
    get_preset,
    gigpo_advantages,
    group_advantages,
    kl_k3,
    merge_duplicate_rows,
    policy_loss,
)

T = torch.tensor
LN2 = math.log(2.0)


def close(actual, expected, tol=1e-5):
    torch.testing.assert_close(actual, T(expected, dtype=actual.dtype), rtol=tol, atol=tol)


# ----------------------------------------------------------------------------- group advantages

# Two groups.  group 0: rewards [1, 3]  -> mean 2, dev [-1, 1], unbiased std sqrt(2/1) = 1.41421
#              group 1: rewards [0, 0, 3] -> mean 1, dev [-1, -1, 2], unbiased std sqrt(6/2) = 1.73205
# all five rewards [1, 3, 0, 0, 3]: mean 1.4, squared devs .16+2.56+1.96+1.96+2.56 = 9.2,
#   unbiased std sqrt(9.2/4) = sqrt(2.3) = 1.516575
REWARDS = [1.0, 3.0, 0.0, 0.0, 3.0]
GROUPS = [0, 0, 1, 1, 1]


def test_group_scale_none():
    close(group_advantages(T(REWARDS), T(GROUPS), scale="none"), [-1.0, 1.0, -1.0, -1.0, 2.0])


def test_group_scale_group():
    # dev / std: ±1/1.41421 = ±0.707107 ; [-1,-1,2]/1.73205 = [-0.577350, -0.577350, 1.154701]
    close(
        group_advantages(T(REWARDS), T(GROUPS), scale="group"),
        [-0.707107, 0.707107, -0.577350, -0.577350, 1.154701],
    )


def test_group_scale_batch():
    # dev / 1.516575: ±0.659380 and 2/1.516575 = 1.318761
    close(
        group_advantages(T(REWARDS), T(GROUPS), scale="batch"),
        [-0.659380, 0.659380, -0.659380, -0.659380, 1.318761],
    )


def test_group_singleton_and_constant_groups_are_zero():
    # group 5 has one member, group 2 has three equal (non-representable) rewards -> exactly 0, no NaN
    rewards = T([0.7, 0.1, 0.1, 0.1])
    ids = T([5, 2, 2, 2])
    for scale in ("group", "batch", "none"):
        adv = group_advantages(rewards, ids, scale=scale)
        assert torch.equal(adv, torch.zeros(4)), (scale, adv)
    # a whole batch of one
    assert torch.equal(group_advantages(T([3.0]), T([0])), T([0.0]))


def test_group_non_contiguous_unsorted_ids():
    # same two groups as above with ids 7 / 3 interleaved, plus a singleton id 42
    rewards = T([0.0, 1.0, 0.0, 3.0, 5.0, 3.0])
    ids = T([3, 7, 3, 7, 42, 3])
    close(
        group_advantages(rewards, ids, scale="group"),
        [-0.577350, -0.707107, -0.577350, 0.707107, 0.0, 1.154701],
    )


def test_group_integer_rewards_and_bad_scale():
    close(group_advantages(T([1, 3]), T([0, 0]), scale="none"), [-1.0, 1.0])
    with pytest.raises(ValueError, match="scale"):
        group_advantages(T(REWARDS), T(GROUPS), scale="std")


# ----------------------------------------------------------------------------- GiGPO
#
# group 0 has two trajectories, group 1 one trajectory; rows listed in time order per trajectory:
#   τ0 (group 0): rewards [0, 0, 1], anchors s0 s1 s2
#   τ1 (group 0): rewards [0, 0],    anchors s0 s3
#   τ2 (group 1): rewards [1, 1],    anchors s0 s0   (revisits s0; "s0" here is NOT group 0's s0)
# Episode: R = [1, 0 | 1]; group 0 mean 0.5 (per trajectory, not per step: per step it'd be 0.6)
#   A_E = τ0 +0.5, τ1 -0.5, τ2 0 (singleton group)
# Steps with γ = 0.5: τ0 R_t = [0.25, 0.5, 1], τ1 [0, 0], τ2 [1 + 0.5·1 = 1.5, 1]
#   anchor groups: (0,s0) = {τ0t0: .25, τ1t0: 0} mean .125 -> ±.125; (1,s0) = {1.5, 1} mean 1.25 -> ±.25
#   others singleton -> 0
TRAJ = [0, 0, 0, 1, 1, 2, 2]
GIDS = [0, 0, 0, 0, 0, 1, 1]
STEP_R = [0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0]
ANCHORS = ["s0", "s1", "s2", "s0", "s3", "s0", "s0"]


def gigpo(**kw):
    return gigpo_advantages(T(STEP_R), T(TRAJ), T(GIDS), ANCHORS, **kw)


def test_gigpo_shared_singleton_anchors_and_discount():
    # A = A_E + A_S
    close(gigpo(gamma=0.5), [0.625, 0.5, 0.5, -0.625, -0.5, 0.25, -0.25])


def test_gigpo_gamma_one():
    # γ = 1: τ0 R_t = [1, 1, 1], τ1 [0, 0], τ2 [2, 1] -> (0,s0) ±0.5, (1,s0) ±0.5
    close(gigpo(gamma=1.0), [1.0, 0.5, 0.5, -1.0, -0.5, 0.5, -0.5])


def test_gigpo_omega():
    # ω = 2 doubles only the step part: τ0t0 0.5 + 2·0.125 = 0.75
    close(gigpo(gamma=0.5, omega=2.0), [0.75, 0.5, 0.5, -0.75, -0.5, 0.5, -0.5])
    # ω = 0 leaves the episode advantage
    close(gigpo(gamma=0.5, omega=0.0), [0.5, 0.5, 0.5, -0.5, -0.5, 0.0, 0.0])


def test_gigpo_group_scale():
    # A_E: returns [1, 0] have unbiased std sqrt(0.5) = 0.707107 -> ±0.5/0.707107 = ±0.707107
    # A_S: (0,s0) values [.25, 0] std .125·sqrt2 = 0.176777 -> ±0.707107; (1,s0) [1.5, 1] std 0.353553 -> ±0.707107
    close(
        gigpo(gamma=0.5, scale="group"),
        [1.414214, 0.707107, 0.707107, -1.414214, -0.707107, 0.707107, -0.707107],
    )


def test_gigpo_interleaved_rows_and_ids():
    # same steps, trajectories interleaved and renumbered (ids 10/4/99, groups 8/3): answer is permuted
    order = [0, 3, 1, 5, 4, 2, 6]  # τ0t0 τ1t0 τ0t1 τ2t0 τ1t1 τ0t2 τ2t1
    tid = {0: 10, 1: 4, 2: 99}
    gid = {0: 8, 1: 3}
    adv = gigpo_advantages(
        T([STEP_R[i] for i in order]),
        T([tid[TRAJ[i]] for i in order]),
        T([gid[GIDS[i]] for i in order]),
        [ANCHORS[i] for i in order],
        gamma=0.5,
    )
    expected = [0.625, 0.5, 0.5, -0.625, -0.5, 0.25, -0.25]
    close(adv, [expected[i] for i in order])


def test_gigpo_rejects_bad_input():
    with pytest.raises(ValueError, match="same group_id"):
        gigpo_advantages(T([1.0, 0.0]), T([0, 0]), T([0, 1]), ["a", "b"])
    with pytest.raises(ValueError, match="anchor_keys"):
        gigpo_advantages(T([1.0, 0.0]), T([0, 0]), T([0, 0]), ["a"])
    with pytest.raises(ValueError, match="scale"):
        gigpo(scale="batch")


def test_anchor_group_stats():
    # anchor groups: (0,s0)×2, (0,s1), (0,s2), (0,s3), (1,s0)×2 -> 5 groups, 4 of 7 steps in size>1, 7/5 = 1.4
    stats = anchor_group_stats(T(GIDS), ANCHORS)
    assert stats["num_anchor_groups"] == 5
    assert stats["share_in_groups_gt1"] == pytest.approx(4 / 7)
    assert stats["mean_anchor_group_size"] == pytest.approx(1.4)


@pytest.mark.parametrize("name", sorted(ADVANTAGES))
def test_every_registered_estimator_gives_zero_where_there_is_nothing_to_compare(name):
    """The registry's contract: one advantage per row; 0 for a group of one and for a group whose episodes
    all got the same reward; nonzero where rewards differ."""
    est = ADVANTAGES[name]
    traj, groups, anchors = T([0, 1, 2, 3, 4]), T([0, 0, 1, 1, 2]), ["a", "a", "b", "b", "c"]
    adv = est.fn(T([1.0, 0.0, 0.5, 0.5, 1.0]), traj, groups, anchors, scale=est.scales[0], preset=get_preset("grpo"))
    assert adv.shape == (5,) and torch.isfinite(adv).all()
    assert adv[2:].abs().max() == 0 and adv[0] > 0 > adv[1]


def test_a_registered_estimator_is_what_the_trainer_runs(tmp_path):
    """Adding an estimator is one decorated function: `--advantage NAME` then runs it (docs/extending.md)."""
    from onelayer.algos import advantage_estimator
    from onelayer.config import TrainConfig
    from onelayer.io import read_json, read_jsonl
    from onelayer.train.loop import run

    calls = []

    @advantage_estimator("test_zero", scales=("none",))
    def zero_advantages(step_rewards, traj_ids, group_ids, anchors, *, scale, preset):
        calls.append((len(step_rewards), scale))
        return torch.zeros(len(step_rewards))

    try:
        cfg = TrainConfig(advantage="test_zero", scale_rewards="none", warm_start=False, max_steps=1,
                          prompts_per_step=2, num_generations=2, max_completion_length=4, task_opts={"n_eval": 4},
                          progress=False, threads=1, save_model=False)
        run(cfg, tmp_path / "run", log=lambda *_: None)
    finally:
        ADVANTAGES.pop("test_zero")
    assert calls == [(4, "none")]
    step = read_jsonl(tmp_path / "run" / "metrics.jsonl")[0]
    assert step["loss"] == 0 and step["grad_norm"] == 0  # zero advantages, beta 0: nothing to learn
    assert read_json(tmp_path / "run" / "config.json")["advantage"] == "test_zero"


def one_step_advantages(name, rewards, group_ids, preset=None, **kw):
    """Estimator ``name`` of ADVANTAGES on one-step episodes: each row is a trajectory of one step, and every
    episode of a group starts in the same state (one anchor per group)."""
    return ADVANTAGES[name].fn(rewards, torch.arange(len(rewards)), group_ids, [int(g) for g in group_ids],
                               preset=preset, **kw)


# three groups of four: mixed rewards, mixed rewards, one constant group (no signal: zero advantage)
BATCH_REWARDS = T([1.0, 0.0, 0.0, 1.0, 0.2, 0.9, 0.4, 0.4, 0.5, 0.5, 0.5, 0.5])
BATCH_GROUPS = T([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])


def per_group_sums(adv, group_ids):
    return torch.zeros(int(group_ids.max()) + 1).index_add_(0, group_ids, adv)


@pytest.mark.parametrize("name", sorted(ADVANTAGES))
@pytest.mark.parametrize("scale", ["none", "group"])
def test_every_advantage_estimator_centres_each_group_and_zeroes_constant_ones(name, scale):
    adv = one_step_advantages(name, BATCH_REWARDS, BATCH_GROUPS, scale=scale)
    assert adv.shape == BATCH_REWARDS.shape and torch.isfinite(adv).all()
    close(per_group_sums(adv, BATCH_GROUPS), [0.0, 0.0, 0.0])
    assert torch.equal(adv[BATCH_GROUPS == 2], torch.zeros(4))
    # a better reward in its group never gets a smaller advantage
    for g in range(2):
        r, a = BATCH_REWARDS[BATCH_GROUPS == g], adv[BATCH_GROUPS == g]
        assert all(a[i] >= a[j] for i in range(4) for j in range(4) if r[i] > r[j])


# ----------------------------------------------------------------------------- policy loss


def ratios_to_logp(ratios):
    """old_logp = 0 so that ρ = exp(logp) is the given ratio; returns leaf logp, old_logp."""
    logp = torch.log(T(ratios, dtype=torch.float32)).requires_grad_(True)
    return logp, torch.zeros_like(logp)


def test_clipping_both_sides_and_grads():
    # ε = 0.2, one sequence of 5 tokens, per-token advantages, token-mean over 5 tokens:
    #   ρ=1.5, A=+1: min(1.5, 1.2)   = 1.2  -> ℓ = -1.2  clipped high, grad 0
    #   ρ=0.5, A=-1: min(-0.5, -0.8) = -0.8 -> ℓ = +0.8  clipped low,  grad 0
    #   ρ=1.5, A=-1: min(-1.5, -1.2) = -1.5 -> ℓ = +1.5  unclipped, dℓ/dlogp = -ρA = +1.5
    #   ρ=0.5, A=+1: min(0.5, 0.8)   = 0.5  -> ℓ = -0.5  unclipped, dℓ/dlogp = -0.5
    #   ρ=1.0, A=+2:                         ℓ = -2.0  unclipped, dℓ/dlogp = -2.0
    # loss = (-1.2 + 0.8 + 1.5 - 0.5 - 2.0) / 5 = -1.4/5 = -0.28; grads divided by 5
    logp, old = ratios_to_logp([[1.5, 0.5, 1.5, 0.5, 1.0]])
    adv = T([[1.0, -1.0, -1.0, 1.0, 2.0]])
    loss, stats = policy_loss(logp, old, adv, torch.ones(1, 5, dtype=torch.bool), agg="token-mean")
    close(loss, -0.28)
    loss.backward()
    close(logp.grad, [[0.0, 0.0, 0.3, -0.1, -0.4]])
    assert stats["clip_frac"] == pytest.approx(0.4)
    assert stats["clip_frac_low"] == pytest.approx(0.2)
    assert stats["clip_frac_high"] == pytest.approx(0.2)
    assert stats["ratio_mean"] == pytest.approx((1.5 + 0.5 + 1.5 + 0.5 + 1.0) / 5)  # 1.0
    assert stats["kl"] == 0.0
    assert stats["loss"] == pytest.approx(-0.28)


def test_asymmetric_clip_high():
    # ε_low = 0.2, ε_high = 0.28:
    #   ρ=1.25, A=+1: inside [0.8, 1.28] -> ℓ = -1.25, grad -1.25 (symmetric ε would clip: ℓ = -1.2, grad 0)
    #   ρ=0.75, A=-1: below 0.8          -> ℓ = +0.8, grad 0, clipped low
    # token-mean: loss = (-1.25 + 0.8)/2 = -0.225; grads [-0.625, 0]
    logp, old = ratios_to_logp([[1.25, 0.75]])
    adv = T([[1.0, -1.0]])
    mask = torch.ones(1, 2)
    loss, stats = policy_loss(logp, old, adv, mask, clip_eps_high=0.28, agg="token-mean")
    close(loss, -0.225)
    loss.backward()
    close(logp.grad, [[-0.625, 0.0]])
    assert stats["clip_frac_high"] == 0.0 and stats["clip_frac_low"] == pytest.approx(0.5)

    logp, old = ratios_to_logp([[1.25, 0.75]])
    loss, stats = policy_loss(logp, old, adv, mask, agg="token-mean")  # symmetric 0.2
    close(loss, (-1.2 + 0.8) / 2)
    loss.backward()
    close(logp.grad, [[0.0, 0.0]])
    assert stats["clip_frac"] == pytest.approx(1.0)


# 2×3 example, ρ = 1 everywhere so ℓ = -A.  A = [[1,2,3],[4,5,6]], mask [[1,1,0],[1,0,0]]
#   masked ℓ: row0 [-1, -2], row1 [-4]; Σ = -7, 3 tokens
#   seq-mean-token-mean:     mean(-3/2, -4/1) = -2.75
#   seq-mean-token-sum-norm: -7 / (2·3) = -1.1666667;  with norm_len 7: -7/14 = -0.5
#   token-mean:              -7 / 3 = -2.3333333
AGG_ADV = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
AGG_MASK = [[1, 1, 0], [1, 0, 0]]


@pytest.mark.parametrize(
    "agg,norm_len,expected",
    [
        ("seq-mean-token-mean", None, -2.75),
        ("seq-mean-token-sum-norm", None, -7 / 6),
        ("seq-mean-token-sum-norm", 7, -0.5),
        ("token-mean", None, -7 / 3),
    ],
)
def test_aggregations(agg, norm_len, expected):
    logp = torch.zeros(2, 3, requires_grad=True)
    loss, stats = policy_loss(
        logp, torch.zeros(2, 3), T(AGG_ADV), T(AGG_MASK, dtype=torch.float32), agg=agg, norm_len=norm_len
    )
    close(loss, expected)
    assert stats["loss"] == pytest.approx(expected)


@pytest.mark.parametrize("agg", LOSS_AGGREGATIONS)
def test_every_aggregation_is_the_token_mean_when_every_row_is_full_length(agg):
    # the aggregations differ only in how they weigh rows of different lengths (and norm_len defaults to T)
    logp = torch.zeros(2, 3, requires_grad=True)
    loss, stats = policy_loss(logp, torch.zeros(2, 3), T(AGG_ADV), torch.ones(2, 3), agg=agg)
    close(loss, -21 / 6)
    loss.backward()
    close(logp.grad, (-T(AGG_ADV) / 6).tolist())


def test_an_unknown_aggregation_names_the_valid_ones():
    z = torch.zeros(1, 2)
    with pytest.raises(ValueError) as e:
        policy_loss(z, z, T([1.0]), torch.ones(1, 2), agg="sum")
    assert "'sum'" in str(e.value) and all(agg in str(e.value) for agg in LOSS_AGGREGATIONS)


def test_sequence_advantages_broadcast_and_empty_row():
    # A per sequence [2, -1]; row 1 has no tokens: it contributes 0 but still counts in the mean over B.
    # seq-mean-token-mean: row0 ℓ = -2 on 2 tokens -> -2; row1 -> 0; mean = -1
    logp = torch.zeros(2, 3, requires_grad=True)
    mask = T([[1, 1, 0], [0, 0, 0]], dtype=torch.bool)
    loss, stats = policy_loss(logp, torch.zeros(2, 3), T([2.0, -1.0]), mask)
    close(loss, -1.0)
    loss.backward()
    assert torch.isfinite(logp.grad).all()
    close(logp.grad, [[-0.5, -0.5, 0.0], [0.0, 0.0, 0.0]])  # -A / 2 tokens / B=2 on row 0


def test_padding_garbage_does_not_change_loss_or_grads():
    mask = T([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    old = T([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]])
    ref = T([[-1.2, -1.8, 0.0], [-0.4, 0.0, 0.0]])
    clean = T([[-0.9, -2.3, 0.0], [-0.7, 0.0, 0.0]])
    dirty = clean.clone()
    dirty[0, 2], dirty[1, 1], dirty[1, 2] = 1e4, float("nan"), -float("inf")
    dirty_old = old.clone()
    dirty_old[1, 2] = float("inf")
    adv = T([[1.0, -1.0, float("nan")], [2.0, 1e9, -1e9]])
    for agg in LOSS_AGGREGATIONS:
        results = []
        for lp, ol in ((clean, old), (dirty, dirty_old)):
            logp = lp.clone().requires_grad_(True)
            loss, stats = policy_loss(logp, ol, adv, mask, ref_logp=ref, beta=0.1, agg=agg)
            loss.backward()
            results.append((loss.detach(), logp.grad, stats))
        (l1, g1, s1), (l2, g2, s2) = results
        assert torch.isfinite(l1) and torch.equal(l1, l2), agg
        assert torch.equal(g1, g2), agg
        assert torch.equal(g2[~mask], torch.zeros(3)), agg
        assert s1 == s2, agg


def test_kl_k3_values():
    # d = ref − logp = ln2: 2 − ln2 − 1 = 0.306853 ; d = −ln2: 0.5 + ln2 − 1 = 0.193147 ; d = 0: 0
    close(kl_k3(T([0.0, 0.0, -1.0]), T([LN2, -LN2, -1.0])), [0.306853, 0.193147, 0.0])


def test_kl_penalty_in_loss():
    # ρ = 1 and A = 0 so only the KL term remains; mean k3 = (0.306853 + 0.193147)/2 = 0.25
    # β = 0.1, token-mean: loss = 0.025; dk3/dlogp = 1 − exp(ref − logp) = [1 − 2, 1 − 0.5] = [-1, 0.5]
    #   -> grad = 0.1 · [-1, 0.5] / 2 = [-0.05, 0.025]
    logp = torch.zeros(1, 2, requires_grad=True)
    ref = T([[LN2, -LN2]])
    loss, stats = policy_loss(
        logp, torch.zeros(1, 2), T([0.0]), torch.ones(1, 2), ref_logp=ref, beta=0.1, agg="token-mean"
    )
    close(loss, 0.025)
    assert stats["kl"] == pytest.approx(0.25, abs=1e-6)
    loss.backward()
    close(logp.grad, [[-0.05, 0.025]])
    # ref given but β = 0: KL is reported, not added
    loss0, stats0 = policy_loss(
        torch.zeros(1, 2), torch.zeros(1, 2), T([0.0]), torch.ones(1, 2), ref_logp=ref, agg="token-mean"
    )
    assert float(loss0) == 0.0 and stats0["kl"] == pytest.approx(0.25, abs=1e-6)


def test_policy_loss_errors():
    z = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(z, z, T([1.0]), torch.ones(1, 2), beta=0.1)
    with pytest.raises(ValueError, match="agg"):
        policy_loss(z, z, T([1.0]), torch.ones(1, 2), agg="sum")
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(z, z, T([1.0, 2.0, 3.0]), torch.ones(1, 2))


# ----------------------------------------------------------------------------- presets


def test_get_preset_finds_every_preset_and_an_unknown_name_lists_them():
    for name, p in PRESETS.items():
        assert get_preset(name) is p and p.name == name
        assert p.advantage in ADVANTAGES and p.loss_agg in LOSS_AGGREGATIONS
    with pytest.raises(ValueError) as e:
        get_preset("ppo")
    assert "unknown algorithm 'ppo'" in str(e.value) and all(name in str(e.value) for name in PRESETS)


def preset_step(p: AlgoPreset, rewards, group_ids, lengths):
    """One update of preset ``p`` at ratio 1: its advantages, then its loss over rows of ``lengths`` tokens."""
    adv = one_step_advantages(p.advantage, rewards, group_ids, scale=p.scale, preset=p)
    width = max(lengths)
    mask = torch.arange(width)[None, :] < T(lengths)[:, None]
    logp = torch.full((len(lengths), width), -1.0, requires_grad=True)
    loss, stats = policy_loss(logp, logp.detach(), adv, mask, ref_logp=logp.detach() - 0.1, beta=p.beta,
                              agg=p.loss_agg)
    loss.backward()
    return adv, loss, stats, logp.grad, mask


LENGTHS = [1, 3, 2, 4, 4, 1, 2, 3, 2, 2, 2, 2]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_runs_its_advantage_and_loss_to_finite_numbers(name):
    p = get_preset(name)
    adv, loss, stats, grad, mask = preset_step(p, BATCH_REWARDS, BATCH_GROUPS, LENGTHS)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert all(math.isfinite(v) for v in stats.values()) and stats["kl"] > 0
    close(per_group_sums(adv, BATCH_GROUPS), [0.0, 0.0, 0.0])
    # descending the loss raises the log-probs of better-than-group completions and lowers the others'
    sign = torch.sign(adv)[:, None].expand_as(grad)
    assert torch.equal(torch.sign(-grad)[mask], sign[mask]) and torch.equal(grad[~mask], torch.zeros(int((~mask).sum())))
    # std scaling makes the advantages blind to the reward's units; without it they are in those units
    scaled, *_ = preset_step(p, 10 * BATCH_REWARDS + 3, BATCH_GROUPS, LENGTHS)
    close(scaled, (adv if p.scale in ("group", "batch") else 10 * adv).tolist(), tol=1e-4)


def token_weights(p: AlgoPreset):
    """|gradient| per token of two rows of equal |advantage| and lengths 1 and 3."""
    *_, grad, mask = preset_step(p, T([1.0, 0.0]), T([0, 0]), [1, 3])
    return grad.abs()[0, 0].item(), grad.abs()[1, 0].item()


def test_grpo_standardises_per_group_and_weighs_every_sequence_alike():
    grpo = get_preset("grpo")
    adv, *_ = preset_step(grpo, BATCH_REWARDS, BATCH_GROUPS, LENGTHS)
    for g in range(2):
        assert adv[BATCH_GROUPS == g].std().item() == pytest.approx(1.0, abs=1e-5)
    short, long = token_weights(grpo)
    assert short == pytest.approx(3 * long)  # a sequence's tokens share its weight


def test_dr_grpo_neither_scales_by_std_nor_weighs_by_length():
    dr = get_preset("dr_grpo")
    adv, *_ = preset_step(dr, BATCH_REWARDS, BATCH_GROUPS, LENGTHS)
    means = torch.stack([BATCH_REWARDS[BATCH_GROUPS == g].mean() for g in range(3)])
    close(adv, (BATCH_REWARDS - means[BATCH_GROUPS]).tolist())
    short, long = token_weights(dr)
    assert short == pytest.approx(long)  # every token weighs the same, however long its sequence


def test_gigpo_on_one_step_episodes_from_one_state_is_grpo_plus_its_step_term():
    # every step is its episode's first and shares the group's start state: the step-level advantage equals
    # the episode-level one, and with the documented omega = 1 it weighs as much, so GiGPO gives twice GRPO's
    gigpo, grpo = get_preset("gigpo"), get_preset("grpo")
    adv, *_ = preset_step(gigpo, BATCH_REWARDS, BATCH_GROUPS, LENGTHS)
    base, *_ = preset_step(grpo, BATCH_REWARDS, BATCH_GROUPS, LENGTHS)
    close(adv, (2 * base).tolist())
    short, long = token_weights(gigpo)
    assert short == pytest.approx(long)  # token-mean: every token of the batch weighs the same


# ----------------------------------------------------------------------------- duplicate merging


def test_merge_duplicate_rows_groups_by_key_and_sign():
    keys = T([[1, 2], [3, 4], [1, 2], [1, 2], [3, 4], [1, 2]])
    adv = T([0.5, -1.0, 1.5, -2.0, 0.0, -1.0])
    rows, weights, merged = merge_duplicate_rows(keys, adv)
    # (key [1,2], +): rows 0, 2 -> mean 1.0; (key [3,4], −): row 1; (key [1,2], −): rows 3, 5 -> −1.5;
    # (key [3,4], 0): row 4. Merged rows keep the order of their first original row.
    assert rows.tolist() == [0, 1, 3, 4]
    assert weights.tolist() == [2.0, 1.0, 2.0, 1.0]
    close(merged, [1.0, -1.0, -1.5, 0.0])
    with pytest.raises(ValueError, match="keys"):
        merge_duplicate_rows(keys, adv[:3])


@pytest.mark.parametrize("agg", LOSS_AGGREGATIONS)
def test_merged_loss_and_gradient_equal_the_full_batch(agg):
    # 4 distinct sequences, each repeated with advantages of both signs; ratios far enough from 1 that
    # both clip sides bite. The merged batch must give the same loss, gradient and stats.
    gen = torch.Generator().manual_seed(0)
    base_logp = -torch.rand(4, 5, generator=gen) * 2
    base_old = base_logp + (torch.rand(4, 5, generator=gen) - 0.5)  # ρ in about [0.6, 1.6]
    base_ref = base_logp - torch.rand(4, 5, generator=gen) * 0.3
    base_mask = T([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    which = T([0, 1, 0, 2, 3, 0, 1, 3, 3, 2, 0])
    adv = T([1.0, -0.5, -2.0, 0.7, 0.0, 0.3, -0.2, 1.1, -0.4, 0.0, 1.0])
    keys = torch.cat([which.unsqueeze(-1), base_mask[which].long()], 1)
    rows, weights, merged = merge_duplicate_rows(keys, adv)
    assert len(rows) < len(which)

    def run(index, a, w):
        leaf = base_logp.clone().requires_grad_(True)
        loss, stats = policy_loss(leaf[which[index]], base_old[which[index]], a, base_mask[which[index]],
                                  ref_logp=base_ref[which[index]], beta=0.05, agg=agg, norm_len=6, weights=w)
        loss.backward()
        return loss.detach(), leaf.grad, stats

    full = run(torch.arange(len(which)), adv, None)
    part = run(rows, merged, weights)
    close(part[0], full[0].item())
    torch.testing.assert_close(part[1], full[1], rtol=1e-5, atol=1e-6)
    for key in full[2]:
        assert part[2][key] == pytest.approx(full[2][key], abs=1e-6), key
    assert full[2]["clip_frac_low"] > 0 and full[2]["clip_frac_high"] > 0
