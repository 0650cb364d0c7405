"""LoHa (``peft_type: LOHA``), the LyCORIS Hadamard product of two low-rank matrices, on Linear,
Conv1d and Conv2d.

ΔW = (w1a·w1b) ⊙ (w2a·w2b) · α/r, reshaped to W's shape: for a convolution without
``use_effective_conv2d`` the factors span the flattened ``(out, in·k…)`` shape. With it (the CP /
Tucker form, ``hada_t1``/``hada_t2 (r, r, k1, k2)``, Conv1d uses ``(r, r, k, 1)``) each factor is
``einsum("ijkl,jr,ip->prkl", t, w_b, w_a)`` with ``w_a (r, out)``, ``w_b (r, in)``.

The scaling is α/r with r and α from ``rank_pattern``/``alpha_pattern`` or ``r``/``alpha``; PEFT
builds the tensors from that r, so the rank in the shapes must agree with it. The change does not
depend on W: unmerging subtracts it exactly. ``rank_dropout``/``module_dropout`` act only in training.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

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
from .layers import Layer

if TYPE_CHECKING:  # adapters import methods; the config is only needed for type hints here
    from ..adapters.config import AdapterConfig

_FLAT = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
_CP = ("hada_t1", "hada_t2")


def config_rank_alpha(config: AdapterConfig, module: str) -> tuple[int, float]:
    """PEFT's LyCORIS rule: ``rank_pattern``/``alpha_pattern`` first, else ``r``/``alpha`` (default 8)."""
    r = config.pattern("rank_pattern", module)
    a = config.pattern("alpha_pattern", module)
    return int(r if r is not None else config.get("r", 8)), float(a if a is not None else config.get("alpha", 8))


def scaling_f32(alpha: float, r: int) -> torch.Tensor:
    """α/r as PEFT uses it in LoHa: ``torch.tensor(alpha / r)``, a float32 scalar."""
    return torch.tensor(alpha / r, dtype=torch.float32)


def _shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)


