"""Decode throughput of one GPTQ 4-bit g128 tensor and one AWQ GEMM 4-bit g128 tensor (in 4096, out
11008: Llama-7B's up_proj) : wsurgery's ``Gptq.decode`` / ``Awq.decode`` vs the references,
same packed tensors in memory; median of 5 runs each, outputs checked bit-identical.

References: GPT-QModel's ``TorchLinear.dequantize_weight`` (eval path, v1 zeros converted beforehand
as on load) and AutoAWQ's ``dequantize_gemm`` (run from its installed ``awq/utils/packing_utils.py``).
They return the (in, out) weight; ours is the (out, in) logical tensor, contiguous, so ours includes
a transpose the references do not do (the "+T" column adds it to theirs).

    python scripts/bench_decode_gptq_awq.py
"""

from __future__ import annotations

import importlib.util
import statistics
import time
from pathlib import Path

import torch

import wsurgery.checkpoint  # noqa: F401  (imports the readers before the encodings package)
from wsurgery.checkpoint.safetensors_file import TensorInfo
from wsurgery.quant.encodings import EncodedTensorInfo
from wsurgery.quant.encodings.awq import Awq
from wsurgery.quant.encodings.gptq import Gptq

N_IN, N_OUT, GROUP = 4096, 11008, 128


def _median(fn, runs: int = 5) -> tuple[float, torch.Tensor]:
    times, out = [], None
    for _ in range(runs):
        out = None
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _words(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-2 ** 31, 2 ** 31, shape, dtype=torch.int64, generator=g).to(torch.int32)


def _scales(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(N_IN // GROUP, N_OUT, generator=g) * 0.02 + 0.001).half()


def _info(tensors: dict[str, torch.Tensor], encoding) -> tuple[EncodedTensorInfo, callable]:
    parts = {k: TensorInfo(k, t.dtype, tuple(t.shape), Path("memory"), 0) for k, t in tensors.items()}
    info = EncodedTensorInfo("w", torch.float16, (N_OUT, N_IN), parts, encoding)

    def read(part: TensorInfo, span=None) -> torch.Tensor:
        t = tensors[part.name]
        return t if span is None else t[span[0]:span[1]]

    return info, read


def _report(label: str, ours_s: float, theirs_s: float, theirs_t_s: float, same: bool) -> None:
    n = N_IN * N_OUT / 1e9
    print(f"{label} {N_IN}x{N_OUT} g{GROUP}: wsurgery {ours_s * 1e3:.1f} ms ({n / ours_s:.2f} G elem/s), "
          f"reference {theirs_s * 1e3:.1f} ms, +T {theirs_t_s * 1e3:.1f} ms; ratio reference/wsurgery "
          f"{theirs_s / ours_s:.2f}x (+T {theirs_t_s / ours_s:.2f}x), bit-identical: {same}")


def bench_gptq() -> None:
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear
    from gptqmodel.utils.model import convert_gptq_v1_to_v2_format_module

    tensors = {"qweight": _words(N_IN // 8, N_OUT, seed=0), "qzeros": _words(N_IN // GROUP, N_OUT // 8, seed=1),
               "scales": _scales(2), "g_idx": (torch.arange(N_IN) // GROUP).int()}
    info, read = _info(tensors, Gptq(4, GROUP, v1_zeros=True, act_order=False))
    m = TorchLinear(bits=4, group_size=GROUP, sym=False, desc_act=False, in_features=N_IN, out_features=N_OUT,
                    bias=False)
    m.load_state_dict(tensors, strict=False)
    convert_gptq_v1_to_v2_format_module(m, 4, torch.int32)
    m.eval()
    ours_s, ours = _median(lambda: info.encoding.decode(info, read))
    del ours
    theirs_s, theirs = _median(m.dequantize_weight)
    del theirs
    theirs_t_s, theirs = _median(lambda: m.dequantize_weight().T.contiguous())
    ours = info.encoding.decode(info, read)
    _report("GPTQ int4", ours_s, theirs_s, theirs_t_s, torch.equal(ours.view(torch.int16), theirs.view(torch.int16)))


def bench_awq() -> None:
    spec = importlib.util.find_spec("awq")
    path = Path(next(iter(spec.submodule_search_locations))) / "utils" / "packing_utils.py"
    module_spec = importlib.util.spec_from_file_location("autoawq_packing_utils", path)
    packing = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(packing)

    tensors = {"qweight": _words(N_IN, N_OUT // 8, seed=3), "qzeros": _words(N_IN // GROUP, N_OUT // 8, seed=4),
               "scales": _scales(5)}
    info, read = _info(tensors, Awq(GROUP))

    def theirs_fn() -> torch.Tensor:
        return packing.dequantize_gemm(tensors["qweight"], tensors["qzeros"], tensors["scales"], 4, GROUP)

    ours_s, ours = _median(lambda: info.encoding.decode(info, read))
    del ours
    theirs_s, theirs = _median(theirs_fn)
    del theirs
    theirs_t_s, theirs = _median(lambda: theirs_fn().T.contiguous())
    ours = info.encoding.decode(info, read)
    _report("AWQ int4 (AutoAWQ)", ours_s, theirs_s, theirs_t_s,
            torch.equal(ours.view(torch.int16), theirs.view(torch.int16)))


def main() -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    bench_gptq()
    bench_awq()


if __name__ == "__main__":
    main()
