"""What the data package ships: no test-only modules."""

import importlib.util

import pytest


@pytest.mark.parametrize("name", ["testing", "alignment"])
def test_test_helpers_are_not_in_the_package(name):
    assert importlib.util.find_spec(f"alexnet_pp.data.{name}") is None
