"""What a first pipeline stage reads: the shard stream per replica, resumed without decoding, keyed."""

import copy

import pytest
import torch

from alexnet_pp.config import load_config
from alexnet_pp.data import ensure_dataset
from alexnet_pp.data import transforms as T
from alexnet_pp.dropout import batch_keys
from alexnet_pp.layout import Layout
from cluster.feeds import ShardData, TensorData, train_micro_batches

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create")


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    cfg = load_config("test", overrides={
        "data.synthetic_dir": str(tmp_path_factory.mktemp("data")), "data.synthetic_train_per_class": "25",
        "parallel.dp": "2", "parallel.micro_batches": "4", "train.batch_size": "16"})
    ensure_dataset(cfg)
    return cfg


def test_every_sample_once_per_epoch_in_whole_steps_when_m_does_not_divide_the_share(cfg):
    lay = Layout.from_config(cfg)  # 250 samples, 2 replicas, micro-batch 2, M = 4: 125 (63 batches) each
    seen = []
    for replica in range(lay.dp):
        data = ShardData(cfg, lay, replica)
        n = data.micro_batches_per_epoch()
        assert n % lay.micro_batches == 0 and n * lay.micro_batch >= 125  # whole steps, nothing dropped
        seen += [k for _, _, keys in data._loader(0) for k in keys]
    assert len(set(seen)) == 250  # every sample at least once


def test_resuming_far_into_an_epoch_decodes_only_what_follows(cfg, monkeypatch):
    lay = Layout.from_config(cfg)
    data = ShardData(cfg, lay, replica=1)
    full = list(data.epoch(2))
    start = len(full) - 3  # far into the epoch: all but the last step skipped
    decoded = []
    real = T.decode
    monkeypatch.setattr(T, "decode", lambda b, *a, **k: decoded.append(1) or real(b, *a, **k))
    tail = list(data.epoch(2, start))
    assert len(tail) == 3 and len(decoded) == 3 * lay.micro_batch  # the skipped samples were never decoded
    for (x, y, d), (x2, y2, d2) in zip(tail, full[start:]):
        assert torch.equal(x, x2) and torch.equal(y, y2) and d == d2


def test_micro_batches_carry_the_dropout_keys_of_their_rows_in_the_global_batch():
    lay = Layout.from_config(load_config("test", overrides={
        "parallel.dp": "2", "parallel.micro_batches": "2", "train.batch_size": "8"}))
    batches = [(torch.randn(8, 3, 4, 4), torch.arange(8)) for _ in range(3)]
    data = TensorData(batches, replica=1, replicas=2, micro_batches=2)
    out = list(train_micro_batches(data, lay, replica=1, seed=5, epoch=0, first_step=10, skip_steps=1, device="cpu"))
    assert len(out) == 4  # steps 1 and 2 of the epoch (global steps 10 and 11), two micro-batches each
    (x, y, keys), _ = out[3]  # global step 11, micro-batch 1 of replica 1: rows 6..7 of the global batch
    assert torch.equal(y, torch.tensor([6, 7])) and torch.equal(keys, batch_keys(5, 11, 6, 2))
    assert torch.equal(x, batches[2][0][6:8])


def test_a_gpu_rank_has_its_loader_finish_batches_on_its_device_and_a_cpu_rank_does_not(cfg, monkeypatch):
    import cluster.feeds as feeds

    seen = []
    real = feeds.build_train_loader

    def recording(*a, device=None, **k):
        seen.append(device)
        return real(*a, **k)  # the CPU loader: this machine may have no CUDA device to finish on

    monkeypatch.setattr(feeds, "build_train_loader", recording)
    lay = Layout.from_config(cfg)
    ShardData(cfg, lay, 0, torch.device("cpu"))
    ShardData(cfg, lay, 0, None)
    ShardData(cfg, lay, 0, torch.device("cuda", 0))
    assert seen == [None, None, torch.device("cuda", 0)]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("decode", ["cpu", "gpu"])
def test_on_cuda_the_engine_feed_yields_the_cpu_feeds_batches_on_the_device(cfg, decode):
    lay = Layout.from_config(cfg)
    on_cpu = list(ShardData(cfg, lay, 1).epoch(1))[:4]
    cfg = copy.deepcopy(cfg)
    cfg.data.decode, cfg.parallel.gpus_per_worker = decode, 1
    on_gpu = list(ShardData(cfg, lay, 1, torch.device("cuda")).epoch(1))[:4]
    for (x, y, d), (g, gy, gd) in zip(on_cpu, on_gpu):
        assert g.is_cuda and not gy.is_cuda and torch.equal(y, gy) and d == gd  # the same samples
        if decode == "cpu":  # uint8 crops finished on the device: the same bits
            assert torch.equal(g.cpu(), x)
        else:  # nvJPEG's pixels differ from libjpeg-turbo's by a few levels; crops and flips do not
            levels = (g.cpu() - x).abs() * torch.from_numpy(T.STD).view(1, 3, 1, 1) * 255
            assert float(levels.mean()) < 4.0, float(levels.mean())
