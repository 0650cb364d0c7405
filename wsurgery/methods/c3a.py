"""C3A (``peft_type: C3A``): circular convolution adaptation, a block-circulant ΔW on ``nn.Linear``.

``c3a_kernel (out/b, in/b, b)`` (stored in float32) holds one length-``b`` kernel per ``b x b`` block;
block ``(m, n)`` is the circulant ``C[s, t] = w_mn[(t - s) mod b]``, and

    ΔW = blocks / in_features

(PEFT divides by the *input* dimension, ``weight.size(-1)``). PEFT builds the blocks with FFTs
(``get_circulant_fast``: ``fft(ifft(I) · fft(w)).real`` on an ``in x in`` identity); we run the same
FFTs one ``b x b`` block at a time (``ifft`` of a zero block is zero, so only ``ifft(I_b)`` matters),
in row chunks, without the dense identity. Additive: unmerge subtracts the same ΔW exactly.
``b`` is read from the kernel's shape, so ``block_size_pattern`` needs no evaluation.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import InputError
from .base import AdditivePatch, Method, ModuleParams, Patch, Shapes, Support, Tensors, like, register
from .layers import Layer

# Output-block rows handled per FFT call: bounds the complex scratch to about this many x in x b x 8 bytes.
_ROWS_PER_CHUNK_ELEMS = 1 << 24


def circulant_blocks(kernel: torch.Tensor) -> torch.Tensor:
    """The dense ``(out, in)`` block-circulant matrix of ``kernel (m, n, b)``, computed as PEFT does (FFT, float32)."""
    m, n, b = kernel.shape
    w = kernel.to(torch.float32)
    x = torch.fft.ifft(torch.eye(b, dtype=torch.float32))  # row t: ifft of the unit vector e_t
    out = torch.empty(m * b, n * b, dtype=torch.float32)
    step = max(1, _ROWS_PER_CHUNK_ELEMS // max(1, n * b * b))
    for lo in range(0, m, step):
        hi = min(m, lo + step)
        fw = torch.fft.fft(w[lo:hi])  # (mc, n, b)
        y = x[None, None, :, :] * fw[:, :, None, :]  # (mc, n, t, k)
        z = torch.fft.fft(y).real  # (mc, n, t, s): entry (row s of output block, column t of input block)
        out[lo * b:hi * b].view(hi - lo, b, n, b).copy_(z.permute(0, 3, 1, 2))
    return out


class C3aPatch(AdditivePatch):
    def __init__(self, module: str, kernel: torch.Tensor):
        super().__init__(module, ("weight",))
        self.kernel = kernel
        self.m, self.n, self.b = kernel.shape

    def check(self, shapes: Shapes) -> None:
        w = shapes["weight"]
        want = (self.m * self.b, self.n * self.b)
        if len(w) != 2:
            raise InputError(f"{self.module}: c3a_kernel {list(self.kernel.shape)} applies to nn.Linear weights "
                             f"(out, in), but the base weight is {list(w)}; C3A has no Conv or Embedding layers")
        if tuple(w) != want:
            raise InputError(f"{self.module}: c3a_kernel is {list(self.kernel.shape)} (block size {self.b}), which "
                             f"needs a base weight of {list(want)}, but it is {list(w)}; was the adapter trained on "
                             "another model?")

    def delta(self) -> Tensors:
        d = circulant_blocks(self.kernel)
        return {"weight": d.div_(self.n * self.b)}  # / in_features, as PEFT does

    def forward(self, x: torch.Tensor, base: Tensors, layer: Layer) -> torch.Tensor:
        """PEFT's ``C3ALinear.forward`` (``BlockCircularConvolution``): each input block of x is convolved
        circularly with its kernels in the Fourier domain, ``fft(Σ_n ifft(x_n) · fft(w_mn)).real``, and the
        sum over input blocks is divided by in_features; on activations, no matrix is built."""
        kernel = like(self.kernel, x)
        blocks = torch.fft.ifft(x.reshape(x.shape[0], self.n, self.b))
        mixed = torch.einsum("tnb,mnb->tmb", blocks, torch.fft.fft(kernel))
        return layer(x, base) + torch.fft.fft(mixed).real.reshape(x.shape[0], -1) / x.shape[-1]

    def describe(self) -> dict[str, Any]:
        return {"kind": "linear", "block_size": self.b, "blocks": [self.m, self.n],
                "divided_by": self.n * self.b}


@register
class C3a(Method):
    peft_types = ("C3A",)
    param_names = frozenset({"c3a_kernel"})
    support = (Support("C3A (block-circulant, any block_size / block_size_pattern)", "Linear",
                       "exact (PEFT's FFT, block by block)", "exact", "0.21.2"),)

    def summary(self, config) -> dict[str, Any]:
        return {"block_size": config.get("block_size", 256), "block_size_pattern": config.get("block_size_pattern"),
                "rule": "ΔW = block-circulant(c3a_kernel) / in_features"}

    def patch(self, params: ModuleParams) -> Patch:
        (kernel,) = params.require("c3a_kernel")
        if kernel.ndim != 3 or 0 in kernel.shape:
            raise InputError(f"{params.config.path.parent}: module {params.module!r}: c3a_kernel has shape "
                             f"{list(kernel.shape)}; expected (out/b, in/b, b)")
        if not kernel.is_floating_point():
            raise InputError(f"{params.config.path.parent}: module {params.module!r}: c3a_kernel is {kernel.dtype}, "
                             "expected a float tensor")
        return C3aPatch(params.module, kernel)
