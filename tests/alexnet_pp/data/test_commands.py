"""`alexnet-pp data synth` and `alexnet-pp data ingest`: output, bad files, determinism, resume."""

import argparse
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from alexnet_pp.config import preset
from alexnet_pp.data import build_eval_loader, build_train_loader
from alexnet_pp.data.commands import register
from alexnet_pp.data.shards import read_manifest
from alexnet_pp.data.tarstream import iter_samples
from alexnet_pp.data.transforms import decode

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create")

CLASSES = ["ant", "bee", "cat"]


def run(argv):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    src = tmp_path_factory.mktemp("tree")
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2)):
        for c, name in enumerate(CLASSES):
            d = src / split / name
            d.mkdir(parents=True)
            for i in range(n):
                h, w = [(50, 70), (30, 30), (64, 48), (80, 40)][i % 4]
                img = np.full((h, w, 3), 60 * c + 20, np.uint8) + rng.integers(0, 20, (h, w, 3), dtype=np.uint8)
                fmt = "PNG" if i == 2 else "JPEG"
                Image.fromarray(img).save(d / f"img{i}.{'png' if fmt == 'PNG' else 'jpg'}", fmt)
    (src / "train" / "bee" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    good = (src / "train" / "cat" / "img0.jpg").read_bytes()
    (src / "train" / "cat" / "cut.JPEG").write_bytes(good[: len(good) // 2])
    (src / "train" / "cat" / "notes.txt").write_text("not an image, not listed")
    return src


def shard_bytes(root):
    return {p.name: p.read_bytes() for p in sorted(root.glob("*.tar"))}


def test_synth_command_writes_both_splits(tmp_path, capsys):
    out = tmp_path / "syn"
    argv = ["data", "synth", str(out), "--classes", "3", "--train-per-class", "4", "--val-per-class", "2",
            "--size", "24", "--seed", "1", "--shard-samples", "5", "--workers", "1", "--quiet"]
    assert run(argv) == 0
    assert read_manifest(out, "train")["total"] == 12 and read_manifest(out, "val")["total"] == 6
    assert json.loads((out / "classes.json").read_text())[0] == "red-solid-circle"
    (_, key, members), *_ = iter_samples(str(out / "train-000000.tar"))
    assert decode(members["jpg"]).shape == (24, 24, 3) and members["cls"] == b"0"
    assert run(argv) == 0
    assert "nothing to do" in capsys.readouterr().out


def test_ingest_tree_with_bad_files(tree, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(["data", "ingest", str(tree), str(out), "--size", "32", "--shard-samples", "3", "--workers", "2",
                "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "skipped 2 unreadable image(s)" in printed
    assert "bee/broken.jpg" in printed and "cat/cut.JPEG" in printed
    assert json.loads((out / "classes.json").read_text()) == CLASSES
    train, val = read_manifest(out, "train"), read_manifest(out, "val")
    assert train["total"] == 12 and val["total"] == 6 and train["complete"]
    assert [e["count"] for e in train["shards"]] == [3, 3, 3, 3]
    # every sample: 32×32, label of its class folder (via the index written beside the shards)
    index = {k: (int(lab), rel) for k, lab, rel in (l.split("\t") for l in (out / "train-index.tsv").read_text().splitlines())}
    labels_per_shard = []
    for e in train["shards"]:
        labs = []
        for _, key, m in iter_samples(str(out / e["name"])):
            assert decode(m["jpg"]).shape == (32, 32, 3)
            label, rel = index[key]
            assert int(m["cls"]) == label == CLASSES.index(rel.split("/")[0])
            labs.append(label)
        labels_per_shard.append(labs)
    assert any(len(set(l)) > 1 for l in labels_per_shard)  # shuffled across shards, not class by class
    # the training loader reads the ingested shards
    cfg = preset("test")
    cfg.model.image_size, cfg.model.num_classes = 28, 3
    cfg.data.train = cfg.data.val = str(out)
    cfg.data.stored_size, cfg.data.workers, cfg.train.batch_size = 32, 0, 4
    assert sum(len(l) for _, l in build_train_loader(cfg)) == 12
    assert sum(len(l) for _, l in build_eval_loader(cfg)) == 6


def test_ingest_is_deterministic_and_resumes(tree, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    argv = ["--size", "32", "--shard-samples", "3", "--workers", "1", "--quiet"]
    assert run(["data", "ingest", str(tree), str(a)] + argv) == 0
    assert run(["data", "ingest", str(tree), str(b)] + argv) == 0
    reference = shard_bytes(a)
    assert reference == shard_bytes(b) and len(reference) == 6
    capsys.readouterr()

    # a deleted shard is rewritten with the same samples
    (b / "train-000001.tar").unlink()
    assert run(["data", "ingest", str(tree), str(b)] + argv) == 0
    assert "train: 12 samples in 4 shards (1 written, 3 already complete)" in capsys.readouterr().out
    assert shard_bytes(b) == reference

    # an interrupted run: journal stops after shard 1, shard 2 half-written as a temp file
    m = read_manifest(b, "train")
    m["shards"], m["complete"] = m["shards"][:2], False
    (b / "train-manifest.json").write_text(json.dumps(m))
    (b / "train-000003.tar").unlink()
    (b / "train-000002.tar").rename(b / "train-000002.tar.tmp")
    (b / "train-000002.tar.tmp").write_bytes((b / "train-000002.tar.tmp").read_bytes()[:700])
    assert run(["data", "ingest", str(tree), str(b)] + argv) == 0
    assert shard_bytes(b) == reference
    assert not list(b.glob("*.tmp"))
    assert read_manifest(b, "train") == read_manifest(a, "train")


def test_ingest_single_split_and_unknown_class(tree, tmp_path, capsys):
    out = tmp_path / "one"
    assert run(["data", "ingest", str(tree / "val"), str(out), "--split", "val", "--size", "24", "--no-shuffle",
                "--workers", "1", "--quiet"]) == 0
    keys = [k for _, k, _ in iter_samples(str(out / "val-000000.tar"))]
    assert keys == [f"val-{i:08d}" for i in range(6)]  # sorted order kept
    odd = tmp_path / "odd"
    shutil.copytree(tree / "val", odd)
    (odd / "dog").mkdir()
    assert run(["data", "ingest", str(odd), str(out), "--split", "val", "--workers", "1", "--quiet"]) == 2
    assert "dog" in capsys.readouterr().err
