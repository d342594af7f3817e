"""Remote shard sources: opened through webdataset's gopen, expanded by webdataset, counted once."""

import functools
import http.server
import shutil
import threading

import pytest
import webdataset

from alexnet_pp.config import preset
from alexnet_pp.data import build_eval_loader, build_train_loader, sources
from alexnet_pp.data.shards import Encoded, write_split
from alexnet_pp.data.sources import NoShardsError, resolve
from alexnet_pp.data.tarstream import ShardOpenError, ShardTruncated, count_samples, iter_samples

from shardsets import jpeg_bytes, make_shards, random_image

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create")

COUNTS = [5, 9, 3, 11, 4]
PATTERN = "train-{000000..000004}.tar"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("remote")
    make_shards(r, "train", COUNTS, size=40)
    make_shards(r, "val", [4, 3], size=40)
    return r


@pytest.fixture(autouse=True)
def fresh_counts(monkeypatch):
    """Each test starts with the process-wide memo of remote counts and manifests empty."""
    monkeypatch.setattr(sources, "_REMOTE_COUNTS", {}, raising=False)
    monkeypatch.setattr(sources, "_REMOTE_MANIFESTS", {}, raising=False)


@pytest.fixture()
def counted(monkeypatch):
    """URLs streamed to count their samples, in order."""
    calls = []

    def counting(url):
        calls.append(url)
        return count_samples(url)

    monkeypatch.setattr(sources, "count_samples", counting)
    return calls


