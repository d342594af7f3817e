"""`alexnet-pp bench NAME`: the project's benchmarks, one command and one output format.

    alexnet-pp bench lrn          our LRN vs torch.nn.LocalResponseNorm (forward + backward)
    alexnet-pp bench data         the shard stream vs torchvision ImageFolder; tar readers
    alexnet-pp bench engine       engine vs plain trainer, bubble vs theory, 2-stage speedup, 1F1B vs ZB-H1
    alexnet-pp bench scaling      layouts (P, T, D, M) over 1…N workers vs baselines and prediction
    alexnet-pp bench checkpoint   distributed checkpoint write / read vs torch.save / torch.load
    alexnet-pp bench gpu          the training step on one CUDA device
    alexnet-pp bench augment      a one-CPU training worker fed by augmentation actors on a CPU-only node

Each writes NAME.json, NAME.csv and NAME.md under `--out` (report.py); `scaling` (scaling.py, with
baselines.py, synthetic.py and plots.py) adds PNG plots, `engine --figure` the schedules' timelines
(timelines.py).
One module per benchmark, each with `main(argv) -> int`; `benchmarks/` keeps thin wrappers for
`python -m benchmarks.X`. Importing this package stays light (the data benchmark's baseline runs
it in a venv with another torch).
"""

# name → (module, one line of help). `data` and `checkpoint` live in benchmarks/ for now: `data` runs
# its torchvision baseline in another venv, which imports that module by path.
BENCHMARKS = {
    "lrn": ("cluster.bench.lrn", "our LRN vs torch.nn.LocalResponseNorm, forward + backward"),
    "data": ("benchmarks.data_bench", "every data pipeline side by side vs torchvision ImageFolder, readers, formats"),
    "engine": ("cluster.bench.engine", "engine vs plain trainer, bubble vs theory, 2-stage speedup, 1F1B vs ZB-H1"),
    "scaling": ("cluster.bench.scaling", "layouts (P, T, D, M) over workers vs baselines and the cost model"),
    "checkpoint": ("benchmarks.checkpoint_bench", "distributed checkpoint write / read vs torch.save / torch.load"),
    "gpu": ("cluster.bench.gpu", "the training step on one CUDA device (plain, fused LRN, engine)"),
    "augment": ("cluster.bench.augment", "a one-CPU training worker fed by 0, 1, 2, … augmentation actors"),
}