def apply_kernel(x: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """``x`` through ``K`` as its layer would: ``x·Kᵀ`` for a (out, in) matrix, else a convolution."""
    if K.dim() == 2:
        return x @ K.T
    return {3: F.conv1d, 4: F.conv2d}[K.dim()](x, K)


def mix_channels(M: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """A (out, c) matrix applied to the channel axis (dim 1) of ``z``: a 1x1 convolution, or ``z·Mᵀ``."""
    return torch.einsum("oc,nc...->no...", M, z)


def pairwise(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(r, …), (r, …) -> (r², …): every product u_i ⊙ v_j, row i·r + j."""
    return (u[:, None] * v[None, :]).flatten(0, 1)


class LohaPatch(AdditivePatch):
    def __init__(self, module: str, source: str, tensors: dict[str, torch.Tensor], rank: int, alpha: float,
                 effective_conv: bool):
        super().__init__(module, ("weight",))
        self.source = source  # the adapter folder, for messages
        self.t = tensors
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        self.cp = "hada_t1" in tensors
        self.effective_conv = effective_conv  # the config flag
        self._weight_shape: tuple[int, ...] | None = None

    def _fail(self, what: str) -> InputError:
        shapes = ", ".join(f"{n} {_shape(v)}" for n, v in self.t.items())
        return InputError(f"{self.source}: module {self.module!r}: {what} (LoHa tensors: {shapes})")

    def check(self, shapes: Shapes) -> None:
        w = tuple(shapes["weight"])
        r, t = self.rank, self.t
        if len(w) not in (2, 3, 4):
            raise self._fail(f"base weight is {list(w)}; PEFT's LoHa only adapts Linear, Conv1d and Conv2d")
        kernel = w[2:]
        if self.cp:
            if len(w) == 2:
                raise self._fail(f"the CP form (hada_t1/hada_t2) is for convolutions but the base weight is {list(w)}")
            k4 = (*kernel, 1) if len(w) == 3 else kernel
            want = {"hada_t1": (r, r, *k4), "hada_t2": (r, r, *k4), "hada_w1_a": (r, w[0]), "hada_w1_b": (r, w[1]),
                    "hada_w2_a": (r, w[0]), "hada_w2_b": (r, w[1])}
        else:
            flat_in = math.prod(w[1:])
            want = {"hada_w1_a": (w[0], r), "hada_w1_b": (r, flat_in), "hada_w2_a": (w[0], r),
                    "hada_w2_b": (r, flat_in)}
        bad = [f"{n} {_shape(t[n])} (expected {list(s)})" for n, s in want.items() if tuple(t[n].shape) != s]
        if bad:
            raise InputError(f"{self.source}: module {self.module!r}: LoHa tensors do not fit the base weight "
                             f"{list(w)}: {'; '.join(bad)}; was the adapter trained on another model?")
        if kernel:
            peft_cp = self.effective_conv and math.prod(kernel) != 1  # PEFT 0.21.2's choice for this layer
            if self.cp and math.prod(kernel) == 1:
                self.notes.append(f"CP form (hada_t1/hada_t2) on a {'x'.join(map(str, kernel))} kernel, as older "
                                  "PEFT releases saved it; PEFT 0.21.2 uses the flat form there and would not "
                                  "load this file. Merged with the CP formula")
            elif self.cp != peft_cp:
                raise InputError(
                    f"{self.source}: module {self.module!r}: the adapter saved the "
                    f"{'CP' if self.cp else 'flat'} form but its config has use_effective_conv2d="
                    f"{self.effective_conv}, with which PEFT builds the {'CP' if peft_cp else 'flat'} form for a "
                    f"{list(w)} weight; the adapter file and its config disagree")
        self._weight_shape = w

    def delta(self) -> Tensors:
        assert self._weight_shape is not None  # derived from the shapes by bind()
        t = {n: v.to(torch.float32) for n, v in self.t.items()}
        s = scaling_f32(self.alpha, self.rank)
        # The same operations, in the same order, as PEFT's HadaWeight / HadaWeightCP forward.
        if self.cp:
            w1 = torch.einsum("i j k l, j r, i p -> p r k l", t["hada_t1"], t["hada_w1_b"], t["hada_w1_a"])
            w2 = torch.einsum("i j k l, j r, i p -> p r k l", t["hada_t2"], t["hada_w2_b"], t["hada_w2_a"])
            d = w1 * w2 * s
        else:
            d = ((t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])) * s
        return {"weight": d.reshape(self._weight_shape)}

    def forward(self, x: torch.Tensor, base: Tensors, layer: Layer) -> torch.Tensor:
        """PEFT's LoHa forward is ``base(x) + F.linear/conv(x, ΔW)`` with ΔW = (W1 ⊙ W2)·α/r; here on activations,
        through the face-splitting identity (a⊗b-rank-one terms of a Hadamard product of low-rank factors):
        ``(w1a·w1b) ⊙ (w2a·w2b) = Σ_ij (w1a_i ⊙ w2a_j)(w1b_i ⊙ w2b_j)ᵀ``, i.e. the input through the r² kernels
        w1b_i ⊙ w2b_j, then the output channels mixed by w1a_i ⊙ w2a_j. The CP form adds its core between them:
        r² x r² kernels t1_ij ⊙ t2_i'j' (per kernel position)."""
        t = {n: like(v, x) for n, v in self.t.items()}
        W = base["weight"]
        if self.cp:  # w_a (r, out), w_b (r, in), t (r, r, k, k'); Conv1d: (r, r, k, 1)
            z = mix_channels(pairwise(t["hada_w1_b"], t["hada_w2_b"]), x)
            core = (t["hada_t1"][:, None, :, None] * t["hada_t2"][None, :, None, :]).flatten(0, 1).flatten(1, 2)
            z = apply_kernel(z, core.reshape(*core.shape[:2], *W.shape[2:]))
            out = pairwise(t["hada_w1_a"], t["hada_w2_a"]).T
        else:  # w_a (out, r), w_b (r, in·k…)
            kernels = pairwise(t["hada_w1_b"], t["hada_w2_b"])
            z = apply_kernel(x, kernels.reshape(kernels.shape[0], *W.shape[1:]))
            out = pairwise(t["hada_w1_a"].T, t["hada_w2_a"].T).T
        return layer(x, base) + mix_channels(out, z) * self.scaling

    def describe(self) -> dict[str, Any]:
        # Called before check() too (inspect without a base): only what the tensors themselves tell.
        form = "cp" if self.cp else "flat"
        return {"kind": f"loha/{form}", "form": form, "rank": self.rank, "alpha": self.alpha,
                "scaling": self.scaling}


@register
class Loha(Method):
    peft_types = ("LOHA",)
    param_names = frozenset({*_FLAT, *_CP})
    support = (Support("LoHa", "Linear, Conv1d/2d (flat and CP)", "exact", "exact", "0.21.2"),)

    def summary(self, config: AdapterConfig) -> dict[str, Any]:
        return {"scaling_rule": "alpha/r", "use_effective_conv2d": bool(config.get("use_effective_conv2d", False))}

    def patch(self, params: ModuleParams) -> Patch:
        config, t = params.config, params.tensors
        source = str(config.path.parent)
        names = (*_FLAT, *_CP) if ("hada_t1" in t or "hada_t2" in t) else _FLAT
        tensors = dict(zip(names, params.require(*names)))
        cp = "hada_t1" in tensors
        # Rank as the shapes give it (flat: w_a (out, r); CP: w_a (r, out)), the same for every factor.
        ranks = {tensors[n].shape[0 if cp or n.endswith("_b") else -1] if tensors[n].ndim >= 1 else -1
                 for n in names}
        if any(v.ndim != (4 if n in _CP else 2) for n, v in tensors.items()) or len(ranks) != 1:
            shapes = ", ".join(f"{n} {_shape(v)}" for n, v in tensors.items())
            raise InputError(f"{source}: module {params.module!r}: LoHa tensors disagree on the rank or have the "
                             f"wrong number of dimensions ({shapes}); the adapter file is inconsistent")
        rank = ranks.pop()
        if rank <= 0:
            raise InputError(f"{source}: module {params.module!r}: LoHa tensors have rank {rank}; PEFT requires r > 0")
        if cp and (tensors["hada_t1"].shape[1] != rank or tensors["hada_t2"].shape[1] != rank):
            raise InputError(f"{source}: module {params.module!r}: hada_t1 {_shape(tensors['hada_t1'])} / hada_t2 "
                             f"{_shape(tensors['hada_t2'])} are not (r, r, k, k) with r={rank}")
        r_cfg, alpha = config_rank_alpha(config, params.module)
        if rank != r_cfg:
            raise InputError(f"{source}: module {params.module!r}: the LoHa tensors have rank {rank} but the config "
                             f"gives r={r_cfg} (r/rank_pattern); PEFT builds the layer from the config and would "
                             "refuse these tensors")
        return LohaPatch(params.module, source, tensors, rank, alpha, bool(config.get("use_effective_conv2d", False)))
