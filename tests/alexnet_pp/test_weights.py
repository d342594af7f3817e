"""Weights on disk: parts keyed by layer names, one-file exports, and clear errors for bad files."""

import pytest
import torch

from alexnet_pp.config import ModelConfig
from alexnet_pp.model import AlexNet
from alexnet_pp.weights import CheckpointError, export_file, read_parts, write_part

SMALL = ModelConfig(width=0.25, image_size=64, num_classes=10)


def test_parts_round_trip_with_momentum(tmp_path):
    model = AlexNet(SMALL, seed=1)
    w, b = model.towers[1].fc6.weight, model.towers[1].fc6.bias
    write_part(tmp_path, "towers.1.fc6", {"weight": w, "bias": b, "momentum.weight": w * 2})
    got = read_parts(tmp_path, ["towers.1.fc6.weight", "towers.1.fc6.bias"], momentum=True)
    assert torch.equal(got["towers.1.fc6.weight"], w) and torch.equal(got["momentum.towers.1.fc6.weight"], w * 2)
    assert "momentum.towers.1.fc6.bias" not in got
    assert not list(tmp_path.glob(".*tmp"))  # written beside and renamed


def test_pieces_written_by_one_cut_are_read_by_any_other(tmp_path):
    """Rows 0:20 and 20:48 of tower 0's conv3, each with its momentum, as two stages write them: read
    whole, as other pieces (across the seam), and mixed with whole parts; the rows must add up."""
    model = AlexNet(SMALL, seed=2)
    w, b = model.towers[0].conv3.weight, model.towers[0].conv3.bias
    for lo, hi in ((0, 20), (20, 48)):
        write_part(tmp_path, f"towers.0.conv3[{lo}:{hi}]", {"weight": w[lo:hi], "bias": b[lo:hi],
                                                              "momentum.weight": -w[lo:hi], "momentum.bias": -b[lo:hi]})
    write_part(tmp_path, "fc8", {"weight": model.fc8.weight, "bias": model.fc8.bias})
    got = read_parts(tmp_path, ["towers.0.conv3.weight", "towers.0.conv3[10:40].bias", "fc8.bias"], momentum=True)
    assert torch.equal(got["towers.0.conv3.weight"], w) and torch.equal(got["momentum.towers.0.conv3.weight"], -w)
    assert torch.equal(got["towers.0.conv3[10:40].bias"], b[10:40])
    assert torch.equal(got["momentum.towers.0.conv3[10:40].bias"], -b[10:40])
    assert torch.equal(got["fc8.bias"], model.fc8.bias)
    (tmp_path / "towers.0.conv3[0:20].safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"towers.0.conv3.weight: its pieces hold rows 20:48"):
        read_parts(tmp_path, ["towers.0.conv3[20:48].weight"], momentum=False)
    with pytest.raises(CheckpointError, match=r"towers.0.conv3.safetensors: missing"):
        read_parts(tmp_path / "nowhere", ["towers.0.conv3.weight"], momentum=False)


def test_a_missing_or_truncated_part_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="towers.0.conv1.safetensors: missing"):
        read_parts(tmp_path, ["towers.0.conv1.weight"], momentum=False)
    model = AlexNet(SMALL)
    write_part(tmp_path, "fc8", {"weight": model.fc8.weight, "bias": model.fc8.bias})
    path = tmp_path / "fc8.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="fc8.safetensors: cannot be read .*truncated or corrupt"):
        read_parts(tmp_path, ["fc8.weight"], momentum=False)


def test_an_exported_model_loads_as_the_network_that_was_saved(tmp_path):
    model = AlexNet(SMALL, seed=4).eval()
    export_file(tmp_path / "m.safetensors", model.state_dict(), SMALL.__dict__, [f"c{i}" for i in range(10)])
    again = AlexNet.from_pretrained(tmp_path / "m.safetensors")
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(again(x), model(x)) and again.classes[3] == "c3" and not again.training


def test_bad_model_files_are_refused_with_what_differs(tmp_path):
    model = AlexNet(SMALL)
    other = ModelConfig(width=0.25, image_size=64, num_classes=12)
    export_file(tmp_path / "wrong.safetensors", model.state_dict(), other.__dict__)  # tensors for 10 classes
    with pytest.raises(CheckpointError, match="fc8.weight is .* another model.width, model.num_classes"):
        AlexNet.from_pretrained(tmp_path / "wrong.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="junk.safetensors: cannot be read"):
        AlexNet.from_pretrained(tmp_path / "junk.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(CheckpointError, match="not an alexnet-pp model"):
        AlexNet.from_pretrained(tmp_path / "plain.safetensors")
