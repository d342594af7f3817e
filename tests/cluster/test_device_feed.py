import pytest
import torch

from cluster.device_feed import prefetch_to_device


def _batches(n):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(n)]


def test_off_cuda_the_batches_pass_through_untouched():
    batches = _batches(3)
    out = list(prefetch_to_device(iter(batches), "cpu"))
    assert len(out) == 3 and all(a is x and b is y for (a, b), (x, y) in zip(out, batches))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_on_cuda_every_batch_arrives_in_order_and_intact():
    batches = _batches(5)
    seen = []
    for x, y in prefetch_to_device(iter(batches), "cuda"):
        assert x.is_cuda and y.is_cuda
        seen.append((x * 2).sum().item())  # used on the main stream while the next copy runs
        del x, y
    assert seen == pytest.approx([(x * 2).sum().item() for x, _ in batches], rel=1e-5)
