import pytest

from alexnet_pp.config import ModelConfig
from alexnet_pp.pipeline import unit_names
from alexnet_pp.planning.profile import DeviceProfile, Link, UnitTimes

TINY = ModelConfig(width=0.25, image_size=64, num_classes=10, init="kaiming")  # the `test` preset's network
FREE = Link(bandwidth=1e30, latency=0.0)


def toy_profile(f=1e-3, b=1e-3, w=1e-3, optimizer=0.0, p2p=FREE, allreduce=FREE, memory=None, model=TINY):
    """Every unit costs f, b, w seconds per image (exactly proportional to the micro-batch)."""
    units = [UnitTimes(n, [f, 2 * f], [b, 2 * b], [w, 2 * w]) for n in unit_names(1)]
    return DeviceProfile(name="toy", device="toy", micro_batches=[1, 2], units=units,
                         optimizer_seconds_per_param=optimizer, p2p=p2p, allreduce=allreduce, memory_bytes=memory,
                         model={"width": model.width, "image_size": model.image_size, "num_classes": model.num_classes},
                         assumptions=["toy costs"])


@pytest.fixture
def tiny():
    return TINY


@pytest.fixture
def make_profile():
    return toy_profile
