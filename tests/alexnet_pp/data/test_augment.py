"""The augmentation's other paths give the CPU loader's images: uint8 crops finished on a device,
the loader finishing on a device, and decoded images cropped by torch ops (the GPU path's code,
run on CPU tensors) with the same per-sample draws."""

import sys

import numpy as np
import pytest
import torch

from alexnet_pp.config import preset
from alexnet_pp.data import augment_batch, build_train_loader, finish_batch, gpu_decode
from alexnet_pp.data import transforms as T
from alexnet_pp.data.stream import ShardStream
from alexnet_pp.data.loader import _spec

from shardsets import make_shards

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("augment")
    make_shards(r, "train", [9, 7, 8], size=40, corrupt={"train-s1-2": "garbage_jpg"})
    make_shards(r, "val", [4], size=40)
    return r


def cfg_for(root, workers=0, **data):
    cfg = preset("test")
    cfg.model.image_size, cfg.model.num_classes = 32, 10
    d = cfg.data
    d.train = d.val = str(root)
    d.stored_size, d.workers, d.shuffle_buffer, d.color_noise = 40, workers, 6, 0.3
    for k, v in data.items():
        setattr(d, k, v)
    cfg.train.batch_size, cfg.train.seed = 4, 9
    return cfg


@pytest.mark.parametrize("workers", [0, 2])
def test_uint8_batches_finished_anywhere_are_the_float_batches(root, workers):
    cfg = cfg_for(root, workers)
    floats = list(build_train_loader(cfg, 0, 2, epoch=3, with_keys=True))
    crops = list(build_train_loader(cfg, 0, 2, epoch=3, with_keys=True, uint8=True))
    assert len(crops) == len(floats) > 1
    for (x, labels, keys), (u8, offsets, labels8, keys8) in zip(floats, crops):
        assert keys8 == keys and torch.equal(labels8, labels)
        assert u8.dtype == torch.uint8 and u8.shape == x.shape and offsets.shape == (len(keys), 3)
        assert torch.equal(finish_batch(u8, offsets, "cpu"), x)  # bit for bit
        assert finish_batch(u8, offsets).is_contiguous()
    on_device = list(build_train_loader(cfg, 0, 2, epoch=3, with_keys=True, device="cpu"))
    assert all(torch.equal(a[0], b[0]) and a[2] == b[2] for a, b in zip(on_device, floats))


def test_uint8_crops_are_the_decoded_pixels(root):
    decoded = {}
    for shard in sorted(root.glob("train-*.tar")):
        from alexnet_pp.data.tarstream import iter_samples

        for _, key, m in iter_samples(str(shard)):
            try:
                decoded[key] = T.decode(m["jpg"])
            except T.DecodeError:
                pass
    cfg = cfg_for(root, color_noise=0.0, flip=False)
    for u8, offsets, _, keys in build_train_loader(cfg, with_keys=True, uint8=True):
        assert not offsets.any()
        for img, key in zip(u8, keys):
            hwc = img.permute(1, 2, 0).numpy()
            full = decoded[key]
            assert any(np.array_equal(hwc, full[y:y + 32, x:x + 32]) for y in range(9) for x in range(9))


