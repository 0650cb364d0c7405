"""The compiled CPU kernel for 4-bit dequantization, where the install could build it.

``_bnb4bit_native`` (C, AVX-512 or AVX2, one pass per element: see its source for why) is an
optional extension: on other CPUs, or where no compiler was at hand, :func:`dequantize_full_blocks`
returns False and bnb4bit's torch code does the same work. Both give bitsandbytes' exact values.

The kernel releases the GIL, so the work is split by whole blocks across ``torch.get_num_threads()``
Python threads: one call per thread, no per-chunk overhead.
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType

import torch

_bnb4bit_native: ModuleType | None
try:
    from . import _bnb4bit_native
except ImportError:  # not built: no compiler at install, or a platform without a wheel
    _bnb4bit_native = None

# Below this many elements per thread, splitting costs more than it saves.
MIN_ELEMENTS_PER_THREAD = 1 << 20
_OUT_TYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


@functools.cache
def supported_isas() -> tuple[str, ...]:
    """The kernel's instruction sets this CPU runs, best first; empty if the extension is not built."""
    return tuple(_bnb4bit_native.supported_isas()) if _bnb4bit_native is not None else ()


@functools.cache
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(workers, thread_name_prefix="wsurgery-dequantize")


def dequantize_full_blocks(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                           out: torch.Tensor, isa: str | None = None) -> bool:
    """Fill ``out`` (whole blocks) with ``code[nibble] * absmax[block]``; False where the kernel cannot run.

    ``packed``: uint8, two codes per byte, first in the high nibble; ``absmax``: float32, one per
    block; ``code``: the 16 float32 values. ``isa`` forces an instruction set (tests run each one).
    """
    isas, native = supported_isas(), _bnb4bit_native
    if (native is None or not isas or out.device.type != "cpu" or out.dtype not in _OUT_TYPES or not out.is_contiguous()
            or blocksize % 32 or (isa is not None and isa not in isas)):
        return False
    packed, absmax, code = packed.contiguous(), absmax.float().contiguous(), code.float().contiguous()
    n_blocks = out.numel() // blocksize
    workers = max(1, min(torch.get_num_threads(), out.numel() // MIN_ELEMENTS_PER_THREAD))
    bounds = [n_blocks * i // workers * blocksize for i in range(workers + 1)]
    item = out.element_size()

    def run(part: int) -> None:
        start, stop = bounds[part], bounds[part + 1]
        native.dequantize(packed.data_ptr() + start // 2, absmax.data_ptr() + start // blocksize * 4,
                          code.data_ptr(), stop - start, blocksize, _OUT_TYPES[out.dtype],
                          out.data_ptr() + start * item, isa or isas[0])

    if workers == 1:
        run(0)
    else:
        list(_pool(workers).map(run, range(workers)))
    return True
