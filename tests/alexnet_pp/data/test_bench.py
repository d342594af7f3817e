"""The data benchmark's reader comparison runs and reports both readers side by side."""

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def test_reader_comparison_runs_and_writes_json(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))  # benchmarks/ is not an installed package
    from benchmarks import data_bench

    out = tmp_path / "bench.json"
    assert data_bench.main(["--readers-only", "--images", "24", "--classes", "3", "--size", "32",
                            "--reader-passes", "2", "--data", str(tmp_path / "data"), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "alexnet_pp tarstream" in text and "webdataset.WebDataset" in text and "ratio" in text
    readers = json.loads(out.read_text())["readers"]
    assert readers["samples"] == 24 and readers["ratio"] > 0
    assert all(len(v) == 2 and min(v) > 0 for v in readers["passes_samples_per_s"].values())


def test_pipelines_side_by_side_with_format_costs(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))
    from benchmarks import data_bench

    out = tmp_path / "bench.json"
    assert data_bench.main(["--images", "24", "--classes", "3", "--size", "40", "--crop", "32", "--batch", "4",
                            "--workers", "1", "--epochs", "1", "--reader-passes", "1", "--raw", "--no-baseline",
                            "--data", str(tmp_path / "data"), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    for row in ("alexnet_pp shards ", "alexnet_pp shards, uint8", "webdataset reader", "alexnet_pp shards, raw",
                "jpeg q90", "jpeg q50", "raw "):
        assert row in text, row
    result = json.loads(out.read_text())
    assert set(result["images_per_s"]) == {"shards", "uint8", "webdataset", "raw"}
    assert all(len(v) == 1 and v[0] > 0 for v in result["epochs"].values())
    # and the CPU time per image beside it, which load from other jobs does not inflate
    assert set(result["cpu_us_per_image"]) == set(result["images_per_s"])
    assert all(v > 0 for v in result["cpu_us_per_image"].values()) and "CPU µs/image" in text
    assert result["formats"]["raw"]["bytes"] > result["formats"]["jpeg q90"]["bytes"]
    assert result["formats"]["raw"]["decode_us"] < result["formats"]["jpeg q90"]["decode_us"]
    assert "gpu" in result or "CUDA" in result["gpu_note"]
