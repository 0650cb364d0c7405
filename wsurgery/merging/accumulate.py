"""``torch.stack(xs).sum(0)``, bit for bit, without the stack where torch's summation order is known.

mergekit sums the models' changes with one ``sum(dim=0)`` over a stacked tensor. torch's CPU kernel adds
16-bit rows one after the other into float32, and float32/float64 rows one after the other up to four
rows (beyond, it interleaves four partial sums in a way that depends on the vector unit): there a running
sum gives the same bits in constant memory; otherwise the rows are kept and summed as mergekit does.
"""

from __future__ import annotations

import torch

_WIDENED = (torch.bfloat16, torch.float16)
_RUNNING_MAX_ROWS = 4


class StackedSum:
    def __init__(self, rows: int, dtype: torch.dtype):
        self.dtype = dtype
        self.running = dtype in _WIDENED or rows <= _RUNNING_MAX_ROWS
        self._acc: torch.Tensor | None = None
        self._rows: list[torch.Tensor] = []

    def add(self, x: torch.Tensor) -> None:
        x = x.to(self.dtype)
        if not self.running:
            self._rows.append(x)
        elif self._acc is None:
            self._acc = x.to(torch.float32) if self.dtype in _WIDENED else x.clone()
        else:
            self._acc += x

    def result(self) -> torch.Tensor:
        if not self.running:
            return torch.stack(self._rows).sum(dim=0)
        assert self._acc is not None, "nothing was added"
        return self._acc.to(self.dtype)
