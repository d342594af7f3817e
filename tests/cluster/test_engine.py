"""The engine against the single-process trainer, on real DeepSpeed across real gloo processes."""

import functools

import pytest
import torch

from alexnet_pp.config import load_config
from alexnet_pp.dropout import batch_keys
from alexnet_pp.model import AlexNet
from alexnet_pp.optim import build_optimizer
from alexnet_pp.steps import train_step
from alexnet_pp.weights import join_pieces
from cluster.feeds import TensorData
from cluster.spawn import run_local

STEPS = 5


def make_batches(n, batch, size=64, classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, size, size, generator=g), torch.randint(0, classes, (batch,), generator=g))
            for _ in range(n)]


def layout_cfg(tmp_path, pp, tp, dp, m, **extra):
    overrides = {
        "model.dropout": "0.5", "parallel.pp": pp, "parallel.tp": tp, "parallel.dp": dp, "parallel.micro_batches": m,
        "train.batch_size": 16, "train.epochs": 1, "train.eval_every": 100, "train.schedule": "constant",
        "train.lr": "0.05", "checkpoint.dir": str(tmp_path / "ckpt"), "out_dir": str(tmp_path / "runs"),
    }
    overrides.update({k: str(v) for k, v in extra.items()})
    return load_config("test", overrides=overrides)


