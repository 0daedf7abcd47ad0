"""Config validation: unknown keys, bad types and bad values are ConfigErrors naming the key."""

import pytest

from onelayer.config import ConfigError, TrainConfig, load_yaml, make_config


def test_defaults_and_coercion():
    cfg = make_config({"learning_rate": "3e-4", "max_steps": "7", "warm_start": "false", "epsilon_high": "none"})
    assert cfg.learning_rate == 3e-4 and cfg.max_steps == 7 and cfg.warm_start is False and cfg.epsilon_high is None
    assert make_config({}) == TrainConfig()


def test_unknown_key_suggests_close_match():
    with pytest.raises(ConfigError, match="unknown config key 'learning_rat'; did you mean 'learning_rate'"):
        make_config({"learning_rat": 1e-3})


@pytest.mark.parametrize("key,value,msg", [
    ("max_steps", "ten", "'max_steps': 'ten' is not a valid int"),
    ("max_steps", 2.5, "'max_steps': 2.5 is not a valid int"),
    ("algo", "ppo", "'algo': must be one of"),
    ("num_generations", 1, "'num_generations': must be at least 2"),
    ("top_p", 0, "'top_p'"),
    ("loss_type", "sum", "'loss_type'"),
    ("layers", None, "'layers' must not be empty"),
])
def test_bad_values_name_the_key(key, value, msg):
    with pytest.raises(ConfigError, match=msg):
        make_config({key: value})


def test_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_yaml(bad)


def test_gigpo_rejects_batch_scaling():
    with pytest.raises(ConfigError, match="'scale_rewards': the gigpo advantage estimator scales by group or none"):
        make_config({"algo": "gigpo", "scale_rewards": "batch"})
    assert make_config({"algo": "gigpo", "scale_rewards": "none"}).scale_rewards == "none"


def test_none_is_a_value_for_string_keys_and_unsets_numbers():
    assert make_config({"scale_rewards": "none"}).scale_rewards == "none"  # not the preset's group scaling
    assert make_config({"scale_rewards": "null"}).scale_rewards is None
    assert make_config({"max_steps": "none"}).max_steps is None
