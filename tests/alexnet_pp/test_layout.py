import pytest
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

from alexnet_pp.config import ConfigError, load_config
from alexnet_pp.layout import Layout


def cfg_for(**kw):
    return load_config("test", overrides={f"parallel.{k}": str(v) for k, v in kw.items()})


def layout_of(cfg, workers=None):
    return Layout.from_config(cfg, workers)


@pytest.mark.parametrize("pp,tp,dp", [(2, 2, 1), (2, 1, 2), (1, 2, 1), (3, 1, 1), (2, 2, 2), (4, 2, 1)])
def test_rank_coordinates_follow_deepspeed(pp, tp, dp):
    topo = layout_of(cfg_for(pp=pp, tp=tp, dp=dp, micro_batches=1))
    ds = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)
    for rank in range(pp * tp * dp):
        c, d = topo.coord(rank), ds.get_coord(rank)
        assert (c.stage, c.tower, c.replica) == (d.pipe, d.model, d.data)
        assert topo.rank_of(c.stage, c.tower, c.replica) == rank
    if tp == 2:  # the towers of a stage are neighbouring ranks (same node under PACK placement)
        assert topo.coord(0).stage == topo.coord(1).stage and topo.coord(1).tower == 1


def test_theoretical_bubble():
    topo = layout_of(cfg_for(pp=2, micro_batches=4, dp=1))
    assert topo.theoretical_bubble() == pytest.approx(1 / 5)


@pytest.mark.parametrize(
    "overrides, workers, message",
    [
        (dict(pp=13), None, "at most 12"),
        (dict(pp=9, tp=2), None, "at most 8"),
        (dict(pp=2, tp=2), 3, "pp × tp × dp"),
        (dict(zero_stage=1), None, "dp ≥ 2"),
        (dict(pp=3, partition="2"), None, "give 2 cut point"),
        (dict(pp=2, partition="13"), None, "increase strictly"),
        (dict(pp=2, partition="abc"), None, "names of the units"),
    ],
)
def test_invalid_layouts_fail_before_workers_start(overrides, workers, message):
    with pytest.raises(ConfigError, match=message):
        layout_of(cfg_for(**overrides), workers=workers)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"parallel.dp": "2", "parallel.micro_batches": "3", "train.batch_size": "16"}, "micro_batch × parallel.micro_batches"),
        ({"train.batch_size": "30", "parallel.dp": "4"}, "divisible by 4"),
        ({"parallel.precision": "fp16"}, "needs GPUs"),
        ({"parallel.cpus_per_worker": "0"}, "cpus_per_worker must be > 0"),
        ({"parallel.micro_batches": "0"}, "micro_batches must be ≥ 1"),
        ({"parallel.activation_checkpoint_interval": "-1"}, "activation_checkpoint_interval"),
    ],
)
def test_batch_precision_and_resources_are_checked_by_the_layout(overrides, message):
    cfg = load_config("test", overrides=overrides)  # the settings parse; the layout refuses them
    with pytest.raises(ConfigError, match=message):
        Layout.from_config(cfg)


def test_workers_derive_the_replicas_or_must_match_them():
    assert Layout.replicas_for(8, pp=2, tp=2) == 2
    with pytest.raises(ConfigError, match="not a multiple of pp × tp = 4"):
        Layout.replicas_for(6, pp=2, tp=2)


def test_a_measured_cut_keeps_everything_else_of_the_layout():
    lay = layout_of(cfg_for(pp=2, micro_batches=4))
    cut = lay.with_bounds((0, 5, 12))
    assert cut.partition.bounds == (0, 5, 12) and cut.shape == lay.shape and cut.micro_batch == lay.micro_batch


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"parallel.precision": "bf16"}, "parallel.precision=bf16 "),
        ({"parallel.precision": "bf16-mixed"}, "parallel.precision=bf16-mixed"),
        ({"parallel.dp": "2", "parallel.zero_stage": "1"}, "parallel.zero_stage=1"),
        ({"parallel.activation_checkpoint_interval": "1"}, "activation_checkpoint_interval > 0"),
        ({"parallel.defer_weight_grads": "true"}, "defer_weight_grads"),
    ],
)
def test_zero_bubble_rejects_what_it_does_not_run(overrides, message):
    cfg = load_config("test", overrides={"parallel.pp": "2", "parallel.schedule": "zb-h1", **overrides})
    with pytest.raises(ConfigError, match=f"zb-h1 .*{message}.*parallel.schedule=1f1b"):
        Layout.from_config(cfg)
    cfg.parallel.schedule = "1f1b"
    Layout.from_config(cfg)  # the same settings are fine under 1F1B


def test_zero_bubble_is_a_schedule_setting():
    cfg = load_config("test", overrides={"parallel.pp": "2", "parallel.schedule": "zb-h1"})
    assert cfg.parallel.schedule == "zb-h1" and load_config("test").parallel.schedule == "1f1b"
    Layout.from_config(cfg)
    with pytest.raises(ConfigError, match="'1f1b', 'zb-h1'"):
        load_config("test", overrides={"parallel.schedule": "zb-h2"})
