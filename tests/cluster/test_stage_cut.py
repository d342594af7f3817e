"""The measured cut corrected by live stage times (cluster/stage_cut.py)."""

import functools

import pytest
import torch

from alexnet_pp.config import ModelConfig
from cluster.spawn import run_local
from alexnet_pp.pipeline import Partition
from cluster.stage_cut import micro_batch_costs, pass_costs, recut, settle_cut, timed_passes

from .test_engine import STEPS, data_factory, gathered_state, layout_cfg, make_batches, reference

CFG = ModelConfig(width=0.25, image_size=64, num_classes=10)
UNITS = [1.0] * 12  # twelve T = 1 units


def cut(*bounds, splits=()):
    return Partition(tuple(bounds), "measured", splits)


def test_a_stage_slower_than_its_units_said_gives_up_units():
    live = [6.0, 9.0]  # stage 1 runs 1.5× what its units promised
    new = recut(CFG, UNITS, cut(0, 6, 12), live, tp=1)
    assert new == cut(0, 7, 12)  # scaled: 6 × 1.0 | 6 × 1.5 → 7.5 vs 7.5
    assert new.stage_costs(CFG, [1.0] * 6 + [1.5] * 6) == [7.5, 7.5] and 7.5 < max(live)


def test_a_recut_may_split_a_tower_half_and_scales_each_share_by_its_stage():
    # stage 0 = conv1, conv2 and conv3.0's first 24 of 48 channels; stage 1 runs half its units' promise
    first = cut(0, 2, 12, splits=(24,))
    assert first.stage_costs(CFG, UNITS) == [2.5, 9.5]
    new = recut(CFG, UNITS, first, [2.5, 4.75], tp=1)
    # scaled: conv1, conv2 1.0 each, conv3.0 0.5 + 0.25, the rest 0.5 each: 7.25 in all, 3.625 a stage,
    # reached 36 of conv4.0's 48 channels in: 1 + 1 + 0.75 + 0.5 + 36/48 · 0.5
    assert (new.bounds, new.splits) == ((0, 4, 12), (36,))
    assert new.stage_costs(CFG, [1.0, 1.0, 0.75] + [0.5] * 9) == [3.625, 3.625]


def test_no_recut_for_a_gain_below_the_threshold():
    assert recut(CFG, UNITS, cut(0, 6, 12), [6.0, 6.1], tp=1) == cut(0, 6, 12)  # at best 0.8% shorter


def test_micro_batch_costs_add_each_micro_batchs_compute_instructions():
    ev = lambda name, t0, t1: {"name": name, "start": t0, "end": t1}  # noqa: E731
    events = [ev("ForwardPass", 0, 1), ev("SendActivation", 1, 5), ev("ForwardPass", 5, 7), ev("BackwardPass", 7, 10),
              ev("BackwardWeightPass", 10, 10.5), ev("BackwardPass", 11, 12), ev("BackwardWeightPass", 12, 13)]
    assert micro_batch_costs(events, 2) == [1 + 3 + 0.5, 2 + 1 + 1]


def test_a_pass_shares_the_steps_end_work_among_its_micro_batches():
    """1F1B's deferred FC weight gradients run once after the last backward pass: a stage holding
    them computes that much more per step than its instructions show."""
    ev = lambda name, t0, t1: {"name": name, "start": t0, "end": t1}  # noqa: E731
    events = [ev("ForwardPass", 0, 1), ev("ForwardPass", 1, 3), ev("BackwardPass", 3, 6), ev("BackwardPass", 6, 7)]
    assert pass_costs(events, 2) == [4.0, 3.0]
    assert pass_costs(events, 2, step_end_seconds=1.0) == [4.5, 3.5]


def test_the_live_check_times_at_least_eight_micro_batches_in_two_passes_or_more():
    assert [timed_passes(m) for m in (1, 2, 3, 4, 8, 16)] == [8, 4, 3, 2, 2, 2]


def test_settle_keeps_the_best_cut_it_measured():
    # live times by cut: the first cut is off, the proposed one better, then it would go back and forth
    live = {cut(0, 6, 12): [6.0, 9.0], cut(0, 7, 12): [7.2, 7.3], cut(0, 8, 12): [8.5, 6.0]}
    built = []
    best, tried = settle_cut(CFG, UNITS, cut(0, 6, 12), 1, measure=lambda: live[built[-1] if built else cut(0, 6, 12)],
                             rebuild=built.append)
    assert best == cut(0, 7, 12) and built[-1] == cut(0, 7, 12)
    assert list(tried) == [cut(0, 6, 12), cut(0, 7, 12)]  # (0, 7, 12) is within 1.5% of its own best


