"""ZB-H1 on DeepSpeed's engine: the instruction stream per stage, and real runs against one process."""

import functools

import pytest
import torch
from deepspeed.runtime.pipe import schedule as ds

from alexnet_pp.planning.simulate import compute_order, simulate, zb_h1_order
from cluster.spawn import run_local
from cluster.zero_bubble import BackwardWeightPass, ZeroBubbleH1Schedule, defers_weight_grads, theoretical_bubble

from .test_engine import STEPS, data_factory, gathered_state, layout_cfg, make_batches, reference

SHAPES = [(p, m) for p in (1, 2, 3, 4) for m in (1, 2, 3, 4, 8)]


def stream(p, m, s):
    return [cmd for step in ZeroBubbleH1Schedule(micro_batches=m, stages=p, stage_id=s) for cmd in step]


def compute_ops(cmds, buffers, m):
    """(kind, micro-batch) of the compute instructions, micro-batches recovered from the cyclic buffers."""
    ops, counts = [], {"F": 0, "B": 0, "W": 0}
    kinds = {ds.ForwardPass: "F", ds.BackwardPass: "B", BackwardWeightPass: "W"}
    for cmd in cmds:
        kind = kinds.get(type(cmd))
        if kind:
            ops.append((kind, counts[kind]))
            assert cmd.buffer_id == counts[kind] % buffers
            counts[kind] += 1
    return ops


def instructions(order, defers):
    """The compute instructions of a planner's order: BW is one BackwardPass (B and W together), or a
    BackwardPass and its BackwardWeightPass on a stage that defers weight gradients."""
    out = []
    for kind, i in order:
        out += [("B", i), ("W", i)] if kind == "BW" and defers else [("B", i)] if kind == "BW" else [(kind, i)]
    return out


@pytest.mark.parametrize("p,m", SHAPES)
def test_each_stage_runs_the_planners_zb_h1_order_with_1f1bs_forwards_and_backwards(p, m):
    for s in range(p):
        sched = ZeroBubbleH1Schedule(micro_batches=m, stages=p, stage_id=s)
        ops = compute_ops(stream(p, m, s), sched.num_pipe_buffers(), m)
        defers = defers_weight_grads(p, m, s)
        assert ops == instructions(zb_h1_order(p, m, s), defers)  # what alexnet-pp plan simulates for zb-h1
        one_f_one_b = [("B" if k == "BW" else k, i) for k, i in compute_order("1f1b", p, m, s)]
        assert [op for op in ops if op[0] != "W"] == one_f_one_b  # DeepSpeed's TrainSchedule order
        # the first stage never delays a W: whole backward passes, as in 1F1B; every later one defers them
        assert defers == (s > 0 and m > 1)
        for i in range(m):  # one F and B each, and on a deferring stage one W after its B
            assert ops.count(("F", i)) == ops.count(("B", i)) == 1 and ops.count(("W", i)) == int(defers)
            assert ops.index(("F", i)) < ops.index(("B", i)) < (ops.index(("W", i)) if defers else m * 3)
        live = 0  # micro-batches between their F and W (or whole backward) never exceed the buffers
        for kind, _ in ops:
            live += {"F": 1, "W" if defers else "B": -1}.get(kind, 0)
            assert live <= sched.num_pipe_buffers()
        assert sched.num_pipe_buffers() <= max(2, p)  # at most P micro-batches' state, as 1F1B's first stage


@pytest.mark.parametrize("p,m", SHAPES)
def test_gradients_are_reduced_after_the_last_weight_pass_and_transfers_pair_up(p, m):
    streams = [stream(p, m, s) for s in range(p)]
    for s, cmds in enumerate(streams):
        names = [type(c).__name__ for c in cmds]
        last_w = max(i for i, n in enumerate(names) if n in ("BackwardPass", "BackwardWeightPass"))
        tail = names[last_w + 1:]  # after a whole backward pass (BW), its gradient is sent first
        assert tail[tail[0] == "SendGrad":] == ["WaitSends", "ReduceTiedGrads", "ReduceGrads", "OptimizerStep"]
        assert names.count("BackwardWeightPass") == (m if defers_weight_grads(p, m, s) else 0)
        assert names.count("LoadMicroBatch") == (m if s in (0, p - 1) else 0)
        for i, c in enumerate(cmds):  # a received input is used right after, a result is sent right after
            if isinstance(c, (ds.RecvActivation, ds.RecvGrad)):
                nxt = cmds[i + 1] if not isinstance(cmds[i + 1], ds.LoadMicroBatch) else cmds[i + 2]
                assert isinstance(nxt, ds.ForwardPass if isinstance(c, ds.RecvActivation) else ds.BackwardPass)
                assert nxt.buffer_id == c.buffer_id
            if isinstance(c, (ds.SendActivation, ds.SendGrad)):
                assert isinstance(cmds[i - 1], ds.ForwardPass if isinstance(c, ds.SendActivation) else ds.BackwardPass)
    for s in range(p - 1):  # every activation sent is received, every gradient sent back is received
        count = lambda cmds, kind: sum(isinstance(c, kind) for c in cmds)  # noqa: E731
        assert count(streams[s], ds.SendActivation) == count(streams[s + 1], ds.RecvActivation) == m
        assert count(streams[s + 1], ds.SendGrad) == count(streams[s], ds.RecvGrad) == m


