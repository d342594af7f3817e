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
