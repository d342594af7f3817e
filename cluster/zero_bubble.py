"""ZB-H1, the zero-bubble schedule of Qi et al. 2024 (arXiv:2401.10241), on DeepSpeed's pipeline engine.

1F1B's backward pass is two kinds of work: B, the gradient of the stage's input, which the stage
before it waits for, and W, the gradients of the weights, which nothing waits for until the optimizer
step. ZB-H1 runs B where 1F1B runs the backward pass and moves W later: stage s runs its first s
steady-state steps without W, so the deferred W passes fill the idle slots of the cool-down. Each
stage keeps 1F1B's order of F and B and holds at most P micro-batches' state, the peak of 1F1B's
first stage. The operation order is the planner's, `alexnet_pp.planning.simulate.zb_h1_order`, so
what `alexnet-pp plan` predicts for zb-h1 is what runs.

Built from DeepSpeed's own mechanism, subclassed rather than copied:

- `ZeroBubbleH1Schedule` is a `PipeSchedule` yielding DeepSpeed's instructions (LoadMicroBatch,
  Recv/SendActivation, ForwardPass, Recv/SendGrad, BackwardPass, ReduceTiedGrads, ReduceGrads,
  OptimizerStep) plus two of its own: `BackwardWeightPass(buffer_id)`, the W of the micro-batch in a
  buffer, and `WaitSends`, after the last W and before gradients are reduced.
- `ZeroBubbleEngine` is a `PipelineEngine` whose `_train_schedule` is that schedule and whose
  instruction map runs the two new instructions. `ZeroBubbleEngine.adopt(engine, deferred)` turns
  the engine `deepspeed.initialize` returned into one (DeepSpeed picks the engine class itself).
- The first stage never delays a W (`zb_h1_order` gives it BW, B and W as one): it runs DeepSpeed's
  whole backward pass, as 1F1B does, and keeps nothing for later, so its peak memory, the largest of
  1F1B's stages, stays 1F1B's. The other stages defer (`defers_weight_grads`).
- B is DeepSpeed's own backward pass over layers whose weight gradients are deferred
  (alexnet_pp/deferred_grads.py, every convolution and linear map): it computes input gradients
  only and keeps each layer's input and output gradient under the micro-batch's buffer; W turns
  them into the weight and bias gradients, in micro-batch order, as 1F1B accumulates them. With
  towers (T = 2) the cross-tower all-gather's backward (the sum over towers) runs in B; W is local.
  With replicas (D > 1) every W runs before ReduceGrads averages the gradients.
- Sends are asynchronous during training (`isend`, completed by `WaitSends`): with DeepSpeed's
  blocking sends a stage that finished its B would wait for the stage before it to reach the
  matching receive, and the W work meant for the bubble would queue behind that wait. Receives stay
  DeepSpeed's: a stage that needs an input waits for it either way. Evaluation runs DeepSpeed's
  inference schedule and its blocking sends unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from deepspeed.runtime.pipe import schedule as ds
from deepspeed.runtime.pipe.engine import PipelineEngine

from alexnet_pp.deferred_grads import DeferredGrads
from alexnet_pp.planning.simulate import zb_h1_order


class BackwardWeightPass(ds.BufferOpInstruction):
    """W: the weight gradients of the micro-batch in a buffer, from what its BackwardPass kept."""


class WaitSends(ds.PipeInstruction):
    """Complete the step's asynchronous sends (before gradients are reduced)."""


def live_buffers(order: list[tuple[str, int]]) -> int:
    """Most micro-batches a stage holds at once in `order`: from its F until its W (or BW)."""
    held = peak = 0
    for kind, _ in order:
        held += 1 if kind == "F" else -1 if kind in ("W", "BW") else 0
        peak = max(peak, held)
    return peak


def defers_weight_grads(stages: int, micro_batches: int, stage: int) -> bool:
    """Whether a stage runs W passes apart from their B, and so keeps layer inputs and output
    gradients for them; a stage that never delays a W (the first) runs whole backward passes."""
    return any(kind == "W" for kind, _ in zb_h1_order(stages, micro_batches, stage))


class ZeroBubbleH1Schedule(ds.PipeSchedule):
    """One stage's ZB-H1 step as DeepSpeed instructions: one list per F, B or W, in
    `zb_h1_order`, each with the loads and transfers it needs, then the optimizer step."""

    def __init__(self, micro_batches: int, stages: int, stage_id: int):
        super().__init__(micro_batches, stages, stage_id)
        self.order = zb_h1_order(stages, micro_batches, stage_id)
        self.defers = defers_weight_grads(stages, micro_batches, stage_id)
        # a micro-batch keeps its buffer from its F to its W; the live ones are consecutive
        # micro-batches, so buffers cycle without two live micro-batches sharing one
        self._buffers = max(2, live_buffers(self.order))

    def num_pipe_buffers(self) -> int:
        return self._buffers

    def steps(self):
        first, last = self.is_first_stage, self.is_last_stage
        for kind, micro_batch in self.order:
            buf = self._buffer_idx(micro_batch)
            cmds: list[ds.PipeInstruction] = []
            if kind == "F":
                if not first:
                    cmds.append(ds.RecvActivation(buf))
                if first or last:  # DeepSpeed's loads: images on the first stage, labels on the last
                    cmds.append(ds.LoadMicroBatch(buf))
                cmds.append(ds.ForwardPass(buf))
                if not last:
                    cmds.append(ds.SendActivation(buf))
            elif kind in ("B", "BW"):
                if not last:
                    cmds.append(ds.RecvGrad(buf))
                cmds.append(ds.BackwardPass(buf))
                if not first:
                    cmds.append(ds.SendGrad(buf))
                if kind == "BW" and self.defers:  # the backward kept W's rows: W at once
                    cmds.append(BackwardWeightPass(buf))
            else:
                cmds.append(BackwardWeightPass(buf))
            yield cmds
        yield [WaitSends(), ds.ReduceTiedGrads(), ds.ReduceGrads(), ds.OptimizerStep()]


