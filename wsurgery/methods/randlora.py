"""RandLoRA (``peft_type: RANDLORA``): a full-rank sum of scaled random bases, on Linear and Conv1D.

Per layer ``randlora_lambda (r, nb)`` and ``randlora_gamma (nb, lo)`` with ``lo = min(in, out)``,
``hi = max(in, out)`` and ``nb = ⌈lo / r⌉``; shared ``A (r, 1, min_max)`` and ``B (max_max, nb_max, r)``
where ``min_max``/``max_max`` are the min/max of (largest out, largest in) over all targeted layers.
PEFT 0.21 saves them as ``base_model.randlora_A``/``_B`` *and* as identical copies under every module;
with ``save_projection=false`` they are regenerated from ``projection_prng_key`` as PEFT does:

* default: ``kaiming_uniform_(a=√5)`` with a seeded CPU generator, in **bfloat16** (PEFT uses bfloat16
  when ``accelerate.is_bf16_available()``: on CPU and bf16-capable GPUs; float16 otherwise, which we do
  not reproduce), A ``(r, 1, min_max)`` first, then ``nb_max`` blocks ``(max_max, 1, r)`` concatenated
  along dim 1, each of A and B then divided by its own std (in bfloat16);
* ``sparse`` / ``very_sparse``: ``torch.rand`` A then B in float32, thresholded to {-1, 0, 1} with
  sparsity 3 / √min_max, each divided by its own std.

The change, for a layer:
``Â = (λ[:, :, None] ⊙ A[:, :nb, :lo] ⊙ γ[None]).flatten(0, 1)`` (r·nb, lo), row k·nb+b;
``B̂ = B[:hi, :nb, :].flatten(1)`` (hi, nb·r), column b·r+k — the two flatten orders differ, as in PEFT;
``M = B̂ Â`` (hi, lo) and ``ΔW = Tf(M if lo == in else Mᵀ) · randlora_alpha / r``.
Additive and independent of W: exact unmerge.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from ..errors import InputError
from .base import (
    AdditivePatch,
    Method,
    ModuleParams,
    Patch,
    Shapes,
    Support,
    Tensors,
    like,
    register,
)
from .layers import Layer, Linear
from .vera import Generate, SharedProjections, as_peft_buffer, linear_dims, shared_pair

if TYPE_CHECKING:  # adapters import methods; the config is only needed for type hints here
    from ..adapters.config import AdapterConfig

#: The dtype PEFT draws the dense bases in where bf16 is available (CPU, bf16-capable GPUs).
REGENERATION_DTYPE = torch.bfloat16


def num_bases(min_dim: int, r: int) -> int:
    """PEFT's ``ceil(min_dim / r)``, computed the way it does (float division, ``is_integer``)."""
    n = min_dim / r
    return int(n) if n.is_integer() else int(n) + 1


def randlora_generator(r: int, key: int, sparse: bool, very_sparse: bool,
                       dtype: torch.dtype = REGENERATION_DTYPE) -> Generate:
    def generate(max_out: int, max_in: int) -> tuple[torch.Tensor, torch.Tensor]:
        max_dim, min_dim = max(max_out, max_in), min(max_out, max_in)
        g = torch.Generator(device="cpu").manual_seed(key)
        nb = num_bases(min_dim, r)
        if very_sparse or sparse:
            sparsity = math.sqrt(min_dim) if very_sparse else 3
            A = torch.rand((r, 1, min_dim), generator=g)
            B = torch.rand((max_dim, nb, r), generator=g)
            A_sparse, B_sparse = torch.zeros(A.shape), torch.zeros(B.shape)
            B_sparse[B < 1 / (2 * sparsity)] = -1
            B_sparse[B > 1 - 1 / (2 * sparsity)] = 1
            A_sparse[A < 1 / (2 * sparsity)] = -1
            A_sparse[A > 1 - 1 / (2 * sparsity)] = 1
            return A_sparse / A_sparse.std(), B_sparse / B_sparse.std()
        with torch.no_grad():
            A = torch.nn.init.kaiming_uniform_(torch.empty((r, 1, min_dim), dtype=dtype), a=math.sqrt(5),
                                               generator=g)
            B = torch.cat([torch.nn.init.kaiming_uniform_(torch.empty((max_dim, 1, r), dtype=dtype),
                                                          a=math.sqrt(5), generator=g) for _ in range(nb)], dim=1)
        return A / A.std(), B / B.std()
    return generate


