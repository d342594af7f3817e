"""Shard writing, the tar reader and source resolution, on real tar files."""

import io
import json
import tarfile

import pytest

from alexnet_pp.data.shards import Encoded, read_manifest, write_split
from alexnet_pp.data.sources import NoShardsError, resolve
from alexnet_pp.data.tarstream import ShardOpenError, ShardTruncated, count_samples, iter_samples

from shardsets import make_shards, truncate


def _enc(i, size=100):
    if i == 5:
        return Encoded(index=i, source=f"img{i}", error="broken")
    return Encoded(index=i, key=f"k{i:03d}", data=bytes([i % 256]) * size, label=i % 3)


def test_write_split_limits_manifest_and_content(tmp_path):
    rep = write_split(tmp_path, "train", 23, _enc, {"p": 1}, max_count=4, workers=0)
    m = read_manifest(tmp_path, "train")
    assert m["complete"] and m["total"] == 22 == rep.total
    assert [e["count"] for e in m["shards"]] == [4, 4, 4, 4, 4, 2]
    assert rep.bad == [("img5", "broken")]
    with tarfile.open(tmp_path / "train-000001.tar") as t:
        names = t.getnames()
    assert names[:4] == ["k004.cls", "k004.jpg", "k006.cls", "k006.jpg"]  # 5 was skipped
    # byte limit: 100-byte payloads take 512 + 512 + 512 + 512 bytes per sample in the tar
    rep = write_split(tmp_path / "b", "val", 10, _enc, {"p": 2}, max_count=100, max_bytes=1024 + 3 * 2048)
    assert [e["count"] for e in read_manifest(tmp_path / "b", "val")["shards"]] == [3, 3, 3]
    for e in read_manifest(tmp_path / "b", "val")["shards"]:
        assert (tmp_path / "b" / e["name"]).stat().st_size <= 1024 + 3 * 2048 + 10240  # tar pads to 10 KiB blocks


def test_shards_are_what_webdataset_tarwriter_writes(tmp_path):
    import webdataset as wds

    write_split(tmp_path, "train", 8, _enc, {"p": 1}, max_count=4)
    for shard, indices in (("train-000000.tar", [0, 1, 2, 3]), ("train-000001.tar", [4, 6, 7])):
        buf = io.BytesIO()
        with wds.TarWriter(buf, user="", group="", mode=0o644, mtime=0, encoder=False) as w:
            for i in indices:
                e = _enc(i)
                w.write({"__key__": e.key, "jpg": e.data, "cls": str(e.label).encode()})
        assert (tmp_path / shard).read_bytes() == buf.getvalue()


def test_write_split_resumes_without_duplicates_or_holes(tmp_path):
    write_split(tmp_path, "train", 20, _enc, {"p": 1}, max_count=4)
    before = {p.name: p.read_bytes() for p in tmp_path.glob("*.tar")}
    (tmp_path / "train-000002.tar").unlink()
    (tmp_path / "train-000004.tar.tmp").write_bytes(b"half a shard")
    m = read_manifest(tmp_path, "train")
    m["complete"] = False
    m["shards"] = m["shards"][:4]  # interrupted after shard 3 was recorded
    (tmp_path / "train-manifest.json").write_text(json.dumps(m))
    (tmp_path / "train-000004.tar").unlink()
    rep = write_split(tmp_path, "train", 20, _enc, {"p": 1}, max_count=4)
    assert rep.written == 2  # shard 2 (deleted) and shard 4 (never recorded)
    assert {p.name: p.read_bytes() for p in tmp_path.glob("*.tar")} == before
    assert not list(tmp_path.glob("*.tmp"))


def test_reader_positions_skips_and_grouping(tmp_path):
    (listing,) = make_shards(tmp_path, "train", [7], size=16)
    url = str(tmp_path / "train-000000.tar")
    got = list(iter_samples(url))
    assert [(p, k) for p, k, _ in got] == [(i, key) for i, (key, _) in enumerate(listing)]
    assert set(got[0][2]) == {"jpg", "cls"}
    assert [p for p, _, _ in iter_samples(url, 2, 5)] == [2, 3, 4]
    assert count_samples(url) == (7, None)
    assert [k for _, k, _ in iter_samples(f"pipe:cat {url}", 5)] == [listing[5][0], listing[6][0]]


