"""Predicting a layout's throughput before running it: the prediction half of the scaling benchmark.

A run is P pipeline stages × T towers per stage × D data-parallel replicas, M micro-batches per
optimizer step. Given a device profile, the planner predicts every such layout of a worker count and
ranks them by images/s (`planner.rank_layouts`; `cli_plan.main_plan` is `alexnet-pp plan`).

The model, in the order a prediction is built:

1. Profile (profile.py). Each pipeline unit's forward (F), input-gradient (B) and weight-gradient
   (W) seconds, measured on the machine at two or more micro-batch sizes (the median of several
   runs; on a CPU whose cores the run's workers share, beside co-runners training the network) and
   fitted as a + b·n — a prediction outside the measured sizes is marked as extrapolated; the
   optimizer's seconds per parameter, and the engine's sweeps over the gradients around the
   all-reduce (zeroing and scaling the flat buffer; DeepSpeed's own flatten and copy back);
   α-β links (latency + bytes / bandwidth) for point-to-point and for collectives, measured
   between two processes on the run's backend (the median of several); the compute's jitter (the
   variance of a repetition's compute per second of it); device memory. For
   devices this machine lacks, `assumed_gpu_profile` builds one from public figures (NVLink 4,
   InfiniBand NDR) and the repository's one measured H100 step, and lists each figure it assumed.
2. Stage costs (costmodel.py). A stage's F, B, W are the sums over its units at the layout's
   micro-batch. T = 2: a tower rank does half of each layer's work and all of fc8, and the
   cross-tower layers (conv3, fc6, fc7, fc8) add an all-gather of their input forward and (not fc8,
   which both towers compute whole) an all-reduce of the input gradient backward, each also
   waiting for the slower tower: σ·E[max of 2 normals], σ = sqrt(jitter · the compute since the
   towers last met) (`sync_wait`). The stage cut is
   the one the engine would make (`measured`: balance each unit's F + B + W).
3. Transfers. After each cut the activations (and the int64 labels, a second message) go forward,
   their gradient back; bytes from the network's shapes (model.layer_output_shapes; after a tower
   half, the layer's input and that half's output).
4. Schedule (simulate.py). One step simulated event by event. `1f1b` is DeepSpeed's TrainSchedule
   with its blocking sends and receives where DeepSpeed issues them; `zb-h1` (Qi et al. 2024,
   arXiv:2401.10241) and `gpipe` assume transfers overlapped with compute.
5. Tail. Each stage then all-reduces its gradients over its D replicas (ring: 2(D − 1) steps of
   1/D of the bytes; not overlapped, as DeepSpeed's pipeline engine runs it, unless
   `overlap_allreduce`), after waiting for the slowest of the D (`sync_wait` over the stage's
   compute of the step), and steps the optimizer; the step ends with the slowest stage.
6. Memory per worker: float32 weights, gradients and momentum, plus the activations autograd keeps
   (measured per image on the network) for the most micro-batches the schedule holds in flight on
   that stage (1F1B: P − s on stage s; ZB-H1: up to P; GPipe: M) and the received input.

Not modelled: data loading (assumed never to stall), host-side launch overhead beyond the
profile's per-unit constant, contention between workers sharing a CPU's cores or memory bus beyond
what the co-runners of the calibration show (a stage that idles frees its core, which a calibration
beside busy co-runners does not see), and
link contention between concurrent transfers (each GPU is assumed to have its own NIC). Rank
placement follows DeepSpeed's topology (towers fastest, then replicas, then stages), so a node of
k workers holds consecutive ranks.
"""