@pytest.fixture(scope="module")
def http_root(root):
    """The shard folder served over http on 127.0.0.1."""
    handler = functools.partial(QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def cfg_for(train, val=None, workers=0):
    cfg = preset("test")
    cfg.model.image_size, cfg.model.num_classes = 32, 10
    d = cfg.data
    d.train, d.val = train, val or train
    d.stored_size, d.workers, d.shuffle_buffer = 40, workers, 6
    cfg.train.batch_size, cfg.train.seed = 8, 5
    return cfg


def keys_of(loader):
    return [k for _, _, keys in loader for k in keys]


def test_any_scheme_registered_with_gopen_is_read(root, monkeypatch):
    """The reader opens URLs with webdataset's gopen: a scheme registered there just works."""
    opened = []

    def handler(url, mode="rb", bufsize=8192, **kw):
        opened.append(url)
        return open(url[len("shardtest://"):], mode)

    monkeypatch.setitem(webdataset.gopen_schemes, "shardtest", handler)
    url = f"shardtest://{root}/train-000001.tar"
    assert [k for _, k, _ in iter_samples(url, 2, 4)] == ["train-s1-2", "train-s1-3"]
    assert count_samples(url) == (9, None)
    assert opened == [url, url]


def test_sources_with_a_gopen_scheme_feed_the_loader(root, monkeypatch):
    monkeypatch.setitem(webdataset.gopen_schemes, "shardtest",
                        lambda url, mode="rb", bufsize=8192, **kw: open(url[len("shardtest://"):], mode))
    cfg = cfg_for(f"shardtest://{root}/{PATTERN}")
    assert keys_of(build_train_loader(cfg, epoch=1, with_keys=True)) == keys_of(
        build_train_loader(cfg_for(str(root)), epoch=1, with_keys=True))


def test_relative_local_paths_with_a_colon_are_no_urls(root, tmp_path, monkeypatch):
    make_shards(tmp_path / "run:3", "train", [4, 2], size=40)
    make_shards(tmp_path / "run:3", "val", [2], size=40)
    monkeypatch.chdir(tmp_path)
    assert resolve("run:3/train-{000000..000001}.tar", "train").counts == [4, 2]
    assert [k for _, k, _ in iter_samples("run:3/train-000001.tar")] == ["train-s1-0", "train-s1-1"]
    assert len(keys_of(build_train_loader(cfg_for("run:3"), with_keys=True))) == 8  # 6 samples, one batch of 8


def test_unknown_scheme_is_a_clear_error_naming_the_shard(root):
    with pytest.raises(ShardOpenError, match=r"cannot open shard nosuch://x/train-000000\.tar"):
        resolve("nosuch://x/train-{000000..000001}.tar", "train")


def test_http_sources_stream_like_files(root, http_root):
    cfg = cfg_for(f"{http_root}/{PATTERN}", f"{http_root}/val-{{000000..000001}}.tar", workers=2)
    local = cfg_for(str(root), workers=2)
    assert keys_of(build_train_loader(cfg, 1, 2, epoch=2, with_keys=True)) == keys_of(
        build_train_loader(local, 1, 2, epoch=2, with_keys=True))
    assert keys_of(build_eval_loader(cfg, with_keys=True)) == keys_of(build_eval_loader(local, with_keys=True))


def test_http_shard_missing_is_an_error_naming_it(root, http_root):
    url = f"{http_root}/train-000099.tar"
    with pytest.raises(ShardOpenError, match=r"cannot open shard .*train-000099\.tar.*status 22"):
        list(iter_samples(url))  # curl -f: HTTP 404 is exit status 22
    r = resolve(f"{http_root}/train-{{000003..000004}}.tar::{url}", "train", skip_bad_shards=True)
    assert r.counts == [11, 4, 0] and [(u, k) for u, k, _ in r.problems] == [(url, "shard")]


def test_failing_and_breaking_commands(root, tmp_path):
    with pytest.raises(ShardOpenError, match=r"cannot open shard pipe:exit 3.*status 3"):
        list(iter_samples("pipe:exit 3"))
    whole = (root / "train-000003.tar").read_bytes()
    half = tmp_path / "half"
    half.write_bytes(whole[: len(whole) // 2])
    in_half = []
    with pytest.raises(ShardTruncated):
        for p, _, _ in iter_samples(str(half)):
            in_half.append(p)
    assert 0 < len(in_half) < 11
    # a failing command gives every sample it wrote before the break, whenever it exited
    seen = []
    with pytest.raises(ShardTruncated, match="status 4"):
        for p, _, _ in iter_samples(f"pipe:cat {half}; exit 4"):
            seen.append(p)
    assert seen == in_half
    # stopping early on purpose kills the command: no error, no process left behind
    assert [p for p, _, _ in iter_samples(f"pipe:cat {root}/train-000003.tar; sleep 30", 0, 2)] == [0, 1]


def test_a_command_that_exited_before_the_first_read_keeps_its_output(root):
    """webdataset's Pipe.read checks the exit status after each read and drops that read's data:
    a command already gone with a failure lost everything it wrote. Its output is read first."""
    from alexnet_pp.data.tarstream import _ReadError, _Source

    whole = (root / "train-000000.tar").read_bytes()
    assert len(whole) < 65536  # within a pipe's buffer: cat can finish before anything is read
    src = _Source(f"pipe:cat {root}/train-000000.tar; exit 5")
    try:
        src.pipe.proc.wait(timeout=30)  # the command has written the whole shard and failed
        assert src.read(len(whole)) == whole
        with pytest.raises(_ReadError, match="status 5"):  # then its output ends, and its status counts
            src.read(512)
    finally:
        src.close()


def test_webdataset_expansion_with_environment(root, monkeypatch):
    monkeypatch.setenv("WDS_SHARDROOT", str(root))
    r = resolve("${SHARDROOT}/train-{000001..000002}.tar", "train")
    assert r.counts == [9, 3] and r.urls == [f"{root}/train-000001.tar", f"{root}/train-000002.tar"]
    r = resolve("pipe:cat ${SHARDROOT}/train-{000000..000001}.tar", "train")
    assert r.urls == [f"pipe:cat {root}/train-000000.tar", f"pipe:cat {root}/train-000001.tar"]
    with pytest.raises(NoShardsError, match="NOSUCHVAR"):
        resolve("${NOSUCHVAR}/train-000000.tar", "train")


def test_pipe_source_is_counted_once_per_process_not_per_loader_build(root, counted):
    cfg = cfg_for(f"pipe:cat {root}/{PATTERN}", f"pipe:cat {root}/val-{{000000..000001}}.tar")
    for epoch in range(3):  # what a trainer does: a loader per epoch, evaluations in between
        list(build_train_loader(cfg, 0, 2, epoch=epoch))
        list(build_train_loader(cfg, 1, 2, epoch=epoch))
        list(build_eval_loader(cfg))
    assert sorted(counted) == sorted([f"pipe:cat {root}/train-{i:06d}.tar" for i in range(5)]
                                     + [f"pipe:cat {root}/val-{i:06d}.tar" for i in range(2)])


def test_count_cache_file_keeps_remote_counts_across_processes(root, tmp_path, counted, monkeypatch):
    cache = tmp_path / "cache" / "counts.json"
    spec = f"pipe:cat {root}/{PATTERN}"
    assert resolve(spec, "train", count_cache=cache).counts == COUNTS
    assert len(counted) == 5 and cache.exists()
    monkeypatch.setattr(sources, "_REMOTE_COUNTS", {})  # a new process
    assert resolve(spec, "train", count_cache=cache).counts == COUNTS
    assert len(counted) == 5  # nothing streamed again
    # a shard that cannot be opened is not cached as empty
    bad = f"pipe:cat {tmp_path}/nothing.tar"
    assert resolve(f"{spec}::{bad}", "train", skip_bad_shards=True, count_cache=cache).counts == COUNTS + [0]
    assert bad not in cache.read_text()


def test_remote_manifest_gives_urls_counts_and_classes(tmp_path, http_root, root, counted):
    def enc(i):
        return Encoded(index=i, key=f"k{i:03d}", data=jpeg_bytes(random_image(i, 40)), label=i % 3)

    write_split(tmp_path, "train", 10, enc, {"t": 1}, max_count=4)
    (tmp_path / "classes.json").write_text('["a", "b", "c"]')
    r = resolve(f"pipe:cat {tmp_path}/train-manifest.json", "train")
    assert r.urls == [f"pipe:cat {tmp_path}/train-{i:06d}.tar" for i in range(3)]
    assert r.counts == [4, 4, 2] and r.classes == ["a", "b", "c"]
    assert counted == []  # from the manifest, no shard streamed
    shutil.copy(tmp_path / "train-manifest.json", root / "copied-manifest.json")
    shutil.copy(tmp_path / "train-000000.tar", root / "train-000000.tar.copy")  # not listed: never read
    r = resolve(f"{http_root}/copied-manifest.json", "train")
    assert r.urls[0] == f"{http_root}/train-000000.tar" and r.counts == [4, 4, 2] and counted == []
    with pytest.raises(NoShardsError, match="cannot read the manifest"):
        resolve(f"{http_root}/missing-manifest.json", "train")