def test_reader_truncated_and_unopenable(tmp_path):
    make_shards(tmp_path, "train", [8], size=16)
    url = str(tmp_path / "train-000000.tar")
    truncate(url, 0.5)
    seen = []
    with pytest.raises(ShardTruncated) as e:
        for p, _, _ in iter_samples(url):
            seen.append(p)
    assert 0 < len(seen) < 8 and e.value.position == len(seen)
    n, trunc = count_samples(url)
    assert n == len(seen) and trunc is not None
    (tmp_path / "garbage.tar").write_bytes(b"this is no tar file" * 100)
    for bad in (str(tmp_path / "garbage.tar"), str(tmp_path / "missing.tar"), "pipe:false"):
        with pytest.raises(ShardOpenError, match="cannot open shard"):
            list(iter_samples(bad))


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_reader_long_names(tmp_path, fmt):
    # pax headers, GNU long names, ustar prefix field
    key = "d" * 120 + "/" + "x" * 60 if fmt == tarfile.USTAR_FORMAT else "d/" + "x" * 150
    with tarfile.open(tmp_path / "long.tar", "w", format=fmt) as t:
        for ext in ("jpg", "cls"):
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = 1
            t.addfile(info, io.BytesIO(b"1"))
    (got,) = list(iter_samples(str(tmp_path / "long.tar")))
    assert got[1] == key and got[2] == {"jpg": b"1", "cls": b"1"}


def test_sources_dir_manifest_brace_glob_pipe(tmp_path):
    write_split(tmp_path, "train", 10, _enc, {"p": 1}, max_count=3)  # 9 samples in 3 shards (one bad)
    d = resolve(str(tmp_path), "train")
    assert [u.rsplit("/", 1)[1] for u in d.urls] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert d.counts == [3, 3, 3]
    brace = resolve(str(tmp_path / "train-{000000..000001}.tar"), "train")
    assert brace.counts == [3, 3] and len(brace.urls) == 2
    assert resolve(str(tmp_path / "train-*.tar"), "train").total == 9
    assert resolve(str(tmp_path / "train-manifest.json"), "train").total == 9
    pipe = resolve(f"pipe:cat {tmp_path}/train-{{000000..000002}}.tar", "train")
    assert len(pipe.urls) == 3 and pipe.counts == [3, 3, 3]  # counted by reading the stream
    both = resolve(f"{tmp_path}/train-000000.tar::{tmp_path}/train-000002.tar", "train")
    assert both.total == 6
    make_shards(tmp_path / "plain", "val", [2, 5], size=16)  # no manifest: counted from the tars
    assert resolve(str(tmp_path / "plain"), "val").counts == [2, 5]


def test_pattern_matching_nothing_is_a_clear_error(tmp_path):
    pattern = str(tmp_path / "train-{000000..000127}.tar")
    with pytest.raises(NoShardsError, match=r"train-\{000000\.\.000127\}\.tar"):
        resolve(pattern, "train")
    assert issubclass(NoShardsError, ValueError)
    with pytest.raises(NoShardsError, match="val-"):
        resolve(str(tmp_path), "val")
    with pytest.raises(NoShardsError):
        resolve(str(tmp_path / "nothing-*.tar"), "train")


def test_unopenable_shard_while_counting(tmp_path):
    make_shards(tmp_path, "train", [3, 3], size=16)
    (tmp_path / "train-000001.tar").write_bytes(b"")
    with pytest.raises(ShardOpenError, match="train-000001.tar"):
        resolve(str(tmp_path), "train")
    r = resolve(str(tmp_path), "train", skip_bad_shards=True)
    assert r.counts == [3, 0] and [k for _, k, _ in r.problems] == ["shard"]


def test_interoperates_with_the_webdataset_library(tmp_path):
    import webdataset as wds

    write_split(tmp_path, "train", 6, _enc, {"p": 1}, max_count=10)  # sample 5 is a bad input
    ds = wds.WebDataset(str(tmp_path / "train-000000.tar"), shardshuffle=False)
    got = [(s["__key__"], int(s["cls"])) for s in ds]
    assert got == [(f"k{i:03d}", i % 3) for i in range(5)]
    with wds.TarWriter(str(tmp_path / "w.tar")) as w:
        for i in range(3):
            w.write({"__key__": f"s{i}", "jpg": b"x" * (i + 1), "cls": i})
    assert [(k, m["cls"]) for _, k, m in iter_samples(str(tmp_path / "w.tar"))] == [
        ("s0", b"0"), ("s1", b"1"), ("s2", b"2")]
