"""alexnet-pp: the original two-tower AlexNet, trained pipeline-parallel on Ray + DeepSpeed.

Read `alexnet_pp/config.py` first: one `RunConfig` describes a run.
"""

__version__ = "0.1.0"
