from alexnet_pp.cli import main


def test_info_describes_the_paper_network_without_a_dataset(capsys):
    """The paper preset needs ImageNet shards to train, not to describe its network and plan."""
    assert main(["info", "--preset", "paper", "--pp", "2"]) == 0
    out = capsys.readouterr().out
    assert "60,965,224" in out and "724,406,816" in out
    assert "conv3.0, conv3.1" in out and "stage 0: conv1,conv2 " in out and "stage 1: conv3,conv4" in out


def test_train_still_refuses_the_paper_preset_on_the_embedded_dataset(capsys):
    assert main(["train", "--preset", "paper"]) == 2
    assert "data.synthetic_classes=10" in capsys.readouterr().err


def test_config_prints_the_resolved_yaml(capsys):
    assert main(["config", "--preset", "test", "--train.lr", "0.02"]) == 0
    assert "lr: 0.02" in capsys.readouterr().out
