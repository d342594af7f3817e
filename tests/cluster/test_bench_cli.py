"""`alexnet-pp bench NAME`: one command for every benchmark, one output format."""

import json
import sys
import types

from cluster.bench import BENCHMARKS
from cluster.cli import main


def test_bench_lists_every_benchmark(capsys):
    assert main(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    for name in ("lrn", "data", "engine", "scaling", "checkpoint", "gpu"):
        assert f"  {name} " in out
    assert main(["bench", "nonsense"]) == 2 and "unknown benchmark 'nonsense'" in capsys.readouterr().err


def test_a_benchmark_missing_from_this_copy_says_so(capsys, monkeypatch):
    monkeypatch.setitem(BENCHMARKS, "checkpoint", ("benchmarks.no_such_bench", "x"))
    assert main(["bench", "checkpoint"]) == 2
    assert "not available here: benchmarks.no_such_bench" in capsys.readouterr().err


def test_benchmarks_outside_the_package_are_found_in_a_checkout_from_any_directory(monkeypatch, tmp_path):
    """The `alexnet-pp` script's sys.path holds neither the working directory nor the checkout."""
    from cluster.bench.cli import load
    from cluster.bench.report import REPO_ROOT

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(REPO_ROOT))])
    for name in [m for m in sys.modules if m == "benchmarks" or m.startswith("benchmarks.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(BENCHMARKS, "checkpoint", ("benchmarks.lrn_bench", "x"))
    module = load("checkpoint")
    assert module is not None and module.__file__ == str(REPO_ROOT / "benchmarks" / "lrn_bench.py")


def test_a_benchmark_outside_the_package_gets_the_common_output(tmp_path, monkeypatch):
    """benchmarks/checkpoint_bench.py's main(argv) returns its results as a dict."""
    seen = []
    fake = types.ModuleType("fake_checkpoint_bench")
    fake.main = lambda argv: seen.append(argv) or {"preset": "paper",
                                                   "layouts": {"2,2,1": {"write_ratio": 1.1}, "1,1,1": {"write_ratio": 0.9}}}
    monkeypatch.setitem(sys.modules, "fake_checkpoint_bench", fake)
    monkeypatch.setitem(BENCHMARKS, "checkpoint", ("fake_checkpoint_bench", "x"))
    assert main(["bench", "checkpoint", "--reps", "2", "--out", str(tmp_path)]) == 0
    assert seen == [["--reps", "2"]]
    data = json.loads((tmp_path / "checkpoint.json").read_text())
    assert data["rows"] == [{"layout": "2,2,1", "write_ratio": 1.1}, {"layout": "1,1,1", "write_ratio": 0.9}]
    assert data["settings"] == {"preset": "paper"} and data["command"] == f"alexnet-pp bench checkpoint --reps 2 --out {tmp_path}"
    assert (tmp_path / "checkpoint.csv").read_text().splitlines()[0] == "layout,write_ratio"
