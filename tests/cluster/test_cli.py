import pytest

from cluster.cli import main, parse, resolve


def test_info_describes_the_paper_network_without_a_dataset(capsys):
    """The paper preset needs ImageNet shards to train, not to describe its network and plan."""
    assert main(["info", "--preset", "paper", "--pp", "2"]) == 0
    out = capsys.readouterr().out
    assert "60,965,224" in out and "724,406,816" in out
    assert "conv3.0, conv3.1" in out and "split a tower half by output channels" in out
    # the counted plan balances inside tower 0's half of conv3: 82 of its 192 kernels on stage 0
    assert "stage 0: conv1,conv2,conv3.0[:82] " in out and "stage 1: conv3.0[82:],conv3.1,conv4," in out


def test_train_still_refuses_the_paper_preset_on_the_embedded_dataset(capsys):
    assert main(["train", "--preset", "paper"]) == 2
    assert "data.synthetic_classes=10" in capsys.readouterr().err


def test_config_prints_the_resolved_yaml(capsys):
    assert main(["config", "--preset", "test", "--train.lr", "0.02", "--name", "exp7"]) == 0
    out = capsys.readouterr().out
    assert "lr: 0.02" in out and "name: exp7" in out


def test_a_bad_layout_is_a_configuration_error_before_anything_starts(capsys):
    assert main(["train", "--preset", "test", "--pp", "2", "--tp", "2", "--workers", "6"]) == 2
    assert "not a multiple of pp × tp = 4" in capsys.readouterr().err


# Every flag of the run commands, each with a value that changes the resolved config or layout.
EVERY_FLAG = [
    ["--preset", "test"],
    ["--preset", "test", "--pp", "2"],
    ["--preset", "test", "--tp", "2"],
    ["--preset", "test", "--dp", "2"],
    ["--preset", "test", "--pp", "2", "--workers", "4"],
    ["--preset", "test", "--config", "{yaml}"],
    ["--preset", "test", "--name", "exp1", "--out-dir", "/tmp/elsewhere"],
    ["--preset", "test", "--out_dir=/tmp/x", "--train.lr", "0.05", "--parallel.micro_batches", "4"],
    ["--preset", "demo", "--model.dropout", "0.3", "--data.workers", "0", "--checkpoint.every_steps", "5"],
    ["--preset", "test", "--address", "ray://127.0.0.1:10001", "--distributed"],
]


@pytest.mark.parametrize("argv", EVERY_FLAG, ids=lambda a: " ".join(a))
def test_the_job_entrypoint_resolves_every_flag_as_alexnet_pp_train_does(argv, tmp_path, monkeypatch):
    """`python -m cluster.job ARGS` is `alexnet-pp train --distributed ARGS`: one parser, one config."""
    yaml_path = tmp_path / "run.yaml"
    yaml_path.write_text("train:\n  epochs: 2\n")
    argv = [a.replace("{yaml}", str(yaml_path)) for a in argv]
    seen = []
    monkeypatch.setattr("cluster.cli.cmd_train", lambda args, extra: seen.append(resolve(args, extra)) or 0)
    import cluster.job

    assert cluster.job.main(argv) == 0
    _, args, extra = parse(["train", *argv])
    direct = resolve(args, extra)
    assert seen == [direct]
    assert args.address == (argv[argv.index("--address") + 1] if "--address" in argv else None)


def test_plan_ranks_layouts_for_a_worker_count_from_a_named_profile(capsys):
    assert main(["plan", "--workers", "8", "--batch", "256", "--preset", "paper", "--device-profile", "h100-ib",
                 "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "img/s (pred)" in out and "PREDICTED" in out and "InfiniBand" in out
    assert out.count(" yes") == 3  # the three best layouts, each fitting the GPU