class RandLoraPatch(AdditivePatch):
    def __init__(self, module: str, lam: torch.Tensor, gamma: torch.Tensor, rank: int, scaling: float,
                 fan_in_fan_out: bool, projections: SharedProjections):
        super().__init__(module, ("weight",))
        self.lam, self.gamma, self.rank, self.scaling = lam, gamma, rank, scaling
        self.fan_in_fan_out, self.projections = fan_in_fan_out, projections
        self.nb, self.lo = gamma.shape
        self.dims: tuple[int, int] | None = None

    def check(self, shapes: Shapes) -> None:
        w = shapes["weight"]
        out_f, in_f = linear_dims(self.module, "RandLoRA", w, self.fan_in_fan_out)
        lo, hi = min(out_f, in_f), max(out_f, in_f)
        nb = num_bases(lo, self.rank)
        if (self.nb, self.lo) != (nb, lo):
            raise InputError(f"{self.module}: randlora_gamma is {[self.nb, self.lo]} but the base weight {list(w)} "
                             f"with r={self.rank} needs {[nb, lo]}; was the adapter trained on another model?")
        self.dims = (out_f, in_f)
        self.projections.record(self.module, out_f, in_f)
        if self.projections.saved is not None:
            A, B = self.projections.saved
            if A.shape[2] < lo or B.shape[0] < hi or B.shape[1] < nb:
                raise InputError(f"{self.module}: the shared bases randlora_A {list(A.shape)} / randlora_B "
                                 f"{list(B.shape)} are too small for the base weight {list(w)} (needs {lo} in A's "
                                 f"last dim, {hi} rows and {nb} bases in B)")

    def delta(self) -> Tensors:
        if self.dims is None:
            raise InputError(f"{self.module}: RandLoRA needs the base shape (check) before its change")
        out_f, in_f = self.dims
        lo, hi, nb = min(out_f, in_f), max(out_f, in_f), self.nb
        A, B = self.projections.get()
        if self.projections.ignored_note is not None:
            self.notes.append(self.projections.ignored_note)
            self.projections.ignored_note = None  # told once per adapter
        sliced_A, sliced_B = as_peft_buffer(self, self.projections, A[:, :nb, :lo], B[:hi, :nb, :])
        lam = self.lam.to(torch.float32)
        gamma = self.gamma.to(torch.float32)
        update_A = (lam[:, :, None] * sliced_A * gamma[None]).flatten(end_dim=1)  # (r·nb, lo), row k·nb+b
        update_B = sliced_B.flatten(start_dim=1)  # (hi, nb·r), column b·r+k
        m = update_B @ update_A  # (hi, lo)
        d = m if lo == in_f else m.T  # (out, in)
        if self.fan_in_fan_out:
            d = d.T
        return {"weight": d.mul_(self.scaling) if d.is_contiguous() else d * self.scaling}

    def layer(self, shapes: Shapes) -> Layer:
        return Linear(self.fan_in_fan_out)

    def forward(self, x: torch.Tensor, base: Tensors, layer: Layer) -> torch.Tensor:
        """PEFT's RandLoRA forward: ``Â = (λ ⊙ A[:, :nb, :lo] ⊙ γ)`` flattened to (r·nb, lo), ``B̂ = B[:hi, :nb]``
        flattened to (hi, nb·r) (``get_scaled_bases``); Â acts on the smaller side: ``x·Âᵀ·B̂ᵀ`` when in = lo, else
        ``x·B̂·Â``; times randlora_alpha/r. Bases from the shared saved-or-regenerated state, as PEFT holds them."""
        assert self.dims is not None  # set by check()
        out_f, in_f = self.dims
        lo, hi, nb = min(out_f, in_f), max(out_f, in_f), self.nb
        A, B = self.projections.get()
        A, B = (like(t, x) for t in as_peft_buffer(self, self.projections, A[:, :nb, :lo], B[:hi, :nb, :]))
        basis_A = (like(self.lam, x)[:, :, None] * A * like(self.gamma, x)[None]).flatten(0, 1)
        basis_B = B.flatten(1)
        adapter = (x @ basis_A.T) @ basis_B.T if lo == in_f else (x @ basis_B) @ basis_A
        return layer(x, base) + adapter * self.scaling

    def describe(self) -> dict[str, Any]:
        return {"kind": "conv1d_transposed" if self.fan_in_fan_out else "linear", "rank": self.rank,
                "num_bases": self.nb, "scaling": self.scaling,
                "projections": "regenerated from projection_prng_key" if self.projections.regenerated else "saved"}


