"""A trained run used as a model: export, evaluation and prediction from a layout-free checkpoint."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from alexnet_pp.config import load_config
from alexnet_pp.model import AlexNet
from alexnet_pp.weights import CheckpointError, check_model_compatible
from cluster.cli import main
from cluster.inference import evaluate, export, find_checkpoint, predict

pytestmark = [pytest.mark.e2e, pytest.mark.filterwarnings("ignore:This DataLoader will create")]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The test preset trained 4 steps as (2, 2, 1) on the embedded shards, with a checkpoint."""
    from cluster.spawn import run_local

    tmp = tmp_path_factory.mktemp("inference")
    cfg = load_config("test", overrides={
        "parallel.pp": "2", "parallel.tp": "2", "parallel.micro_batches": "2", "train.max_steps": "4",
        "train.schedule": "constant",  # the learning rate must not depend on where a run stops
        "data.synthetic_dir": str(tmp / "data"), "out_dir": str(tmp / "runs"), "name": "r"})
    from alexnet_pp.data import ensure_dataset

    ensure_dataset(cfg)
    cfg.run_dir.mkdir(parents=True)
    (cfg.run_dir / "config.yaml").write_text(cfg.to_yaml())
    results = run_local(cfg, keep_parameters=True)
    state = {}
    for r in results:
        state.update(r.parameters)
    return cfg, results[0].evals[-1], state


def test_export_holds_the_trained_weights_and_gives_their_logits(run, tmp_path):
    cfg, _, state = run
    done = export(cfg.run_dir, tmp_path / "m.safetensors")
    assert done["step"] == 4 and done["classes"] == 10
    model = AlexNet.from_pretrained(tmp_path / "m.safetensors")
    assert len(model.classes) == 10
    trained = AlexNet(cfg.model)
    trained.load_state_dict(state)
    x = torch.randn(3, 3, cfg.model.image_size, cfg.model.image_size)
    assert torch.equal(model(x), trained.eval()(x))


@pytest.mark.parametrize("workers", [1, 2])
def test_eval_matches_the_in_training_evaluation_at_that_step(run, tmp_path, workers):
    cfg, in_training, _ = run
    got = evaluate(cfg.run_dir, load_config("test", overrides={"data.synthetic_dir": cfg.data.synthetic_dir}),
                   workers=workers)
    assert got["val_samples"] == in_training["val_samples"]
    assert (got["top1"], got["top5"]) == (in_training["top1"], in_training["top5"])
    assert got["val_loss"] == pytest.approx(in_training["val_loss"], rel=1e-5)


def test_predict_names_the_top_classes_of_images_of_any_size(run, tmp_path, capsys):
    cfg, _, _ = run
    export(cfg.run_dir, tmp_path / "m.safetensors")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (90, 130, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(rng.integers(0, 255, (300, 200, 3), dtype=np.uint8)).save(tmp_path / "b.jpg")
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    out = predict(tmp_path / "m.safetensors", [tmp_path / "a.png", tmp_path / "b.jpg", tmp_path / "bad.jpg"])
    assert [len(r.get("top", [])) for r in out] == [5, 5, 0]
    assert abs(sum(t["probability"] for t in out[0]["top"])) <= 1.0 + 1e-6
    assert out[0]["top"][0]["class"] and "bad.jpg" in out[2]["error"]
    assert main(["predict", "--checkpoint", str(tmp_path / "m.safetensors"), str(tmp_path / "a.png"), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed[0]["top"] == out[0]["top"]
    assert main(["predict", "--checkpoint", str(tmp_path / "m.safetensors"), str(tmp_path / "bad.jpg")]) == 1
    assert "cannot read" in capsys.readouterr().err


def test_bad_checkpoints_are_named_and_nothing_is_overwritten(run, tmp_path, capsys):
    cfg, _, _ = run
    good = find_checkpoint(cfg.run_dir)
    broken = tmp_path / "step00000004"
    shutil.copytree(good, broken)
    (broken / "COMPLETE.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete checkpoint .COMPLETE.json missing"):
        find_checkpoint(broken)
    truncated = tmp_path / "t" / "step00000004"
    shutil.copytree(good, truncated)
    part = truncated / "towers.1.fc7.safetensors"
    part.write_bytes(part.read_bytes()[:100])
    out = tmp_path / "keep.safetensors"
    out.write_bytes(b"precious")
    assert main(["export", str(truncated), str(out)]) == 2
    assert "towers.1.fc7.safetensors: cannot be read" in capsys.readouterr().err
    assert out.read_bytes() == b"precious"
    wrong = load_config("test", overrides={"model.num_classes": "12", "data.synthetic_classes": "12"})
    with pytest.raises(CheckpointError, match="another network .model.num_classes: file 10, this run 12"):
        check_model_compatible(json.loads((good / "COMPLETE.json").read_text())["model"], wrong.model.__dict__, good)


@pytest.mark.parametrize("layout", [(1, 1, 1, 2)], ids=str)
def test_a_checkpoint_resumes_on_another_layout_with_one_processs_next_losses(run, tmp_path, layout):
    """The (2,2,1) checkpoint at step 4, resumed on the real shard stream (same D) by another layout,
    continues with the losses one process gets straight through, dropout on."""
    from alexnet_pp.trainer import train_single
    from cluster.spawn import run_local

    cfg, _, _ = run
    pp, tp, dp, m = layout
    shutil.copytree(cfg.run_dir / "checkpoints", tmp_path / "ckpt")
    overrides = {"parallel.pp": str(pp), "parallel.tp": str(tp), "parallel.dp": str(dp),
                 "parallel.micro_batches": str(m), "train.max_steps": "6", "data.synthetic_dir": cfg.data.synthetic_dir,
                 "checkpoint.dir": str(tmp_path / "ckpt"), "out_dir": str(tmp_path / "runs"),
                 "parallel.partition": "flops", "train.schedule": "constant"}
    resumed = run_local(load_config("test", overrides=overrides))
    assert resumed[0].resumed_from == 4 and resumed[0].resumed_layout == (2, 2, 1)
    single = load_config("test", overrides={"train.max_steps": "6", "data.synthetic_dir": cfg.data.synthetic_dir,
                                            "train.schedule": "constant",
                                            "out_dir": str(tmp_path / "single")})
    straight = train_single(single, save=False).losses
    torch.testing.assert_close(torch.tensor(resumed[0].losses), torch.tensor(straight[4:]), rtol=1e-4, atol=0)
