"""Runs that go wrong stop early and say why; checkpoints survive what can go wrong around them.

Engine-level tests run the ranks as local processes (cluster.spawn); job-level ones run
`python -m cluster.job` as a user does, in a session of its own, which starts a local Ray on
127.0.0.1 (token auth with the test's own token file) and is stopped by its PIDs afterwards.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from alexnet_pp.config import ConfigError, load_config, parse_override_args
from alexnet_pp.layout import Coord, Layout
from cluster.spawn import run_local
from rayproc import ray_env, run_job_cli
from tensorjob import make_batches, tensor_cfg, tensor_data

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TINY = ["--train.max_steps", "6", "--train.batch_size", "16", "--parallel.micro_batches", "2",
        "--model.dropout", "0", "--train.threads", "1"]


def tiny_cfg(out: Path, data: Path, *extra: str):
    overrides = parse_override_args([*TINY, "--data.synthetic_dir", str(data), *extra])
    overrides["out_dir"] = str(out)
    return load_config("test", None, overrides)


def cli_args(out: Path, data: Path, *extra: str) -> list[str]:
    return ["--preset", "test", *TINY, "--data.synthetic_dir", str(data), "--out_dir", str(out), *extra]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The embedded test dataset, generated once for the module (a job would do it itself)."""
    d = tmp_path_factory.mktemp("data") / "synthetic"
    from alexnet_pp.data import ensure_dataset

    ensure_dataset(tiny_cfg(tmp_path_factory.mktemp("probe"), d))
    return d


def summary_of(out: Path) -> dict:
    return json.loads((out / "test" / "summary.json").read_text())


# --- elastic: fewer replicas, the same global batch (a change of D resumes: the engine chain test) ---


def test_elastic_keeps_the_global_batch_by_raising_the_micro_batch_count(tmp_path):
    from cluster.elastic import smaller_replica_counts, with_replicas

    cfg = tensor_cfg(tmp_path, 2, 2, 4, 2, **{"parallel.elastic": "true", "train.batch_size": 64})
    layout = Layout.from_config(cfg)
    assert smaller_replica_counts(layout) == [2, 1]  # 3 does not divide M × D = 8
    small_cfg, small = with_replicas(cfg, layout, 2)
    assert (small.pp, small.tp, small.dp, small.micro_batches, small.micro_batch) == (2, 2, 2, 4, layout.micro_batch)
    assert small_cfg.parallel.dp == 2 and small_cfg.train.batch_size == 64 and cfg.parallel.dp == 4
    with pytest.raises(ConfigError, match="elastic_wait_s"):
        Layout.from_config(tensor_cfg(tmp_path, 1, 1, 2, 1, **{"parallel.elastic_wait_s": "-1"}))
    with pytest.raises(ConfigError, match="zero_stage=0"):
        Layout.from_config(tensor_cfg(tmp_path, 1, 1, 2, 1, **{"parallel.elastic": "true", "parallel.zero_stage": 1}))


# --- non-finite loss ---------------------------------------------------------------------------


def test_non_finite_origin_is_the_earliest_layer_of_the_lowest_stage():
    from cluster.faults import origin_of_non_finite

    rec = lambda rank, stage, tower, index: {"rank": rank, "stage": stage, "tower": tower, "replica": 0,  # noqa: E731
                                             "index": index, "layer": None if index is None else f"L{index}"}
    # tower 1 of stage 1 went bad in its first layer; tower 0 only when it gathered tower 1's output
    text = origin_of_non_finite([rec(0, 0, 0, None), rec(1, 0, 1, None), rec(2, 1, 0, 1), rec(3, 1, 1, 0),
                                 rec(4, 2, 0, 0)], last_stage=2)
    assert "stage 1, tower 1 (layer L0" in text
    assert "loss itself" in origin_of_non_finite([rec(0, 0, 0, None)], last_stage=1)


def test_the_watch_names_the_first_layer_with_a_non_finite_output_and_forgets_it_at_reset():
    from cluster.faults import NonFiniteWatch

    class Scale(torch.nn.Module):
        def __init__(self, by):
            super().__init__()
            self.by = by

        def forward(self, x):
            return x * self.by

    layers = [Scale(1.0), Scale(float("inf")), Scale(0.0), Scale(2.0)]  # inf · 0 = nan in layer 2
    watch = NonFiniteWatch(layers, coord=None)
    x = torch.ones(3, 4)
    for layer in layers[:1]:
        x = layer(x)
    assert watch.first_bad_layer() is None  # finite so far
    for layer in layers[1:]:
        x = layer(x)
    assert watch.first_bad_layer() == 1
    watch.reset()
    assert watch.first_bad_layer() is None
    layers[0](torch.full((2,), 3e38))  # finite values that sum past float32's range count as non-finite
    assert watch.first_bad_layer() == 0
    watch.close()
    layers[1](torch.ones(2))
    assert len(watch.sums) == 1  # no hooks after close