@register
class RandLora(Method):
    peft_types = ("RANDLORA",)
    # randlora_A/_B: PEFT 0.21 also writes the shared bases under every module (identical copies).
    param_names = frozenset({"randlora_lambda", "randlora_gamma", "randlora_A", "randlora_B"})
    shared_names = frozenset({"randlora_A", "randlora_B"})
    support = (Support("RandLoRA (dense, sparse, very_sparse; saved or PRNG-regenerated bases)",
                       "Linear, Conv1D (fan_in_fan_out)",
                       "exact",
                       "exact",
                       "0.21.2 (regenerated dense bases: bf16 draw, as PEFT on CPU/bf16 GPUs)"),)

    def summary(self, config: AdapterConfig) -> dict[str, Any]:
        r = int(config.get("r", 32))
        variant = "very_sparse" if config.get("very_sparse", False) else "sparse" if config.get("sparse", False) \
            else "dense"
        return {"r": r, "randlora_alpha": config.get("randlora_alpha", 640),
                "scaling": float(config.get("randlora_alpha", 640)) / r, "bases": variant,
                "save_projection": bool(config.get("save_projection", True)),
                **({} if config.get("save_projection", True) else {"regeneration": (
                    "float32 torch.rand" if variant != "dense" else
                    "bfloat16 kaiming_uniform_ (as PEFT on CPU / bf16 GPUs; PEFT on fp16-only GPUs draws float16)")}),
                "projection_prng_key": config.get("projection_prng_key", 0),
                "fan_in_fan_out": bool(config.get("fan_in_fan_out", False))}

    def patch(self, params: ModuleParams) -> Patch:
        config = params.config
        folder = config.path.parent
        lam, gamma = params.require("randlora_lambda", "randlora_gamma")
        r = int(config.get("r", 32))
        if lam.ndim != 2 or gamma.ndim != 2 or lam.shape != (r, gamma.shape[0]):
            raise InputError(f"{folder}: module {params.module!r}: randlora_lambda {list(lam.shape)} and "
                             f"randlora_gamma {list(gamma.shape)} do not fit r={r} from adapter_config.json "
                             "(expected (r, nb) and (nb, min(in, out)))")
        generate = randlora_generator(r, int(config.get("projection_prng_key", 0)),
                                      bool(config.get("sparse", False)), bool(config.get("very_sparse", False)))
        state = shared_pair(params, ("randlora_A", "randlora_B"), "RandLoRA randlora_A/randlora_B",
                            bool(config.get("save_projection", True)), generate, per_layer=True)
        pair = state.saved or state.ignored
        if pair is not None:
            A, B = pair
            if A.ndim != 3 or B.ndim != 3 or A.shape[0] != r or B.shape[2] != r:
                raise InputError(f"{folder}: randlora_A {list(A.shape)} / randlora_B {list(B.shape)} do not fit "
                                 f"r={r} (expected (r, 1, min_dim) and (max_dim, num_bases, r))")
        scaling = float(config.get("randlora_alpha", 640)) / r
        return RandLoraPatch(params.module, lam, gamma, r, scaling, bool(config.get("fan_in_fan_out", False)), state)
