"""Training config: shipped YAMLs load, overrides parse, and every wrong value is a ConfigError naming the key."""

from __future__ import annotations

import pytest

from uae_fast.errors import ConfigError
from uae_fast.train import TrainConfig, load_train_config, shipped_configs


def test_every_shipped_config_loads():
    configs = shipped_configs()
    assert {"g4u_tiny", "g4u_uae3b"} <= set(configs)
    for name in configs:
        config = load_train_config(name)
        assert config.batch_size % config.num_generations == 0
        assert config.loss.temperature == config.temperature  # the loss uses the sampling temperature


def test_official_defaults():
    config = load_train_config("g4u_uae3b")
    assert (config.temperature, config.max_completion_length) == (0.7, 512)
    assert (config.lora.r, config.lora.alpha) == (32, 64)
    assert (config.decoder.steps, config.decoder.size, config.decoder.guidance) == (40, 1024, 5.0)


def test_overrides_are_typed_and_dotted():
    config = load_train_config("g4u_tiny", ["max_steps=3", "learning_rate=1e-5", "decoder.steps=2", "lora.r=4"])
    assert config.max_steps == 3 and config.learning_rate == 1e-5 and isinstance(config.learning_rate, float)
    assert config.decoder.steps == 2 and config.lora.r == 4


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["batch_size=30"], "multiple of num_generations"),
        (["num_generations=1", "batch_size=4"], "num_generations must be >= 2"),
        (["max_stepz=3"], "unknown config key 'max_stepz'"),
        (["decoder.stepz=3"], "unknown config key decoder.'stepz'"),
        (["max_steps=three"], "max_steps must be int"),
        (["decoder.size=30"], "decoder.size must be a positive multiple of 8"),
        (["loss.loss_type=ppo"], "loss_type must be one of"),
        (["loss.temperature=0.5"], "set temperature at the top level"),
        (["data.on_bad_image=ignore"], "data.on_bad_image must be 'skip' or 'abort'"),
        (["data.images=''"], "no training data"),
        (["data.demo=true"], "unknown config key data.'demo'"),
        (["stage=g2u"], "stage must be one of"),
        (["reward.weights={nope: 1.0}"], "unknown backbone 'nope'"),
        (["max_steps"], "must look like key=value"),
    ],
)
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.").replace("'", "'")):
        load_train_config("g4u_tiny", overrides)


def test_reward_is_required_for_real_models():
    with pytest.raises(ConfigError, match="reward is not set"):
        TrainConfig.from_dict({"model": "uae-3b"})


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_train_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_train_config(bad)


def test_round_trip_through_dict():
    config = load_train_config("g4u_tiny")
    assert TrainConfig.from_dict(config.to_dict()) == config
