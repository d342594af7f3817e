"""The job entry point end to end: local Ray runs of the command line, restarts, errors.

The e2e tests run DeepSpeed pipelines on tiny settings on real local Ray instances (127.0.0.1 only,
with the module's own token file): the first run of the command line starts and stops its own, as a
user's does; the other runs share one the module starts the same way (a Ray start costs seconds).
`ray job submit` against a real cluster is tested with the several-node cluster (test_multinode.py).
Run them alone with `python -m pytest tests/cluster/test_job.py -m e2e`.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alexnet_pp.config import ConfigError, RunConfig, load_config, parse_override_args

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TINY = ["--train.max_steps", "6", "--train.batch_size", "16", "--parallel.micro_batches", "2",
        "--model.dropout", "0", "--train.threads", "1"]


# --- helpers -------------------------------------------------------------------------------------


def tiny_cfg(out: Path, data: Path, *extra: str) -> RunConfig:
    overrides = parse_override_args([*TINY, "--data.synthetic_dir", str(data), *extra])
    overrides["out_dir"] = str(out)
    return load_config("test", None, overrides)


def cli_args(out: Path, data: Path, *extra: str) -> list[str]:
    return ["--preset", "test", *TINY, "--data.synthetic_dir", str(data), "--out-dir", str(out), *extra]


def assert_close(a: list[float], b: list[float], rtol: float = 1e-4, atol: float = 1e-5) -> None:
    assert len(a) == len(b), (a, b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert abs(x - y) <= atol + rtol * abs(y), f"step {i}: {x} vs {y}\n{a}\n{b}"


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def auth_env(tmp_path_factory):
    """Token auth as Ray 2.60 wants it, with a token file of our own (never ~/.ray/auth_token)."""
    if "ray" in sys.modules:  # Ray reads its auth mode once, at import: setting it now would be too late
        pytest.fail("ray was imported before the auth fixture ran (module-level `import ray` in some test "
                    "module?); import it inside the tests that need it")
    token = tmp_path_factory.mktemp("auth") / "token"
    token.write_text(secrets.token_hex(32))
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "DS_ACCELERATOR": "cpu",
           "RAY_USAGE_STATS_ENABLED": "0"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        mp.delenv("RAY_ADDRESS", raising=False)
        yield env


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The embedded test dataset, generated once for the module (the job would do it itself)."""
    d = tmp_path_factory.mktemp("data") / "synthetic"
    from alexnet_pp.data import ensure_dataset

    ensure_dataset(tiny_cfg(tmp_path_factory.mktemp("probe"), d))
    return d


@pytest.fixture(scope="module")
def local_ray(auth_env):
    """One local Ray for the module's later runs: a job finds it initialized, joins it and leaves it up."""
    import ray

    from cluster.driver import start_local_ray

    start_local_ray(6)  # the largest run: (2, 2) = 4 workers; (3, 1) = 3 and an augmentation actor
    yield
    ray.shutdown()


def subprocess_env(auth_env: dict, **extra: str) -> dict:
    env = os.environ.copy()
    env.pop("RAY_ADDRESS", None)
    env.update(auth_env)
    env.update(extra)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # the cluster's `python` is the venv's
    env["PYTHONPATH"] = os.pathsep.join(x for x in (str(REPO), env.get("PYTHONPATH", "")) if x)
    return env


# --- 1. invalid layouts fail before anything starts ----------------------------------------------


def test_invalid_layout_fails_before_workers(tmp_path):
    from cluster.driver import run_job

    data = tmp_path / "no-data"
    cfg = tiny_cfg(tmp_path / "runs", data)
    cfg.parallel.tp = 3  # bypassing the YAML/CLI type check: the layout must still catch it
    with pytest.raises(ConfigError, match="parallel.tp=3"):
        run_job(cfg)
    cfg = tiny_cfg(tmp_path / "runs", data)
    cfg.train.batch_size = 15  # not divisible by micro_batches × dp = 2
    with pytest.raises(ConfigError, match="divisible by 2"):
        run_job(cfg)
    cfg = tiny_cfg(tmp_path / "runs", data, "--callbacks", "tests.cluster.job_callbacks:NoSuchCallback")
    with pytest.raises(ConfigError, match="NoSuchCallback"):
        run_job(cfg)
    assert not (tmp_path / "runs").exists() and not data.exists()  # no dataset, no run dir, no Ray
    assert "ray" not in sys.modules or not __import__("ray").is_initialized()


