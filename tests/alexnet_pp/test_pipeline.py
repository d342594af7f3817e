from alexnet_pp.config import ModelConfig
from alexnet_pp.model import AlexNet, layer_macs, layer_parameter_counts
from alexnet_pp.pipeline import describe, layer_costs, layer_param_counts, partition

PAPER = ModelConfig()


def stage_share(weights, part, stage):
    return sum(weights[i] for i in part.stage_layers(stage)) / sum(weights)


def test_param_counts_match_the_model():
    small = ModelConfig(width=0.25, image_size=64, num_classes=10)
    assert layer_param_counts(small) == list(layer_parameter_counts(AlexNet(small)).values())
    assert sum(layer_param_counts(PAPER)) == 60_965_224


def test_parameters_method_is_the_trap_flops_is_balanced():
    macs = list(layer_macs(PAPER).values())
    by_params = partition(PAPER, 2, "parameters")
    by_flops = partition(PAPER, 2, "flops")
    # DeepSpeed's default leaves almost all the compute on stage 0 ...
    assert stage_share(macs, by_params, 0) > 0.9
    # ... the default keeps the two stages within a few percent of each other.
    costs = layer_costs(PAPER)
    assert abs(stage_share(costs, by_flops, 0) - 0.5) < 0.15
    assert max(stage_share(costs, by_flops, s) for s in range(2)) < stage_share(costs, by_params, 0)


def test_every_layer_in_exactly_one_stage():
    for p in range(1, 9):
        for method in ("flops", "uniform", "parameters"):
            part = partition(PAPER, p, method)
            layers = [i for s in range(p) for i in part.stage_layers(s)]
            assert layers == list(range(8))
            assert all(len(part.stage_layers(s)) >= 1 for s in range(p))


def test_explicit_cut_points_and_description():
    part = partition(PAPER, 3, "3,6")
    assert part.bounds == (0, 3, 6, 8)
    text = describe(PAPER, part)
    assert "stage 0: conv1,conv2,conv3" in text and "stage 2: fc7,fc8" in text and "parameters" in text


def test_measured_partition_balances_timed_layers():
    from alexnet_pp.pipeline import measure_layer_costs

    small = ModelConfig(width=0.25, image_size=64, num_classes=10)
    costs = measure_layer_costs(small, micro_batch=4, reps=1)
    assert len(costs) == 8 and all(c > 0 for c in costs)
    # a made-up timing where conv1 alone is half the work: the cut must follow the timings, not FLOPs
    skewed = [50.0, 10, 10, 10, 5, 5, 5, 5]
    assert partition(small, 2, "measured", skewed).bounds == (0, 1, 8)
    assert partition(small, 2, "flops").bounds != (0, 1, 8)
    assert "measured time  50.0%" in describe(small, partition(small, 2, "measured", skewed), skewed)