def test_theory_is_the_papers_at_equal_f_b_w_and_the_simulator_agrees():
    for p, m in [(2, 4), (3, 4), (2, 8), (3, 8)]:
        assert theoretical_bubble("1f1b", p, m) == pytest.approx((p - 1) / (m + p - 1))
        equal = simulate("zb-h1", [(1.0, 1.0, 1.0)] * p, m)
        assert equal.bubbles() == pytest.approx([theoretical_bubble("zb-h1", p, m)] * p)


# --- real runs: the same losses and weights as one process (and so as 1F1B), dropout on ---------------


@pytest.mark.e2e
@pytest.mark.parametrize("pp,tp,dp,m", [(2, 1, 1, 4), (3, 1, 1, 4), (2, 2, 1, 2), (2, 1, 2, 2)], ids=str)
def test_zb_h1_matches_single_process_with_dropout_on(tmp_path, pp, tp, dp, m):
    # with replicas, also on channels-last activations (W's convolution backward reads NHWC inputs);
    # three stages cut inside conv3's and fc6's tower halves (W of a piece of a convolution, of a linear map)
    nhwc = {"parallel.channels_last": "true"} if dp > 1 else {}
    pieces = {"parallel.partition": "conv3.1[30:],fc6.0[300:]"} if pp == 3 else {}
    cfg = layout_cfg(tmp_path, pp, tp, dp, m, **{"checkpoint.resume": "false", "parallel.schedule": "zb-h1",
                                                "train.grad_clip": "0.05", **nhwc, **pieces})
    assert cfg.model.dropout == 0.5
    batches = make_batches(STEPS, cfg.train.batch_size)
    ref_losses, ref_state = reference(cfg, batches)
    results = run_local(cfg, functools.partial(data_factory, batches, tp, dp, m), keep_parameters=True)
    for res in results:
        torch.testing.assert_close(torch.tensor(res.losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-5)
    state = gathered_state(results, cfg)
    assert set(state) == set(ref_state)
    for key in ref_state:
        torch.testing.assert_close(state[key], ref_state[key], rtol=1e-4, atol=1e-6, msg=key)
    for res in results:  # W is its own phase, in the ZB-H1 order, before the gradients are reduced
        stage = res.coord["stage"]
        defers = defers_weight_grads(pp, m, stage)
        phases = res.stats[-1]["phases"]
        assert phases["backward"] > 0 and (phases.get("backward_weight", 0) > 0) == defers == (stage > 0)
        assert res.stats[-1]["theoretical_bubble"] == pytest.approx(theoretical_bubble("zb-h1", pp, m))
        names = [e["name"] for e in res.timeline]
        assert names.count("BackwardWeightPass") == (m if defers else 0) and names.count("BackwardPass") == m
        assert max(i for i, n in enumerate(names) if n.startswith("Backward")) < names.index("ReduceGrads")
        ops = [("F" if n == "ForwardPass" else "B" if n == "BackwardPass" else "W", None) for n in names
               if n in ("ForwardPass", "BackwardPass", "BackwardWeightPass")]
        assert [k for k, _ in ops] == [k for k, _ in instructions(zb_h1_order(pp, m, stage), defers)]
        assert res.peak_memory > 0


@pytest.mark.e2e
def test_zb_h1_checkpoints_resume_under_either_schedule(tmp_path):
    """Two zb-h1 steps, a checkpoint; one step more under zb-h1 and under 1f1b: the same losses and
    weights as three steps straight (the checkpoint format does not know the schedule)."""
    pp, tp, dp, m = 2, 1, 1, 2  # towers under zb-h1: the exactness test above
    batches = make_batches(3, 16)
    factory = functools.partial(data_factory, batches, tp, dp, m)

    def cfg(path, schedule, steps):  # one cut for all runs (a timed one may differ), inside conv3's tower 1
        return layout_cfg(path, pp, tp, dp, m, **{"train.epochs": "2", "train.max_steps": steps,
                                                   "parallel.schedule": schedule, "parallel.partition": "conv3.1[20:]"})

    straight = run_local(cfg(tmp_path / "a", "zb-h1", 3), factory, keep_parameters=True)
    first = run_local(cfg(tmp_path / "b", "zb-h1", 2), factory)
    ends = {}
    for schedule in ("zb-h1", "1f1b"):
        import shutil

        shutil.copytree(tmp_path / "b", tmp_path / schedule)
        resumed = run_local(cfg(tmp_path / schedule, schedule, 3), factory, keep_parameters=True)
        assert resumed[0].resumed_from == 2
        torch.testing.assert_close(torch.tensor(first[0].losses + resumed[0].losses),
                                   torch.tensor(straight[0].losses), rtol=1e-5, atol=1e-6)
        ends[schedule] = gathered_state(resumed, None)
    a = gathered_state(straight, None)
    for key in a:
        torch.testing.assert_close(ends["zb-h1"][key], a[key], rtol=0, atol=0, msg=key)
        torch.testing.assert_close(ends["1f1b"][key], a[key], rtol=1e-4, atol=1e-6, msg=key)