def test_invalid_layout_cli_exit_code(tmp_path):
    for extra in (["--parallel.tp", "3"], ["--train.batch_size", "15"], ["--parallel.pp", "20"]):
        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "cluster.job", *cli_args(tmp_path / "runs", tmp_path / "d"),
                               *extra], cwd=REPO, capture_output=True, text=True, timeout=120,
                              env={**os.environ, "DS_ACCELERATOR": "cpu"})
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert "configuration error" in proc.stderr and extra[0][2:] in proc.stderr, proc.stderr
        assert time.monotonic() - t0 < 60
    assert not (tmp_path / "runs").exists()


# --- small pieces --------------------------------------------------------------------------------


def test_history_keeps_the_redone_steps(tmp_path):
    from cluster.driver import collect_history

    lines = [
        {"job": "a", "attempt": 1, "kind": "step", "step": 1, "loss": 1.0},
        {"job": "a", "attempt": 1, "kind": "step", "step": 2, "loss": 2.0},
        {"job": "a", "attempt": 1, "kind": "step", "step": 3, "loss": 3.0},
        {"job": "old", "attempt": 1, "kind": "step", "step": 9, "loss": 9.0},
        {"job": "a", "attempt": 2, "kind": "step", "step": 3, "loss": 3.5},
        {"job": "a", "attempt": 2, "kind": "eval", "step": 3, "top1": 0.5, "top5": 0.9},
    ]
    (tmp_path / "history.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"job": "a", "ki')
    steps, losses, evals = collect_history(tmp_path, "a")
    assert steps == [1, 2, 3] and losses == [1.0, 2.0, 3.5]
    assert evals == [{"attempt": 2, "step": 3, "top1": 0.5, "top5": 0.9}]


def test_absolutize_leaves_remote_sources_alone(tmp_path, monkeypatch):
    from cluster.driver import absolutize

    monkeypatch.chdir(tmp_path)
    cfg = RunConfig()
    cfg.data.train = "shards/train-{000000..000003}.tar::pipe:curl -s http://x/a.tar"
    cfg.data.val = "https://host/val-000000.tar"
    out = absolutize(cfg)
    assert out.out_dir == str(tmp_path / "runs")
    assert out.data.train == f"{tmp_path}/shards/train-{{000000..000003}}.tar::pipe:curl -s http://x/a.tar"
    assert out.data.val == cfg.data.val and cfg.out_dir == "runs"


# --- 2. the public command line: every layout gives one process's losses, dropout on -------------


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_command_line_layouts_reproduce_one_process_with_dropout_on_real_shards(auth_env, data_dir, tmp_path,
                                                                             request):
    """`alexnet-pp train --preset test --train.max_steps 6 --model.dropout 0.5` on the embedded shards:
    one process, (P, T) = (2, 2) with M = 2, and P = 3 with M = 4 fed by an augmentation actor train on
    the same images with the same dropout masks, so their per-step losses agree."""
    from alexnet_pp.summary import RunSummary
    from cluster.cli import main

    base = ["train", "--preset", "test", "--train.max_steps", "6", "--model.dropout", "0.5",
            "--data.synthetic_dir", str(data_dir), "--out_dir", str(tmp_path), "--train.threads", "1"]
    runs = {"single": [], "pp2-tp2": ["--pp", "2", "--tp", "2", "--parallel.micro_batches", "2"],
            # the first stage's batches made by a Ray actor: the same as its own (data.workers 0 ≡ one actor)
            "pp3-actor": ["--pp", "3", "--parallel.micro_batches", "4", "--data.augment_actors", "1"]}
    losses = {}
    for name, extra in runs.items():
        assert main([*base, "--name", name, *extra]) == 0, name
        losses[name] = RunSummary.read(tmp_path / name / "summary.json").losses
        if name == "single":
            import ray

            assert not ray.is_initialized()  # the local Ray the run started is gone again
            request.getfixturevalue("local_ray")  # the later runs share one
    assert len(losses["single"]) == 6
    summary = RunSummary.read(tmp_path / "pp2-tp2" / "summary.json")  # what the driver wrote, one type
    assert summary.ok and summary.steps == 6 and summary.loss_steps == [1, 2, 3, 4, 5, 6] and summary.restarts == 0
    assert summary.evals[-1]["step"] == 6 and set(summary.bubble_per_stage) == {"0", "1"}
    for name in ("pp2-tp2", "pp3-actor"):  # the cut each trained on, after the live check that settled it
        s = RunSummary.read(tmp_path / name / "summary.json")
        assert s.cut and s.cut in s.cut_trials and all(len(live) == int(name[2]) for live in s.cut_trials.values())
    for name in ("pp2-tp2", "pp3-actor"):
        assert_close(losses[name], losses["single"], rtol=1e-4, atol=0)


# --- 3. a worker exception reaches the driver, named --------------------------------------------


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_worker_exception_names_rank_stage_tower(local_ray, data_dir, tmp_path):
    from cluster.driver import run_job

    cfg = tiny_cfg(tmp_path / "runs", data_dir, "--parallel.tp", "2", "--parallel.max_failures", "0",
                   "--callbacks", "tests.cluster.job_callbacks:FailOnRank1")
    t0 = time.monotonic()
    result = run_job(cfg)
    elapsed = time.monotonic() - t0
    assert not result.ok
    assert "rank 1 (stage 0, tower 1, replica 0)" in result.error, result.error
    assert "failure injected by FailOnRank1" in result.error
    assert result.restarts == 0
    assert elapsed < 200, elapsed  # no hang: the peer blocked in a collective is torn down
    assert json.loads((cfg.run_dir / "summary.json").read_text())["ok"] is False


# --- 4. the README's walk-through: train, resume on another layout, export, eval, predict ---------


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_train_resume_on_another_layout_export_eval_and_predict(local_ray, data_dir, tmp_path, capsys):
    from alexnet_pp.data.shards import read_classes
    from alexnet_pp.summary import RunSummary
    from cluster.cli import main

    run = ["--preset", "test", "--data.synthetic_dir", str(data_dir), "--out_dir", str(tmp_path), "--name", "walk",
           "--train.threads", "1", "--parallel.micro_batches", "2"]
    assert main(["train", *run, "--pp", "2", "--tp", "2", "--train.max_steps", "3", "--checkpoint.every_steps", "3"]) == 0
    assert main(["train", *run, "--dp", "2", "--train.max_steps", "6"]) == 0  # (1, 1, 2) resumes step 3
    summary = RunSummary.read(tmp_path / "walk" / "summary.json")
    assert summary.resumed_from == 3 and summary.resumed_layout == (2, 2, 1) and summary.layout == (1, 1, 2)
    capsys.readouterr()
    model = tmp_path / "model.safetensors"
    assert main(["export", str(tmp_path / "walk"), str(model)]) == 0
    assert main(["eval", "--checkpoint", str(model), "--preset", "test", "--data.synthetic_dir", str(data_dir),
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (result["top1"], result["top5"]) == (summary.evals[-1]["top1"], summary.evals[-1]["top5"])
    image = next((data_dir).glob("val-*.tar"))
    import tarfile

    with tarfile.open(image) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".jpg"))
        (tmp_path / "one.jpg").write_bytes(tar.extractfile(member).read())
    assert main(["predict", "--checkpoint", str(model), str(tmp_path / "one.jpg"), "--json"]) == 0
    [pred] = json.loads(capsys.readouterr().out)
    assert len(pred["top"]) == 5 and pred["top"][0]["class"] in read_classes(data_dir)