def test_torch_ops_with_the_same_draws_give_the_same_pixels():
    """What the GPU path runs after decoding (crop, flip, lighting, normalise as torch ops), here on
    CPU tensors, against the CPU loader's kernel, with draws from the samples' own generators."""
    side, noise = 24, 0.5
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, size=(30 + i, 26 + 2 * i, 3), dtype=np.uint8) for i in range(8)]
    aug = T.SampleRandom(seed=4, epoch=2)
    draws = [T.draw(aug.at(100 + i), *img.shape[:2], side, True, noise) for i, img in enumerate(imgs)]
    assert {d.flip for d in draws} == {True, False} and len({(d.y, d.x) for d in draws}) > 4
    offsets = np.stack([d.offset for d in draws])
    scale, bias = T.scale_bias(offsets, len(imgs))
    cpu = np.empty((len(imgs), 3, side, side), np.float32)
    from alexnet_pp.data import native

    for i, (img, d) in enumerate(zip(imgs, draws)):
        native.crop_into(img, d.y, d.x, side, d.flip, cpu[i], scale, bias[i])
    boxes = [(d.y, d.x, d.flip) for d in draws]
    chw = [torch.from_numpy(img).permute(2, 0, 1) for img in imgs]  # as torchvision's decoder returns them
    out = augment_batch(chw, boxes, torch.from_numpy(offsets), side)
    assert out.dtype == torch.float32 and out.is_contiguous()
    assert torch.equal(out, torch.from_numpy(cpu))
    hwc = [torch.from_numpy(img) for img in imgs]
    assert torch.equal(augment_batch(hwc, boxes, torch.from_numpy(offsets), side, channels_last_input=True), out)
    # and the colour noise is what it should be: the offset along the PCA basis, per image
    plain = augment_batch(chw, boxes, None, side)
    diff = (out - plain) * torch.from_numpy(T.STD).view(1, 3, 1, 1)
    assert torch.allclose(diff.mean(dim=(2, 3)), torch.from_numpy(offsets), atol=1e-5)


def fake_decoder(calls):
    """torchvision.io.decode_jpeg's signature, decoding with libjpeg on the CPU."""

    def decode_jpeg(data, mode=None, device="cpu"):
        calls.append(len(data) if isinstance(data, list) else 1)
        one = lambda t: torch.from_numpy(np.ascontiguousarray(T.decode(t.numpy().tobytes()))).permute(2, 0, 1)
        return [one(t) for t in data] if isinstance(data, list) else one(data)

    class Mode:
        RGB = "rgb"

    return decode_jpeg, Mode


def test_encoded_batches_decoded_elsewhere_are_the_float_batches(root):
    """The GPU path end to end except the CUDA decoder: workers send JPEG bytes and draws, the
    consumer decodes the batch in one call and augments with torch ops."""
    cfg = cfg_for(root, workers=0)
    spec, _ = _spec(cfg, "train", True, 1, 2, 4)
    floats = [b for b in ShardStream(spec, 5).worker_batches()]
    calls = []
    decoder = gpu_decode.DeviceDecoder("cpu", fake_decoder(calls))
    stream = ShardStream(spec, 5, output="encoded")
    encoded = list(stream.worker_batches())
    assert [b[2] for b in encoded] == [b[2] for b in floats] and stream._skips == {}
    for (x, labels, keys, skips), (enc, labels2, keys2, skips2) in zip(floats, encoded):
        assert all(isinstance(p, bytes) for p in enc.payloads)  # nothing decoded in the worker
        assert skips == skips2 and torch.equal(labels, labels2)
        out = augment_batch(decoder(enc.payloads), enc.boxes, torch.from_numpy(enc.offsets), 32)
        assert torch.equal(out, x)
    assert calls == [4] * len(floats)  # one batched call per batch


def test_encoded_batches_carry_what_the_device_cannot_decode_as_pixels(tmp_path):
    """Images smaller than the crop are upscaled (and so decoded) in the worker; raw .npy
    members are pixels already; both travel as arrays beside the JPEG bytes."""
    make_shards(tmp_path, "train", [4], size=20)  # 20 px < 32 px crops
    cfg = cfg_for(tmp_path, shuffle_buffer=1)
    spec, _ = _spec(cfg, "train", True, 0, 1, 4)
    (enc, *_), = ShardStream(spec, 0, output="encoded").worker_batches()
    (x, *_), = ShardStream(spec, 0).worker_batches()
    assert all(isinstance(p, np.ndarray) and p.shape == (32, 32, 3) for p in enc.payloads)
    decoder = gpu_decode.DeviceDecoder("cpu", fake_decoder([]))
    assert torch.equal(augment_batch(decoder(enc.payloads), enc.boxes, torch.from_numpy(enc.offsets), 32), x)


