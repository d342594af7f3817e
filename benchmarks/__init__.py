"""Micro-benchmarks for alexnet-pp (run as ``python -m benchmarks.<name>``)."""
