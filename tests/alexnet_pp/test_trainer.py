import io

import pytest
import torch

from alexnet_pp.config import TrainConfig, load_config
from alexnet_pp.optim import LRSchedule
from alexnet_pp.progress import Progress
from alexnet_pp.trainer import train_single


def test_preset_learns_well_above_chance(tmp_path):
    cfg = load_config("test", overrides={"out_dir": str(tmp_path), "data.synthetic_dir": str(tmp_path / "data")})
    log = io.StringIO()
    summary = train_single(cfg, stream=log)
    chance = 1 / cfg.model.num_classes
    first = sum(summary.losses[:10]) / 10
    last = sum(summary.losses[-10:]) / 10
    assert last < 0.5 * first
    assert summary.evals[-1]["top1"] >= 3 * chance
    assert (tmp_path / cfg.name / "model.safetensors").exists() and (tmp_path / cfg.name / "summary.json").exists()
    assert "val top-1" in log.getvalue()


def test_deterministic_for_a_seed(tmp_path):
    def run(seed):
        cfg = load_config("test", overrides={"out_dir": str(tmp_path), "data.synthetic_dir": str(tmp_path / "data"),
                                             "train.max_steps": "8", "train.seed": str(seed)})
        return train_single(cfg, stream=io.StringIO(), save=False).losses

    a, b, c = run(0), run(0), run(1)
    assert a == b
    assert a != c


def schedule(kind, **kw):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    return LRSchedule(opt, TrainConfig(lr=0.01, schedule=kind, **kw), steps_per_epoch=10, total_steps=100), opt


def test_plateau_divides_by_ten_when_top1_stops_improving():
    s, opt = schedule("plateau", plateau_patience=2)
    for top1 in (0.1, 0.2, 0.2):
        s.after_eval(top1)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)
    s.after_eval(0.15)  # second evaluation without improvement
    assert opt.param_groups[0]["lr"] == pytest.approx(0.001)
    state = s.state_dict()
    s2, opt2 = schedule("plateau", plateau_patience=2)
    s2.load_state_dict(state)
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.001) and s2.best == 0.2


def test_step_and_cosine():
    s, opt = schedule("step", step_epochs=3)
    s.after_step(29)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)
    s.after_step(30)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.001)
    c, opt = schedule("cosine")
    assert c.lr_at(0) == pytest.approx(0.01) and c.lr_at(50) == pytest.approx(0.005) and c.lr_at(100) == 0


def test_progress_logs_lines_when_not_a_terminal():
    out = io.StringIO()
    p = Progress(total_steps=20, log_every=10, stream=out)
    for step in range(1, 21):
        p.update(step, images=32, loss=1.0 / step, lr=0.01)
    p.close()
    lines = out.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == ["10/20", "20/20"]
    assert "img/s=" in lines[0] and "eta=" in lines[0]


def test_progress_rate_from_reported_step_times():
    """Steps tailed from a log arrive in bursts: the rate must come from their own durations."""
    out = io.StringIO()
    p = Progress(total_steps=10, log_every=10, stream=out)
    for step in range(1, 11):
        p.update(step, images=64, loss=1.0, lr=0.01, seconds=0.5)  # all at once, 0.5 s each
    assert "img/s=128.0" in out.getvalue()
