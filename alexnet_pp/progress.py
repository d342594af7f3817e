"""Progress display: a live bar on a terminal, one log line every N steps otherwise (CI, `ray job` logs)."""

from __future__ import annotations

import sys
import time
from collections import deque
from typing import Optional, TextIO

from tqdm import tqdm


class Progress:
    """step / total, images/s, loss, ETA. images/s is over a sliding window of recent steps."""

    def __init__(self, total_steps: int, log_every: int = 10, stream: Optional[TextIO] = None, desc: str = "train"):
        self.total = total_steps
        self.log_every = max(1, log_every)
        self.stream = stream or sys.stderr
        self.interactive = bool(getattr(self.stream, "isatty", lambda: False)())
        self.bar = (
            tqdm(total=total_steps, desc=desc, file=self.stream, dynamic_ncols=True, unit="step")
            if self.interactive
            else None
        )
        self.window: deque[tuple[float, int]] = deque(maxlen=20)
        self._timed: deque[tuple[float, int]] = deque(maxlen=20)
        self.start = time.perf_counter()
        self.step = 0

    def _timed_rate(self) -> float:
        secs = sum(t for t, _ in self._timed)
        return sum(n for _, n in self._timed) / secs if secs > 0 else 0.0

    def images_per_sec(self) -> float:
        if len(self.window) < 2:
            return 0.0
        (t0, _), (t1, _) = self.window[0], self.window[-1]
        imgs = sum(n for _, n in list(self.window)[1:])
        return imgs / (t1 - t0) if t1 > t0 else 0.0

    def update(self, step: int, images: int, loss: float, lr: float, seconds: Optional[float] = None,
               **extra: float) -> None:
        """`seconds`: the step's own duration, when steps are reported in bursts (a tailed log) rather
        than as they happen; images/s then comes from the steps' times, not from arrival times."""
        now = time.perf_counter()
        if seconds is not None:
            self._timed.append((seconds, images))
        self.window.append((now, images))
        advanced, self.step = step - self.step, step
        ips = self.images_per_sec() if seconds is None else self._timed_rate()
        fields = {"loss": f"{loss:.4f}", "img/s": f"{ips:.1f}", "lr": f"{lr:.2g}"}
        fields.update({k: f"{v:.3f}" for k, v in extra.items()})
        if self.bar is not None:
            self.bar.update(advanced)
            self.bar.set_postfix(fields, refresh=False)
        elif step % self.log_every == 0 or step == self.total:
            elapsed = now - self.start
            eta = elapsed / step * (self.total - step) if step else 0.0
            text = " ".join(f"{k}={v}" for k, v in fields.items())
            print(f"step {step}/{self.total} {text} eta={eta:.0f}s", file=self.stream, flush=True)

    def message(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