def test_a_body_no_decoder_reads_becomes_grey_and_is_counted(root):
    from shardsets import jpeg_bytes

    good = jpeg_bytes(np.random.default_rng(1).integers(0, 256, (64, 48, 3), dtype=np.uint8))
    bad = good[: len(good) // 2]  # header intact, body cut short
    assert T.jpeg_size(bad) == (64, 48)
    dec = gpu_decode.DeviceDecoder("cpu", fake_decoder([]))
    out = dec([good, bad])
    assert out[0].shape == (3, 64, 48) and dec.failures == 1
    assert out[1].shape == (3, 64, 48) and bool((out[1] == 128).all())


def test_decode_modes_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_decode.resolve("cpu", None) == "cpu"
    assert gpu_decode.resolve("auto", None) == "cpu"
    assert gpu_decode.resolve("auto", "cpu") == "cpu"
    assert gpu_decode.resolve("auto", "cuda:0") == "cpu"  # no CUDA here
    with pytest.raises(ValueError, match="device="):
        gpu_decode.resolve("gpu", None)
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        gpu_decode.resolve("gpu", "cuda:0")
    with pytest.raises(ValueError, match="cpu, gpu or auto"):
        gpu_decode.resolve("nvjpeg", None)


def test_auto_decodes_on_the_gpu_only_where_the_cpu_workers_are_too_few(monkeypatch):
    monkeypatch.setattr(gpu_decode, "available", lambda device=None: (True, ""))  # as on a GPU host
    few, many = gpu_decode.GPU_DECODE_BELOW_WORKERS - 1, gpu_decode.GPU_DECODE_BELOW_WORKERS
    assert gpu_decode.resolve("auto", "cuda:0", few) == "gpu"
    assert gpu_decode.resolve("auto", "cuda:0", many) == "cpu"
    assert gpu_decode.resolve("gpu", "cuda:0", many) == "gpu"  # asked for: always
    assert gpu_decode.resolve("auto", "cpu", 0) == "cpu"


def test_gpu_decode_without_torchvision_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import torchvision → ImportError
    monkeypatch.setitem(sys.modules, "torchvision.io", None)
    with pytest.raises(RuntimeError, match="torchvision.*data.decode: cpu"):
        gpu_decode.DeviceDecoder("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    ok, why = gpu_decode.available("cuda")
    assert not ok and "torchvision" in why
    assert gpu_decode.resolve("auto", "cuda") == "cpu"


def test_a_configured_gpu_decode_needs_a_device(root):
    with pytest.raises(ValueError, match="device="):
        build_train_loader(cfg_for(root, decode="gpu"))
    with pytest.raises(ValueError, match="uint8=True"):
        build_train_loader(cfg_for(root), uint8=True, device="cpu")


@pytest.mark.cuda
@pytest.mark.skipif(not gpu_decode.available()[0], reason=f"no CUDA JPEG decoder: {gpu_decode.available()[1][:120]}")
def test_on_cuda_the_gpu_path_matches_the_cpu_path(root):
    """nvJPEG's pixels may differ from libjpeg's by a few levels; crops, flips and noise do not."""
    cfg = cfg_for(root, decode="gpu", color_noise=0.3)
    floats = list(build_train_loader(cfg_for(root, decode="cpu", color_noise=0.3), 0, 2, epoch=3, with_keys=True))
    loader = build_train_loader(cfg, 0, 2, epoch=3, with_keys=True, device="cuda")
    assert loader.decode == "gpu"
    gpu = list(loader)
    assert [k for *_, k in gpu] == [k for *_, k in floats]
    for (x, _, _), (g, _, _) in zip(floats, gpu):
        assert g.is_cuda and g.shape == x.shape
        d = (g.cpu() - x).abs() * torch.from_numpy(T.STD).view(1, 3, 1, 1) * 255  # in pixel levels
        assert float(d.mean()) < 2.0 and float(d.max()) < 40
    on_device = list(build_train_loader(cfg_for(root, decode="cpu"), 0, 2, epoch=3, with_keys=True, device="cuda"))
    for (x, _, _), (g, _, _) in zip(floats, on_device):
        assert torch.equal(g.cpu(), x)  # uint8 to the device, finished there: the same bits
