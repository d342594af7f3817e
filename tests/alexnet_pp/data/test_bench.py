"""The data benchmark's reader comparison runs and reports both readers side by side; its torchvision
baseline's venv is set up only when asked, once."""

import json
import sys
from pathlib import Path

from cluster.bench import data as data_bench
from cluster.bench.cli import main_bench


def test_reader_comparison_runs_and_writes_the_common_output(tmp_path, capsys):
    out = tmp_path / "out"
    assert main_bench(["data", "--readers-only", "--images", "24", "--classes", "3", "--size", "32",
                       "--reader-passes", "2", "--data", str(tmp_path / "data"), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "alexnet_pp tarstream" in text and "webdataset.WebDataset" in text and "ratio" in text
    (readers,) = json.loads((out / "data.json").read_text())["rows"]
    assert readers["part"] == "readers" and readers["samples"] == 24 and readers["ratio"] > 0
    assert all(len(v) == 2 and min(v) > 0 for v in readers["passes"].values())
    assert (out / "data.csv").is_file() and "| readers |" in (out / "data.md").read_text()


def test_the_baseline_venv_is_set_up_when_asked_and_the_benchmark_reruns_there(tmp_path):
    calls = []

    def run(cmd, env=None):
        calls.append((cmd, env))
        if cmd[1:3] == ["-m", "venv"]:
            (Path(cmd[3]) / "bin").mkdir(parents=True)
            (Path(cmd[3]) / "bin" / "python").touch()
        return 0

    venv = tmp_path / "tv"
    assert data_bench.main(["--baseline", "--tv-venv", str(venv), "--images", "8"], run=run) == 0
    cmds = [c for c, _ in calls]
    assert cmds[0] == [sys.executable, "-m", "venv", str(venv)]
    assert any("torchvision==0.29.1" in c for c in cmds) and any("-e" in c for c in cmds)
    rerun, env = calls[-1]
    assert rerun == [str(venv / "bin" / "python"), "-m", "cluster.bench", "data", "--baseline", "--tv-venv",
                     str(venv), "--images", "8"]
    assert env[data_bench.IN_TV_VENV] == "1"
    assert (venv / ".tv-installed").exists()
    calls.clear()  # a second time: only a check that it still imports, then the run
    assert data_bench.main(["--baseline", "--tv-venv", str(venv)], run=run) == 0
    assert len(calls) == 2 and "import torchvision" in calls[0][0][-1]