@pytest.mark.e2e
@pytest.mark.timeout(480)
def test_a_nan_loss_stops_the_job_naming_step_stage_and_tower_and_keeps_the_last_checkpoint(tmp_path, data_dir):
    """Stage 1, tower 1 of a (2, 2, 1) job computes NaN from step 3 on: the job stops at step 3 without
    a restart (max_failures 2 would allow two), names step 3, stage 1 and tower 1, and the checkpoint of
    step 2 stays the newest complete one."""
    from cluster.checkpoint import CheckpointStore

    out = tmp_path / "runs"
    t0 = time.monotonic()
    rc, log = run_job_cli(cli_args(out, data_dir, "--parallel.pp", "2", "--parallel.tp", "2",
                                   "--parallel.partition", "uniform", "--checkpoint.every_steps", "2",
                                   "--parallel.max_failures", "2", "--callbacks",
                                   "tests.cluster.job_callbacks:NanOnStage1Tower1"),
                          ray_env(tmp_path / "auth"), tmp_path / "job.log", timeout=400)
    summary = summary_of(out)
    error = summary["error"] or ""
    assert rc == 1 and not summary["ok"] and summary["restarts"] == 0, log[-8000:]
    assert "non-finite training loss (nan) at step 3" in error and "stage 1, tower 1" in error, error
    assert summary["loss_steps"] == [1, 2]
    latest = CheckpointStore(out / "test" / "checkpoints").latest()
    assert latest[0] == 2 and f"step 2 ({out / 'test' / 'checkpoints' / latest[1]}), intact" in error, error
    assert "FAILED" in log and "non-finite training loss" in log  # the driver's output says it too
    assert time.monotonic() - t0 < 300


# --- a stage stuck past the collective timeout ---------------------------------------------------


@pytest.mark.e2e
@pytest.mark.timeout(480)
def test_a_stage_stuck_past_the_collective_timeout_is_named_with_its_instruction(tmp_path, data_dir):
    """Stage 1 of a (2, 1, 1) job hangs in the forward pass of step 3: stage 0's wait times out after
    parallel.collective_timeout_s, and the job's error names the stuck rank, its stage and the pipeline
    instruction it was in, then the waiting rank and its instruction."""
    out = tmp_path / "runs"
    rc, log = run_job_cli(cli_args(out, data_dir, "--parallel.pp", "2", "--parallel.partition", "uniform",
                                   "--parallel.collective_timeout_s", "15", "--parallel.max_failures", "0",
                                   "--callbacks", "tests.cluster.job_callbacks:StuckOnStage1"),
                          ray_env(tmp_path / "auth"), tmp_path / "job.log", timeout=400)
    error = summary_of(out)["error"] or ""
    assert rc == 1, log[-8000:]
    lines = error.splitlines()
    assert lines and lines[0].startswith("rank 1 (stage 1, tower 0, replica 0) was stuck in pipeline instruction "
                                         "ForwardPass(buffer_id="), error
    assert "of step 3 for" in lines[0] and "collective_timeout_s = 15 s" in lines[0], error
    waiting = [line for line in lines if line.startswith("rank 0 (stage 0, tower 0, replica 0): in pipeline "
                                                         "instruction")]
    assert waiting and "of step 3" in waiting[0] and "collective_timeout_s = 15 s" in waiting[0], error


def test_the_watchdog_reports_an_instruction_past_half_the_timeout_and_withdraws_it_when_it_ends(tmp_path):
    from types import SimpleNamespace

    from cluster.faults import InstructionWatchdog, StuckReport, stuck_reports
    from cluster.timing import InFlight

    timer = SimpleNamespace(in_flight=None)
    coord = Coord(rank=3, stage=1, tower=1, replica=0)
    report = StuckReport(tmp_path, "job-a", attempt=2, rank=3)
    dog = InstructionWatchdog(timer, coord, timeout_s=10.0, report=lambda rec: report.on_stuck(rec, coord))
    timer.in_flight = InFlight("ForwardPass", {"buffer_id": 1}, 7, time.monotonic() - 4.0)
    dog.check()  # 4 s < 5 s: not yet
    assert stuck_reports(tmp_path, "job-a") == []
    timer.in_flight = InFlight("ForwardPass", {"buffer_id": 1}, 7, time.monotonic() - 6.0)
    dog.check()
    [line] = stuck_reports(tmp_path, "job-a")
    assert line.startswith("rank 3 (stage 1, tower 1, replica 0) was stuck in pipeline instruction "
                           "ForwardPass(buffer_id=1) of step 7 for 6.0 s (parallel.collective_timeout_s = 10 s)")
    assert stuck_reports(tmp_path, "another-job") == []
    timer.in_flight = None
    dog.check()
    assert stuck_reports(tmp_path, "job-a") == []


# --- a full disk while checkpointing -------------------------------------------------------------

