"""The data benchmark: readers and pipelines side by side, written in the common report format; its
torchvision baseline's venv is set up by the command when asked."""

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def test_reader_comparison_runs_and_reports_both_readers(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))  # benchmarks/ is not an installed package
    from cluster.bench.cli import main_bench

    out = tmp_path / "report"
    assert main_bench(["data", "--readers-only", "--images", "24", "--classes", "3", "--size", "32",
                       "--reader-passes", "2", "--data", str(tmp_path / "data"), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "alexnet_pp tarstream" in text and "webdataset.WebDataset" in text and "ratio" in text
    report = json.loads((out / "data.json").read_text())
    readers = report["settings"]["readers"]
    assert readers["samples"] == 24 and readers["ratio"] > 0
    assert all(len(v) == 2 and min(v) > 0 for v in readers["passes_samples_per_s"].values())
    assert {r["name"] for r in report["rows"]} == {"tarstream", "webdataset"}
    assert "## tar reader (no decoding)" in (out / "data.md").read_text() and (out / "data.csv").exists()


def test_pipelines_side_by_side_with_format_costs(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))
    from benchmarks import data_bench

    result = data_bench.main(["--images", "24", "--classes", "3", "--size", "40", "--crop", "32", "--batch", "4",
                              "--workers", "1", "--epochs", "1", "--reader-passes", "1", "--raw", "--no-baseline",
                              "--data", str(tmp_path / "data")])
    text = capsys.readouterr().out
    for row in ("alexnet_pp shards ", "alexnet_pp shards, uint8", "webdataset reader", "alexnet_pp shards, raw",
                "jpeg q90", "jpeg q50", "raw "):
        assert row in text, row
    assert set(result["images_per_s"]) == {"shards", "uint8", "webdataset", "raw"}
    assert all(len(v) == 1 and v[0] > 0 for v in result["epochs"].values())
    # and the CPU time per image beside it, which load from other jobs does not inflate
    assert set(result["cpu_us_per_image"]) == set(result["images_per_s"])
    assert all(v > 0 for v in result["cpu_us_per_image"].values()) and "CPU µs/image" in text
    assert result["formats"]["raw"]["bytes"] > result["formats"]["jpeg q90"]["bytes"]
    assert result["formats"]["raw"]["decode_us"] < result["formats"]["jpeg q90"]["decode_us"]
    assert "gpu" in result or "CUDA" in result["gpu_note"]
    pipelines = [r for r in result["rows"] if r["kind"] == "pipeline (1 workers)"]
    assert [r["name"] for r in pipelines] == ["alexnet_pp shards", "alexnet_pp shards, uint8", "webdataset reader",
                                              "alexnet_pp shards, raw"]
    assert all(r["images_per_s"] > 0 and r["x_imagefolder"] is None for r in pipelines)  # no baseline: no ratio


def test_the_baseline_venv_is_set_up_once_and_the_benchmark_reruns_inside_it(tmp_path, monkeypatch):
    """`--baseline`: the venv gets the torch/torchvision pair that import together and this checkout on
    its path, once; the benchmark then runs in it and its results come back to be written here."""
    monkeypatch.syspath_prepend(str(REPO))
    from benchmarks import data_bench

    venv = tmp_path / "tv"
    calls = []

    def run(cmd, **kw):
        calls.append(cmd)
        if cmd[1:3] == ["-m", "venv"]:  # a real venv: its python answers the site-packages question
            import subprocess

            return subprocess.call([*cmd, "--without-pip"])
        if "--result-json" in cmd:
            assert kw["env"][data_bench.IN_TV_VENV] == "1" and str(REPO) in kw["env"]["PYTHONPATH"]
            Path(cmd[cmd.index("--result-json") + 1]).write_text(json.dumps({"rows": [], "workers": 2}))
        return 0

    result = data_bench.main(["--baseline", "--tv-venv", str(venv), "--workers", "2"], run=run)
    assert result == {"rows": [], "workers": 2}
    installs = [c for c in calls if c[1:4] == ["-m", "pip", "install"]]
    assert any(set(data_bench.TV_PACKAGES) <= set(c) for c in installs)
    pth = next(venv.glob("lib/python*/site-packages/alexnet_pp_repo.pth"))
    assert pth.read_text().strip() == str(REPO)
    rerun = calls[-1]
    assert rerun[:3] == [str(venv / "bin" / "python"), "-m", "benchmarks.data_bench"] and "--baseline" not in rerun
    calls.clear()
    data_bench.main(["--baseline", "--tv-venv", str(venv)], run=run)  # the stamp: no second setup
    assert not [c for c in calls if "pip" in c] and len(calls) == 2  # the import check, then the run