def test_settle_judges_cuts_by_balance_not_by_a_speed_that_drifted_between_their_timings():
    # timed on the paper network: the machine slowed down between the first cut's timing and the next's
    answers = iter([[1.615, 1.813], [1.851, 1.864]])
    built = []
    best, tried = settle_cut(ModelConfig(), [1.0] * 12, cut(0, 2, 12, splits=(38,)), 1,
                             measure=lambda: next(answers), rebuild=built.append, rounds=1)
    assert len(tried) == 2 and built == [best] != cut(0, 2, 12, splits=(38,))  # 0.7% apart, not 11%, though slower


def test_settle_goes_back_when_the_new_cut_measures_worse():
    live = {cut(0, 6, 12): [6.0, 9.0], cut(0, 7, 12): [11.0, 7.0], cut(0, 5, 12): [5.0, 12.0]}
    built = []
    best, tried = settle_cut(CFG, UNITS, cut(0, 6, 12), 1, measure=lambda: live[built[-1] if built else cut(0, 6, 12)],
                             rebuild=built.append, rounds=1)
    assert best == cut(0, 6, 12) and built == [cut(0, 7, 12), cut(0, 6, 12)]


def recut_factory(batches, tp, dp, m, rank):
    """In the rank's process, before its engine is built: equal unit timings (first cut (0, 6, 12)),
    and live passes that run for real but report stage 1 three times slower than stage 0, then
    balanced: the cut moves to (0, 8, 12) and the engine is rebuilt there."""
    import cluster.engine as engine

    real = engine.live_costs
    reported = iter([[1.0, 3.0], [2.0, 2.0]])
    engine.measure_layer_costs = lambda *args, **kwargs: [1.0] * 12

    def live(*args, **kwargs):
        real(*args, **kwargs)  # the passes run; their numbers are replaced
        return next(reported)

    engine.live_costs = live
    return data_factory(batches, tp, dp, m, rank)


@pytest.mark.e2e
@pytest.mark.parametrize("extra", [{}, {"parallel.defer_weight_grads": "true"}, {"parallel.schedule": "zb-h1"}],
                         ids=["1f1b", "1f1b-deferred-fc", "zb-h1"])
def test_a_recut_rebuilds_the_engine_before_training_and_training_is_unchanged(tmp_path, extra):
    """The live passes and the rebuild leave nothing behind: no gradient, no kept rows of deferred
    layers, no optimizer step."""
    cfg = layout_cfg(tmp_path, 2, 1, 1, 2, **{"checkpoint.resume": "false", **extra})
    batches = make_batches(STEPS, cfg.train.batch_size)
    ref_losses, ref_state = reference(cfg, batches)
    results = run_local(cfg, functools.partial(recut_factory, batches, 1, 1, 2), keep_parameters=True)
    assert [r.bounds for r in results] == [(0, 8, 12), (0, 8, 12)]
    assert results[0].cut_trials == {"6": [1.0, 3.0], "8": [2.0, 2.0]}  # what the live check timed, in order
    torch.testing.assert_close(torch.tensor(results[-1].losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-5)
    state = gathered_state(results, cfg)
    for key in ref_state:
        torch.testing.assert_close(state[key], ref_state[key], rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.e2e
def test_the_live_passes_leave_bf16_master_gradients_untouched(tmp_path):
    """DeepSpeed's bf16 optimizer accumulates float32 copies of the gradients during backward passes:
    a measured (checked live) run trains exactly as a run given the same cut outright."""
    common = {"checkpoint.resume": "false", "parallel.precision": "bf16"}
    batches = make_batches(3, 16)
    factory = functools.partial(data_factory, batches, 1, 1, 2)
    measured = run_local(layout_cfg(tmp_path / "a", 2, 1, 1, 2, **common), factory, keep_parameters=True)
    given = run_local(layout_cfg(tmp_path / "b", 2, 1, 1, 2, **common, **{"parallel.partition": measured[0].cut}),
                      factory, keep_parameters=True)
    assert (measured[0].bounds, measured[0].cut) == (given[0].bounds, given[0].cut)
    assert measured[-1].losses == given[-1].losses
    a, b = gathered_state(measured, None), gathered_state(given, None)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
