"""Host-process readings: the machine's busy CPU around a step."""

from __future__ import annotations

import io
import os

import pytest

from alexnet_pp import host

STAT = """cpu  1000 50 300 9000 20 5 15 30 0 0
cpu0 600 20 200 4000 10 3 10 20 0 0
cpu1 400 30 100 5000 10 2 5 10 0 0
intr 12345 0 0
ctxt 999
"""


def fake_stat(monkeypatch, text: str, cores: set[int]) -> None:
    monkeypatch.setattr(host, "open", lambda path, *a, **k: io.StringIO(text), raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: cores)
    real = os.sysconf
    monkeypatch.setattr(os, "sysconf", lambda name: 100 if name == "SC_CLK_TCK" else real(name))


def test_a_process_on_every_core_reads_the_total_and_a_pinned_one_its_own_cores(monkeypatch):
    # busy = user + nice + system + irq + softirq + steal; idle, iowait and guest are not
    fake_stat(monkeypatch, STAT, {0, 1})
    assert host.busy_cpu_seconds() == pytest.approx((1000 + 50 + 300 + 5 + 15 + 30) / 100)
    fake_stat(monkeypatch, STAT, {1})
    assert host.busy_cpu_seconds() == pytest.approx((400 + 30 + 100 + 2 + 5 + 10) / 100)


def test_an_unknown_stat_format_gives_no_reading_rather_than_an_error(monkeypatch):
    fake_stat(monkeypatch, "cpu  lots of time\ncpu0 1 2\n", {0})
    assert host.busy_cpu_seconds() is None
    fake_stat(monkeypatch, "cpu  1 2\ncpu0 1 2\ncpu1 1 2\n", {0, 1})
    assert host.busy_cpu_seconds() is None  # too few fields


def test_the_reading_on_this_machine_only_grows():
    first = host.busy_cpu_seconds()
    if first is None:
        pytest.skip("no /proc/stat here")
    sum(i * i for i in range(200_000))  # some CPU time of our own
    assert host.busy_cpu_seconds() >= first
