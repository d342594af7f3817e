"""A stage's gradients in one flat buffer, averaged over the D replicas where they lie.

DeepSpeed's pipeline engine reduces float32 gradients (`allreduce_gradients`, no ZeRO) by
flattening them into a freshly allocated buffer, all-reducing that, scaling it by 1/D and copying
every slice back; it does all of it at D = 1 too, over a group of one. On a 2-core CPU machine that
costs the demo network 45 ms a step at D = 2, where the all-reduce alone takes 25-30 ms, and 10 ms
a step at D = 1, where nothing needs doing.

`FlatReplicaGrads.adopt(engine, dp_group)` keeps every trainable parameter's `.grad` as a view into
one buffer that lives as long as the engine, so the accumulation of the micro-batches' gradients
writes into it directly and the reduce is that one buffer's all-reduce and scaling, in place:

- the buffer holds the gradients in the parameters' own layout (a channels-last weight's gradient
  is channels-last), in DeepSpeed's order (`module.parameters()`, trainable and non-empty);
- DeepSpeed's step ends by dropping the gradients (`engine.zero_grad`: `.grad = None`); here it
  zeroes the buffer instead and the views stay;
- a gradient that is not its view at reduce time (a pass that dropped them, as the stage cut's
  timing passes do, or one that was assigned anew) is copied in and the view put back; a missing
  one is zero, as DeepSpeed makes it;
- the arithmetic is DeepSpeed's: the sum over replicas, then × 1/D (its post-scaling with the
  default pre-divide factor 1), so D = 2 gives the same bits, larger D the same up to the order in
  which the collective adds.

Only for float32 without ZeRO (`applies`): DeepSpeed's bf16, fp16 and ZeRO optimizers keep
gradients of their own.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist


def _dense(t: torch.Tensor) -> bool:
    """Whether `t`'s elements fill its storage span without gaps or overlap (standard or channels-last)."""
    return t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))


class FlatReplicaGrads:
    def __init__(self, params: list[torch.nn.Parameter], group: Optional[Any], replicas: int):
        self.params, self.group, self.replicas = params, group, replicas
        dtypes = {p.dtype for p in params}
        if len(dtypes) > 1 or not all(_dense(p) for p in params):
            raise ValueError(f"one flat gradient buffer needs dense parameters of one dtype, got {sorted(map(str, dtypes))}")
        total = sum(p.numel() for p in params)
        self.flat = torch.zeros(total, dtype=params[0].dtype if params else torch.float32,
                                device=params[0].device if params else "cpu")
        self.views: list[torch.Tensor] = []
        offset = 0
        for p in params:
            self.views.append(self.flat.as_strided(p.shape, p.stride(), offset))
            offset += p.numel()
        self.attach()

    @staticmethod
    def applies(engine: Any) -> bool:
        """float32 training without ZeRO: the path on which DeepSpeed's engine flattens and copies."""
        return not (engine.bfloat16_enabled() or engine.fp16_enabled() or engine.zero_optimization())

    @classmethod
    def adopt(cls, engine: Any, group: Optional[Any], replicas: int) -> "FlatReplicaGrads":
        """Give `engine` (a PipelineEngine on the float32 path) this reduce and this zero_grad."""
        if not cls.applies(engine):
            raise ValueError("a flat gradient buffer replaces DeepSpeed's float32 reduce only (no bf16, fp16 or ZeRO)")
        params = [p for p in engine.module.parameters() if p.requires_grad and p.numel() > 0]
        grads = cls(params, group, replicas)
        engine.allreduce_gradients = grads.reduce  # instance attributes: DeepSpeed's class stays as it is
        engine.zero_grad = grads.zero
        return grads

    def attach(self) -> None:
        """Every parameter's gradient is its view again (the buffer's content is kept)."""
        for p, v in zip(self.params, self.views):
            p.grad = v

    def zero(self) -> None:
        """The step's end: zero gradients, kept in the buffer (DeepSpeed would drop them)."""
        self.flat.zero_()
        self.attach()

    def gather(self) -> None:
        """Gradients that are not their views go into the buffer; a missing one is zero."""
        for p, v in zip(self.params, self.views):
            g = p.grad
            if g is None:
                v.zero_()
            elif g.data_ptr() != v.data_ptr() or g.stride() != v.stride():
                v.copy_(g)
            else:
                continue
            p.grad = v

    def reduce(self, bucket_size: Any = None) -> None:  # DeepSpeed's allreduce_gradients(bucket_size=...)
        self.gather()
        if self.replicas > 1 and self.flat.numel():
            dist.all_reduce(self.flat, group=self.group)
            self.flat.mul_(1.0 / self.replicas)