def theoretical_bubble(schedule: str, stages: int, micro_batches: int) -> float:
    """Idle share of a stage's schedule with equal stages: 1F1B's (P − 1)/(M + P − 1); ZB-H1's with
    F = B = W, as in the paper, (P − 1)/(3M + P − 1): a cool-down slot of F + B − W = 1 where 1F1B
    idles F + B + W = 3."""
    if schedule == "zb-h1":
        return (stages - 1) / (3 * micro_batches + stages - 1)
    return (stages - 1) / (micro_batches + stages - 1)


class ZeroBubbleEngine(PipelineEngine):
    """DeepSpeed's PipelineEngine running ZB-H1 in `train_batch` (module docstring)."""

    _zb_deferred: DeferredGrads
    _zb_sends: list[tuple[torch.Tensor, Any]]
    _zb_training: bool

    @classmethod
    def adopt(cls, engine: PipelineEngine, deferred: DeferredGrads) -> "ZeroBubbleEngine":
        """Make the PipelineEngine `deepspeed.initialize` built run ZB-H1. `deferred`: the stage's
        layers with their weight gradients deferred (DeferredGrads(..., convolutions=True))."""
        if type(engine) is not PipelineEngine:
            raise TypeError(f"zb-h1 runs on DeepSpeed's PipelineEngine, not {type(engine).__name__}")
        if engine.is_pipe_partitioned or engine.is_grad_partitioned or engine.has_bool_tensors:
            raise ValueError("zb-h1 sends whole activations: pipe_partitioned and grad_partitioned must be off")
        engine.__class__ = cls
        engine._zb_deferred = deferred
        engine._zb_sends = []
        engine._zb_training = False
        return engine  # type: ignore[return-value]

    def _exec_schedule(self, pipe_schedule):
        # asynchronous sends for ZB-H1 (also inside cluster/stage_cut.py's WithoutOptimizerStep); eval's
        # InferenceSchedule keeps DeepSpeed's blocking ones
        inner = getattr(pipe_schedule, "schedule", pipe_schedule)
        self._zb_training = isinstance(inner, ZeroBubbleH1Schedule)
        try:
            super()._exec_schedule(pipe_schedule)
        finally:
            self._zb_training = False

    def _train_schedule(self):
        return ZeroBubbleH1Schedule(micro_batches=self.micro_batches, stages=self.num_stages, stage_id=self.stage_id)

    # --- compute: B and W ------------------------------------------------------------------------

    def _exec_backward_pass(self, buffer_id):
        if buffer_id in self._zb_deferred.pending():
            raise RuntimeError(f"zb-h1: buffer {buffer_id} runs a backward pass before its last W pass")
        with self._zb_deferred.recording(buffer_id):
            super()._exec_backward_pass(buffer_id)

    def _exec_backward_weight_pass(self, buffer_id):
        self._zb_deferred.flush(buffer_id)

    # --- transfers --------------------------------------------------------------------------------

    def _exec_recv_grads(self, buffer_id):
        # A fresh gradient buffer per micro-batch: DeepSpeed reuses one, and a W pass may still
        # read output gradients of an earlier micro-batch that are views of it.
        self.grad_layer = None
        self._grad_layer_buf = []
        super()._exec_recv_grads(buffer_id)

    def _isend(self, tensors, stage: int) -> None:
        peer = self.grid.stage_to_global(stage)
        for t in tensors:
            t = t if t.is_contiguous() else t.contiguous()
            self._zb_sends.append((t, dist.isend(t, peer)))  # the tensor lives until WaitSends

    def _exec_send_activations(self, buffer_id):
        if not self._zb_training:
            return super()._exec_send_activations(buffer_id)
        outputs = self.pipe_buffers["outputs"][buffer_id]
        if self.first_output_send:  # shapes once, blocking, as DeepSpeed does; the receiver waits for them
            self.first_output_send = False
            self._send_tensor_meta(outputs, self.next_stage)
        self._isend([outputs] if torch.is_tensor(outputs) else outputs, self.next_stage)

    def _exec_send_grads(self, buffer_id):
        if not self._zb_training:
            return super()._exec_send_grads(buffer_id)
        inputs = self.pipe_buffers["inputs"][buffer_id]
        grads = [inputs.grad] if torch.is_tensor(inputs) else [t.grad for t in inputs if t.is_floating_point()]
        if any(g is None for g in grads):
            raise RuntimeError("zb-h1: a received activation has no gradient after the backward pass")
        self._isend(grads, self.prev_stage)
        self.pipe_buffers["inputs"][buffer_id] = None

    def _exec_wait_sends(self):
        sends, self._zb_sends = self._zb_sends, []
        for _, work in sends:
            work.wait()

    _INSTRUCTION_MAP = {
        **PipelineEngine._INSTRUCTION_MAP,
        ds.BackwardPass: _exec_backward_pass,
        ds.SendActivation: _exec_send_activations,
        ds.SendGrad: _exec_send_grads,
        ds.RecvGrad: _exec_recv_grads,
        BackwardWeightPass: _exec_backward_weight_pass,
        WaitSends: _exec_wait_sends,
    }