def data_factory(batches, tp, dp, m, rank):
    return TensorData(batches, replica=(rank // tp) % dp, replicas=dp, micro_batches=m)


def reference(cfg, batches, device="cpu"):
    """The single-process trainer's steps on the same global batches, with the dropout keys it gives them
    (under bf16 autocast for parallel.precision bf16-mixed, as the plain GPU step runs)."""
    model = AlexNet(cfg.model, seed=cfg.train.seed).to(device)
    opt = build_optimizer(model.parameters(), cfg.train)
    seed = cfg.train.seed
    mixed = cfg.parallel.precision == "bf16-mixed"
    losses = []
    for step, (x, y) in enumerate(batches):
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=mixed):
            losses.append(train_step(model, x.to(device), y.to(device), opt, cfg.train.grad_clip,
                                     batch_keys(seed, step, 0, y.shape[0]).to(device)))
    return losses, model.state_dict()


def gathered_state(results, cfg):
    """Every rank's parameters, already named by the single model's state_dict keys (pieces of a
    tower's part, where a cut splits it, joined); replicas and fc8's tower copies must agree."""
    state = {}
    for res in results:
        for key, value in res.parameters.items():
            if key in state:
                torch.testing.assert_close(state[key], value)
            state[key] = value
    return join_pieces(state)


# Each case is one layout and the options whose exactness depends on it; together every axis (P up to
# 3, T = 2, D = 2, M up to 4) meets every option: clipping over tower shards and replicas, activation
# checkpointing's recomputed masks with two towers and with three stages, deferred weight gradients
# with replicas, and stage cuts inside a layer (tower 0's half on one stage, tower 1's on the next)
# and inside a tower's half (its first output channels or neurons on one stage, the rest on the next).
CASES = {
    "2x2x2 M2, clipped": ((2, 2, 2, 2), {"train.grad_clip": "0.05"}),
    "2x2x1 M2, activation checkpoints": ((2, 2, 1, 2), {"parallel.activation_checkpoint_interval": "1"}),
    "3x1x1 M4, activation checkpoints": ((3, 1, 1, 4), {"parallel.activation_checkpoint_interval": "1"}),
    "2x1x2 M2, cut in fc6's tower 0, deferred, clipped": ((2, 1, 2, 2), {
        "parallel.defer_weight_grads": "true", "train.grad_clip": "0.05", "parallel.partition": "fc6.0[200:]"}),
    "1x2x1 M2, channels-last": ((1, 2, 1, 2), {"parallel.channels_last": "true"}),
    "3x1x1 M2, cut in conv4 and in fc6's tower 1, channels-last": ((3, 1, 1, 2), {
        "parallel.partition": "conv4.1,fc6.1[100:]", "parallel.channels_last": "true"}),
}


@pytest.mark.e2e
@pytest.mark.parametrize("case", list(CASES))
def test_layouts_match_single_process_with_dropout_on(tmp_path, case):
    """The paper's dropout 0.5 on fc6 and fc7: every layout draws the single network's masks, and its
    losses and weights after every step are the single process's."""
    (pp, tp, dp, m), options = CASES[case]
    cfg = layout_cfg(tmp_path, pp, tp, dp, m, **{"checkpoint.resume": "false", **options})
    assert cfg.model.dropout == 0.5
    batches = make_batches(STEPS, cfg.train.batch_size)
    ref_losses, ref_state = reference(cfg, batches)
    if cfg.train.grad_clip:  # the clip is active, so a wrong norm would show
        unclipped, _ = reference(layout_cfg(tmp_path, pp, tp, dp, m), batches)
        assert abs(unclipped[-1] - ref_losses[-1]) > 1e-3
    results = run_local(cfg, functools.partial(data_factory, batches, tp, dp, m), keep_parameters=True)
    for res in results:  # every rank reports the job's loss
        torch.testing.assert_close(torch.tensor(res.losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-5)
    state = gathered_state(results, cfg)
    assert set(state) == set(ref_state)
    for key in ref_state:
        torch.testing.assert_close(state[key], ref_state[key], rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.e2e
def test_shard_stream_and_ten_crop_eval_through_the_pipeline(tmp_path):
    """Real shards on stage 0 only, labels carried to the last stage, 10-crop eval with padding."""
    from alexnet_pp.data import ensure_dataset

    cfg = layout_cfg(tmp_path, 2, 2, 1, 2, **{
        "data.synthetic_dir": str(tmp_path / "data"), "data.synthetic_val_per_class": "3",
        "data.eval_crops": "10", "train.max_steps": "4", "train.eval_every": "0.0001", "checkpoint.resume": "false"})
    info = ensure_dataset(cfg)
    results = run_local(cfg)
    evals = results[0].evals
    assert [e["step"] for e in evals] == [1, 2, 3, 4]
    assert all(e["val_samples"] == info.val_samples == 30 for e in evals)  # 30 = 2 micro-batches of 16, padded
    assert all(r.evals == evals for r in results)  # every rank agrees (the plateau schedule needs it)
    assert len(results[0].losses) == 4


# (P, T, D, M) with a global batch of 16; each run of the chain resumes the previous one's checkpoint.
CHAIN = [(2, 2, 1, 2), (1, 1, 1, 2), (3, 1, 2, 4), (4, 1, 1, 4)]


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_checkpoints_resume_on_any_layout_with_the_single_process_losses_and_weights(tmp_path):
    """(2,2,1) → (1,1,1) → (3,1,2) → (4,1,1), one step each, one checkpoint
    directory, dropout on: every step's loss and the final weights (momentum included) are the single
    process's, and each resume on another layout says so."""
    batches = make_batches(len(CHAIN), 16)
    cfg0 = layout_cfg(tmp_path, *CHAIN[0], **{"train.epochs": "2"})
    ref_losses, ref_state = reference(cfg0, batches)
    losses, previous = [], None
    for i, (pp, tp, dp, m) in enumerate(CHAIN):
        cfg = layout_cfg(tmp_path, pp, tp, dp, m, **{"train.epochs": "2", "train.max_steps": str(i + 1),
                                                    "parallel.partition": "flops"})
        results = run_local(cfg, functools.partial(data_factory, batches, tp, dp, m), keep_parameters=True)
        assert results[0].resumed_from == (i or None)
        assert results[0].resumed_layout == (previous if previous not in (None, (pp, tp, dp)) else None)
        losses += results[0].losses
        previous = (pp, tp, dp)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-5)
    state = gathered_state(results, cfg)
    for key in ref_state:
        torch.testing.assert_close(state[key], ref_state[key], rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.e2e
def test_bf16_engine_casts_images_and_tracks_the_float32_run(tmp_path):
    """bf16 weights meet float32 images at the first stage (DeepSpeed moves batches, never casts them);
    the losses stay near the float32 reference's across a pipeline cut."""
    cfg = layout_cfg(tmp_path, 2, 1, 1, 2, **{"parallel.precision": "bf16", "checkpoint.resume": "false"})
    batches = make_batches(3, cfg.train.batch_size)  # bf16 rounding compounds: three steps, as before
    ref_losses, _ = reference(cfg, batches)
    results = run_local(cfg, functools.partial(data_factory, batches, 1, 1, 2))
    torch.testing.assert_close(torch.tensor(results[0].losses), torch.tensor(ref_losses), rtol=3e-2, atol=3e-2)


@pytest.mark.e2e
@pytest.mark.parametrize("layout", [(1, 1, 1, 1), (1, 2, 1, 1), (2, 1, 1, 1)])
def test_bf16_mixed_engine_is_the_plain_step_under_autocast(tmp_path, layout):
    """parallel.precision bf16-mixed: float32 weights and optimizer, each stage's forward under bf16
    autocast; on one rank, with the towers on two and over two stages (bf16 activations sent), the
    same losses and float32 weights as the plain step under torch.autocast, dropout on. (Not across
    micro-batches or with channels-last: bf16 rounds a weight gradient summed over micro-batches, or
    computed by NHWC kernels, differently.)"""
    pp, tp, dp, m = layout
    cfg = layout_cfg(tmp_path, pp, tp, dp, m, **{"parallel.precision": "bf16-mixed", "checkpoint.resume": "false"})
    batches = make_batches(3, cfg.train.batch_size)
    ref_losses, ref_state = reference(cfg, batches)
    results = run_local(cfg, functools.partial(data_factory, batches, tp, dp, m), keep_parameters=True)
    state = gathered_state(results, cfg)
    assert all(v.dtype == torch.float32 for v in state.values())  # float32 weights
    for res in results:
        torch.testing.assert_close(torch.tensor(res.losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-5)
    for key in ref_state:
        torch.testing.assert_close(state[key], ref_state[key], rtol=1e-4, atol=1e-6, msg=key)


_no_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")


@pytest.mark.cuda
@_no_cuda
@pytest.mark.parametrize("precision,tol", [("fp32", 2e-3), ("bf16", 3e-2), ("bf16-mixed", 2e-3)])
def test_engine_on_cuda_matches_the_plain_step(tmp_path, monkeypatch, precision, tol):
    """One GPU: (P, T, D) = (1, 1, 1) on cuda with the cpu:gloo,cuda:nccl process group and batches
    prefetched to the device, against the single-process step on the same GPU in float32 (both with
    cuDNN's TF32 convolutions; bf16 within bf16's rounding; bf16-mixed against the step under autocast)."""
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    cfg = layout_cfg(tmp_path, 1, 1, 1, 2, **{"parallel.precision": precision, "checkpoint.resume": "false",
                                              "parallel.gpus_per_worker": "1", "train.lr": "0.01"})
    batches = make_batches(STEPS, cfg.train.batch_size)
    ref_losses, _ = reference(cfg, batches, "cuda")
    results = run_local(cfg, functools.partial(data_factory, batches, 1, 1, 2))
    torch.testing.assert_close(torch.tensor(results[0].losses), torch.tensor(ref_losses), rtol=tol, atol=tol)


class DivergentTower(TensorData):
    """Tower 1 of stage 0 reads another label for one sample of the second step (a transient read error)."""

    def _split(self, step, images, labels):
        if step == 1:
            labels = labels.clone()
            labels[0] = (labels[0] + 1) % 10
        yield from super()._split(step, images, labels)


def divergent_factory(batches, rank):
    cls = DivergentTower if rank == 1 else TensorData  # rank 1: stage 0, tower 1
    return cls(batches, replica=0, replicas=1, micro_batches=2)


@pytest.mark.e2e
def test_towers_that_read_different_samples_stop_before_training_on_them(tmp_path):
    cfg = layout_cfg(tmp_path, 2, 2, 1, 2, **{"checkpoint.resume": "false"})
    batches = make_batches(STEPS, cfg.train.batch_size)
    with pytest.raises(RuntimeError, match=r"towers of stage 0 read different samples for step 2 \(micro-batch 0"):
        run_local(cfg, functools.partial(divergent_factory, batches))


@pytest.mark.e2e
def test_a_rank_allocates_only_its_stage_and_towers_parameters(tmp_path):
    """The paper network at (P, T, D) = (4, 2, 1): every part a rank ever builds is one it holds."""
    from alexnet_pp.shapes import layer_param_counts

    cfg = load_config("paper", overrides={
        "parallel.pp": "4", "parallel.tp": "2", "parallel.micro_batches": "2", "parallel.partition": "flops",
        "train.batch_size": "2", "train.max_steps": "1", "train.eval_every": "100", "train.threads": "1",
        "checkpoint.dir": str(tmp_path / "ckpt"), "out_dir": str(tmp_path / "runs"),
        "data.train": "unused", "data.val": "unused"})
    batches = make_batches(1, 2, size=224, classes=1000)
    results = run_local(cfg, functools.partial(counting_factory, batches, tmp_path), keep_parameters=True)
    per_layer = dict(zip(("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"),
                         layer_param_counts(cfg.model)))
    total = 0
    for res in results:
        held = sum(p.numel() for p in res.parameters.values())
        built = int((tmp_path / f"built-{res.coord['rank']}").read_text())
        layers = {k.split(".")[-2] for k in res.parameters}
        expected = sum(per_layer[n] if n == "fc8" else per_layer[n] // 2 for n in layers)
        assert built == held == expected, (res.coord, built, held, expected)
        total += held
    assert total == sum(per_layer.values()) + per_layer["fc8"]  # the whole network once, fc8 on both towers


def counting_factory(batches, out_dir, rank):
    """Runs in the rank's process before its engine is built: count every parameter the rank creates."""
    import alexnet_pp.model as model
    import alexnet_pp.pipeline as pipeline
    import cluster.stage_layers as stage_layers

    built = [0]
    original = model.build_part

    def counted(*args, **kwargs):
        part = original(*args, **kwargs)
        built[0] += sum(p.numel() for p in part.parameters())
        (out_dir / f"built-{rank}").write_text(str(built[0]))
        return part

    model.build_part = pipeline.build_part = stage_layers.build_part = counted
    return TensorData(batches, replica=0, replicas=1, micro_batches=2)
