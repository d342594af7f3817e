"""Phases of a step from its timed instructions, the bubble and the rank's peak memory (no DeepSpeed engine needed)."""

import time
from types import MethodType

import pytest

from cluster.timing import INSTRUCTION_PHASE, PHASES, InstructionTimer, peak_memory_bytes, step_stats


def test_weight_passes_are_their_own_phase_and_count_as_busy():
    assert INSTRUCTION_PHASE["BackwardWeightPass"] == "backward_weight" and "backward_weight" in PHASES
    phases = {"forward": 0.3, "backward": 0.2, "backward_weight": 0.25, "send": 0.05, "optimizer": 0.1}
    s = step_stats(1, 0, 2.0, 0.01, 16, 1.0, phases, 0.2)
    assert s.phases["idle"] == pytest.approx(0.9 - 0.75)
    assert s.bubble == pytest.approx(0.15 / 0.9)


class ForwardPass:
    def __init__(self, buffer_id):
        self.kwargs = {"buffer_id": buffer_id}


class BackwardWeightPass(ForwardPass):
    pass


class FakeEngine:
    def _fwd(self, buffer_id):
        time.sleep(0.002)

    def _w(self, buffer_id):
        time.sleep(0.001)

    _INSTRUCTION_MAP = {ForwardPass: _fwd, BackwardWeightPass: _w}

    def run(self, cmds):  # as DeepSpeed's _exec_schedule
        for cmd in cmds:
            MethodType(self._INSTRUCTION_MAP[type(cmd)], self)(**cmd.kwargs)


def test_the_timer_keeps_the_last_steps_instructions_in_order():
    engine = FakeEngine()
    timer = InstructionTimer(engine)
    engine.run([ForwardPass(0), ForwardPass(1), BackwardWeightPass(0)])
    phases = timer.take()
    assert set(phases) == {"forward", "backward_weight"} and phases["forward"] >= 0.004
    events = timer.last_step
    assert [(e.name, e.phase, e.buffer_id) for e in events] == [
        ("ForwardPass", "forward", 0), ("ForwardPass", "forward", 1), ("BackwardWeightPass", "backward_weight", 0)]
    assert all(a.end <= b.start for a, b in zip(events, events[1:])) and all(e.end > e.start for e in events)
    engine.run([BackwardWeightPass(1)])
    timer.take()
    assert [e.buffer_id for e in timer.last_step] == [1]  # one step's instructions, not the run's
    assert type(engine)._INSTRUCTION_MAP[ForwardPass] is FakeEngine._fwd  # the class stays untouched


class WaitingAndWorkingEngine(FakeEngine):
    def _fwd(self, buffer_id):  # waits, as a receive does: wall time without CPU
        time.sleep(0.03)

    def _w(self, buffer_id):  # works: 20 ms of this thread's CPU, however long a core takes to give it
        t0 = time.thread_time()
        while time.thread_time() - t0 < 0.02:
            pass

    _INSTRUCTION_MAP = {ForwardPass: _fwd, BackwardWeightPass: _w}


def test_the_timer_splits_each_phases_cpu_from_its_wall_time():
    engine = WaitingAndWorkingEngine()
    timer = InstructionTimer(engine)
    engine.run([ForwardPass(0), BackwardWeightPass(0)])
    phases = timer.take()
    cpu = timer.last_cpu
    assert set(cpu) == {"forward", "backward_weight"}
    assert phases["forward"] >= 0.03 and cpu["forward"] < 0.01
    assert cpu["backward_weight"] >= 0.02 and phases["backward_weight"] >= cpu["backward_weight"] - 1e-3
    engine.run([ForwardPass(1)])
    timer.take()
    assert set(timer.last_cpu) == {"forward"}  # one step's CPU, not the run's


def test_step_stats_fill_idle_bubble_and_peak_memory():
    s = step_stats(3, 0, 1.0, 0.01, 64, 2.0, {"forward": 0.5, "backward": 0.7, "optimizer": 0.4}, 0.2)
    assert s.phases["idle"] == pytest.approx(0.4) and s.bubble == pytest.approx(0.25)
    assert s.peak_memory >= 10 * 2**20  # a Python process with torch loaded holds well over 10 MiB
    assert s.peak_memory <= peak_memory_bytes()  # a peak only grows
    assert step_stats(1, 0, 1.0, 0.01, 64, 1.0, {}, 0.0, peak_memory=5).peak_memory == 5