FULL_DISK_SCRIPT = textwrap.dedent("""
    import functools, json, pickle, sys
    sys.path.insert(0, {helpers!r})
    from tensorjob import make_batches, tensor_cfg, tensor_data
    from cluster.spawn import run_local
    from pathlib import Path
    tmp = Path({tmp!r})
    batches = make_batches(3)
    cfg = tensor_cfg(tmp, 2, 1, 1, 2, **{{"train.max_steps": 4, "checkpoint.every_steps": 2,
                                         "checkpoint.dir": {small!r}}})
    results = run_local(cfg, functools.partial(tensor_data, batches, 1, 1, 2))
    (tmp / "results.pkl").write_bytes(pickle.dumps([(r.stopped, r.steps, r.losses) for r in results]))
""")


def _can_mount_tmpfs() -> str:
    if not shutil.which("unshare"):
        return "unshare(1) is not installed"
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
                           capture_output=True, text=True)
    return "" if probe.returncode == 0 else f"cannot mount a tmpfs in a user namespace: {probe.stderr.strip()}"


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_a_full_disk_while_checkpointing_stops_the_job_and_keeps_the_previous_checkpoint(tmp_path):
    """Checkpoints on a tmpfs that holds one and a half: the second save fills it. Every rank stops
    at once (no hang in DeepSpeed's barriers), the partial checkpoint is removed, the first stays
    complete, and a run from a copy of it continues with the losses of an uninterrupted run."""
    why = _can_mount_tmpfs()
    if why:
        pytest.skip(why)
    from cluster.checkpoint import CheckpointStore

    batches = make_batches(3)
    factory = functools.partial(tensor_data, batches, 1, 1, 2)
    straight = run_local(tensor_cfg(tmp_path / "straight", 2, 1, 1, 2, **{"train.max_steps": 4,
                                                                         "checkpoint.every_steps": 2}), factory)
    one = sum(f.stat().st_size for f in (tmp_path / "straight" / "ckpt").glob("step00000002/*"))
    small = tmp_path / "small"
    small.mkdir()
    script = FULL_DISK_SCRIPT.format(helpers=str(REPO / "tests" / "helpers"), tmp=str(tmp_path), small=str(small))
    size_kb = int(one * 1.5) // 1024 + 64
    shell = (f"mount -t tmpfs -o size={size_kb}k tmpfs {small} && {sys.executable} -c \"$SCRIPT\"; rc=$?; "
             f"cp -a {small} {tmp_path / 'copy'}; exit $rc")
    env = {**os.environ, "SCRIPT": script, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", shell], env=env, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    import pickle

    results = pickle.loads((tmp_path / "results.pkl").read_bytes())
    assert len(results) == 2
    for stopped, steps, _ in results:  # both ranks stopped together, saying why
        assert stopped and "checkpoint of step 4 could not be written" in stopped, stopped
        assert "bytes were left on its file system" in stopped and "step 2" in stopped and steps == 4
    copy = tmp_path / "copy"
    assert CheckpointStore(copy).latest()[0] == 2
    assert not (copy / "step00000004").exists()  # the partial one is gone
    resumed = run_local(tensor_cfg(tmp_path / "resume", 2, 1, 1, 2, **{"train.max_steps": 4,
                                                                      "checkpoint.dir": str(copy)}), factory)
    assert resumed[0].resumed_from == 2
    torch.testing.assert_close(torch.tensor(resumed[0].losses), torch.tensor(straight[0].losses[2:]),
                               rtol=1e-6, atol=1e-7)


# --- an unwritable checkpoint directory ----------------------------------------------------------


def test_an_unwritable_checkpoint_directory_is_refused_before_the_workers_start(tmp_path):
    from cluster.driver import run_job

    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the checkpoint directory's parent should be")
    cfg = tiny_cfg(tmp_path / "runs", tmp_path / "no-data", "--checkpoint.dir", str(blocker / "checkpoints"))
    with pytest.raises(ConfigError, match="checkpoint directory .*not-a-directory/checkpoints is not writable"):
        run_job(cfg)
    assert not (tmp_path / "no-data").exists()  # no dataset generated, no Ray started
    assert "ray" not in sys.modules or not __import__("ray").is_initialized()
    if os.geteuid() != 0:  # permissions stop everyone but root
        ro = tmp_path / "read-only"
        ro.mkdir(mode=0o500)
        cfg = tiny_cfg(tmp_path / "runs", tmp_path / "no-data", "--checkpoint.dir", str(ro / "ckpt"))
        with pytest.raises(ConfigError, match="read-only/ckpt is not writable"):
            run_job(cfg)
    proc = subprocess.run([sys.executable, "-m", "cluster.job", "--preset", "test", *TINY, "--out_dir",
                           str(tmp_path / "runs"), "--checkpoint.dir", str(blocker / "x")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "is not writable" in proc.stderr, proc.stderr
