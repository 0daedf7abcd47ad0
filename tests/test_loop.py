"""The training loop (onelayer.train.loop) driving its collaborators: a drop-in rollout sampler."""

from __future__ import annotations

import pytest

from onelayer.rollout import sample


@pytest.mark.slow
def test_trainer_drives_a_drop_in_sampler_like_vllm(tmp_path, monkeypatch):
    """The rollout_backend hook: the trainer syncs weights into the sampler before every rollout, asks it
    for no hidden states, and computes the frozen prefix once per batch itself."""
    import onelayer.train.loop as loop
    from onelayer.config import TrainConfig

    calls = {"sync": 0, "sample": 0}

    class FakeEngine:
        captures_hidden_states = False

        def sync_weights(self, model):
            calls["sync"] += 1
            assert all(p.requires_grad == n.startswith("model.layers.3.") for n, p in model.named_parameters())

        def __call__(self, model, prompts, **kw):
            assert "capture_block" not in kw  # an engine hands out no hidden states
            calls["sample"] += 1
            return sample(model, prompts, **kw)

    monkeypatch.setattr(loop, "rollout_sampler", lambda *a, **k: FakeEngine())
    cfg = TrainConfig(layers="3", warm_start=False, max_steps=2, prompts_per_step=4, num_generations=4,
                      max_completion_length=8, task_opts={"n_eval": 8}, progress=False, save_every=100, threads=1)
    record = loop.run(cfg, tmp_path / "run", log=lambda *_: None)
    assert calls == {"sync": 2, "sample": 2}
    assert record["frozen_unchanged"]

