import pytest

from alexnet_pp.config import (
    ConfigError,
    from_dict,
    load_config,
    parse_override_args,
    preset,
)


def test_paper_preset_is_the_paper():
    cfg = preset("paper")
    m, t = cfg.model, cfg.train
    assert (m.width, m.image_size, m.num_classes, m.lrn_order) == (1.0, 224, 1000, "paper")
    assert (m.lrn_size, m.lrn_alpha, m.lrn_beta, m.lrn_k, m.dropout) == (5, 1e-4, 0.75, 2.0, 0.5)
    assert (t.batch_size, t.lr, t.momentum, t.weight_decay, t.schedule, t.lr_factor) == (
        128, 0.01, 0.9, 5e-4, "plateau", 0.1)
    assert cfg.data.stored_size == 256


def test_paper_preset_needs_imagenet_shards():
    with pytest.raises(ConfigError, match="synthetic_classes"):
        load_config("paper")
    cfg = load_config("paper", overrides={"data.train": "/x/train-{000000..000009}.tar", "data.val": "/x/val"})
    assert cfg.model.num_classes == 1000


@pytest.mark.parametrize("name", ["demo", "test"])
def test_small_presets_validate(name):
    cfg = load_config(name)
    assert cfg.model.num_classes == cfg.data.synthetic_classes


def test_overrides_are_typed():
    cfg = load_config("test", overrides=parse_override_args(["--train.lr", "0.02", "--model.width=0.5",
                                                             "--data.flip", "false", "--parallel.partition", "3,6"]))
    assert cfg.train.lr == 0.02 and isinstance(cfg.train.lr, float)
    assert cfg.model.width == 0.5
    assert cfg.data.flip is False
    assert cfg.parallel.partition == "3,6"


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lr: 0.05\n  epochs: 2\nmodel:\n  lrn_order: caffenet\n")
    cfg = load_config("test", path, {"train.epochs": "3"})
    assert cfg.train.lr == 0.05 and cfg.train.epochs == 3 and cfg.model.lrn_order == "caffenet"


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"train.lrr": "1"}, "unknown setting 'train.lrr'"),
        ({"train.lr": "fast"}, "expected a number"),
        ({"model.lrn_order": "sideways"}, "not one of"),
        ({"parallel.tp": "3"}, "not one of"),
        ({"model.width": "0.3"}, "whole number"),
        ({"model.image_size": "60"}, "at least 64"),
        ({"data.stored_size": "60"}, "smaller than model.image_size"),
        ({"data.train": "/x/train.tar"}, "set both"),
        ({"data.resampled": "true"}, "epoch_samples"),
        ({"data.decode": "gpu"}, "gpus_per_worker is 0"),
    ],
)
def test_bad_configs_fail_with_what_to_change(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("test", overrides=overrides)


def test_round_trip_through_dict():
    cfg = load_config("demo", overrides={"parallel.pp": "2", "train.lr": "0.03"})
    again = from_dict(cfg.to_dict())
    assert again == cfg


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="needs a value"):
        parse_override_args(["--train.lr"])
    with pytest.raises(ConfigError, match="--section.key"):
        parse_override_args(["lr=3"])


def test_every_setting_can_be_given_on_the_command_line_top_level_ones_too():
    overrides = parse_override_args(["--name", "exp1", "--out-dir", "/tmp/r", "--out_dir=/tmp/s", "--train.lr", "0.1"])
    assert overrides == {"name": "exp1", "out_dir": "/tmp/s", "train.lr": "0.1"}
    cfg = load_config("test", overrides=overrides)
    assert (cfg.name, cfg.out_dir, cfg.train.lr) == ("exp1", "/tmp/s", 0.1)
    with pytest.raises(ConfigError, match="--name"):
        parse_override_args(["--nme", "x"])


def test_presets_are_data_on_top_of_the_paper_defaults():
    from alexnet_pp.config import PRESETS, RunConfig

    assert preset("paper").model == RunConfig().model and preset("paper").train == RunConfig().train
    for name, settings in PRESETS.items():
        cfg = preset(name)
        for section, values in settings.items():
            if isinstance(values, dict):
                for key, value in values.items():
                    assert getattr(getattr(cfg, section), key) == value, (name, section, key)
    assert preset("demo") is not preset("demo") and preset("demo") == preset("demo")  # fresh copies
