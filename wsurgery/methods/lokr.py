"""LoKr (``peft_type: LOKR``), the LyCORIS Kronecker product, on Linear, Conv1d and Conv2d.

ΔW = kron(w1, w2) · α/r, reshaped to W's shape, where
  * w1 = ``lokr_w1 (a, c)`` or ``lokr_w1_a (a, r) @ lokr_w1_b (r, c)``;
  * w2 = ``lokr_w2 (b, d[, k…])``, or ``lokr_w2_a (b, r) @ lokr_w2_b (r, d·k…)``, or in CP form
    ``einsum("ijkl,ip,jr->prkl", lokr_t2 (r, r, k1, k2), lokr_w2_a (r, b), lokr_w2_b (r, d))``;
  * a 4-D w2 makes w1 ``(a, c, 1, 1)``; otherwise ``torch.kron`` pads the smaller operand with
    leading dimensions (a full Conv1d w2 ``(b, d, k)`` thus gives a ``(b, a·d, c·k)`` block that is
    reshaped to ``(out, in, k)``, exactly as PEFT does).

The scaling is always α/r with r and α from ``rank_pattern``/``alpha_pattern`` or ``r``/``alpha``,
even when both factors are full matrices and no tensor shows r (upstream LyCORIS differs there).
Which tensors exist follows from r, ``decompose_both``, ``decompose_factor`` and
``use_effective_conv2d``; the saved tensors are checked against that layout, so a config that does
not match its tensors (and would make the scaling wrong) is refused. Additive: exact unmerge.
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
from .layers import Layer
from .loha import apply_kernel, config_rank_alpha

if TYPE_CHECKING:  # adapters import methods; the config is only needed for type hints here
    from ..adapters.config import AdapterConfig

_NAMES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """PEFT's (and LyCORIS') split of ``dimension`` into ``(m, n)``, m <= n, m·n = dimension:
    ``(factor, dimension/factor)`` when factor > 0 divides it, otherwise the divisor pair closest to
    √dimension whose first element does not exceed ``factor`` (any, for -1)."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    if m > n:
        n, m = m, n
    return m, n


def peft_layout(weight: tuple[int, ...], r: int, decompose_both: bool, factor: int,
                effective_conv: bool) -> dict[str, tuple[int, ...]]:
    """The tensors (name -> shape) PEFT 0.21.2 creates for a base weight of shape ``weight``."""
    out_dim, in_dim, kernel = weight[0], weight[1], tuple(weight[2:])
    a, b = factorization(out_dim, factor)
    c, d = factorization(in_dim, factor)
    use_w1 = not (decompose_both and r < max(a, c) / 2)
    use_w2 = not (r < max(b, d) / 2)
    effective = bool(kernel) and effective_conv and math.prod(kernel) != 1
    layout: dict[str, tuple[int, ...]] = {}
    if use_w1:
        layout["lokr_w1"] = (a, c)
    else:
        layout["lokr_w1_a"], layout["lokr_w1_b"] = (a, r), (r, c)
    if use_w2:
        layout["lokr_w2"] = (b, d, *kernel)
    elif effective:
        k4 = (*kernel, 1) if len(kernel) == 1 else kernel
        layout["lokr_t2"], layout["lokr_w2_a"], layout["lokr_w2_b"] = (r, r, *k4), (r, b), (r, d)
    else:
        layout["lokr_w2_a"], layout["lokr_w2_b"] = (b, r), (r, d * math.prod(kernel))
    return layout


def _fmt(layout: dict[str, tuple[int, ...]]) -> str:
    return ", ".join(f"{n} {list(s)}" for n, s in layout.items())


class LokrPatch(AdditivePatch):
    def __init__(self, module: str, source: str, tensors: dict[str, torch.Tensor], rank: int, alpha: float,
                 decompose_both: bool, factor: int, effective_conv: bool):
        super().__init__(module, ("weight",))
        self.source = source
        self.t = tensors
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        self.decompose_both, self.factor, self.effective_conv = decompose_both, factor, effective_conv
        self._weight_shape: tuple[int, ...] | None = None

    def check(self, shapes: Shapes) -> None:
        w = tuple(shapes["weight"])
        if len(w) not in (2, 3, 4):
            raise InputError(f"{self.source}: module {self.module!r}: base weight is {list(w)}; PEFT's LoKr only "
                             "adapts Linear, Conv1d and Conv2d")
        want = peft_layout(w, self.rank, self.decompose_both, self.factor, self.effective_conv)
        saved = {n: tuple(v.shape) for n, v in self.t.items()}
        if saved != want:
            raise InputError(
                f"{self.source}: module {self.module!r}: the saved LoKr tensors ({_fmt(saved)}) are not those PEFT "
                f"builds for a {list(w)} weight with r={self.rank}, decompose_both={self.decompose_both}, "
                f"decompose_factor={self.factor}, use_effective_conv2d={self.effective_conv} ({_fmt(want)}); "
                "was the adapter trained on another model, or does its config not match its tensors?")
        self._weight_shape = w

    def delta(self) -> Tensors:
        assert self._weight_shape is not None  # derived from the shapes by bind()
        t = {n: v.to(torch.float32) for n, v in self.t.items()}
        # The same operations, in the same order, as PEFT's LoKrLayer.get_delta_weight / make_kron.
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        if "lokr_w2" in t:
            w2 = t["lokr_w2"]
        elif "lokr_t2" in t:
            w2 = torch.einsum("i j k l, i p, j r -> p r k l", t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
        else:
            w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
        if w2.ndim == 4:
            w1 = w1.unsqueeze(2).unsqueeze(2)
        d = torch.kron(w1, w2.contiguous()) * self.scaling
        return {"weight": d.reshape(self._weight_shape)}

    def forward(self, x: torch.Tensor, base: Tensors, layer: Layer) -> torch.Tensor:
        """PEFT's LoKr forward is ``base(x) + F.linear/conv(x, kron(w1, w2)·α/r)``; here the Kronecker product acts
        on activations: the input channels split as (c, d), w1 (a, c) mixes the c axis, then w2 (b, d[, k…]) runs
        as a layer over the d axis, output channel i·b + j. A full Conv1d w2 (b, d, k) is the exception PEFT's
        ``torch.kron`` makes (w1 padded to (1, a, c)): there input channel l·c + k and output channel j·a + i."""
        t = {n: like(v, x) for n, v in self.t.items()}
        W = base["weight"]
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]  # (a, c)
        if "lokr_w2" in t:
            w2 = t["lokr_w2"]
        elif "lokr_t2" in t:  # Tucker: w2[p, q, k, l] = Σ_ij t2[i, j, k, l]·w2_a[i, p]·w2_b[j, q]
            w2 = torch.einsum("ijkl,ip,jq->pqkl", t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
        else:
            w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
        swapped = "lokr_w2" in t and w2.dim() == 3
        (a, c), b = w1.shape, w2.shape[0]
        w2 = w2.reshape(b, W.shape[1] // c, *W.shape[2:])  # (b, d, kernel…)
        n, d, space = x.shape[0], w2.shape[1], x.shape[2:]
        if swapped:
            z = torch.einsum("ik,nlk...->nil...", w1, x.reshape(n, d, c, *space))
        else:
            z = torch.einsum("ik,nkl...->nil...", w1, x.reshape(n, c, d, *space))
        y = apply_kernel(z.reshape(n * a, d, *space), w2)
        y = y.reshape(n, a, b, *y.shape[2:])
        if swapped:
            y = y.transpose(1, 2)
        return layer(x, base) + y.reshape(n, a * b, *y.shape[3:]) * self.scaling

    def describe(self) -> dict[str, Any]:
        w1 = "full" if "lokr_w1" in self.t else "decomposed"
        w2 = "full" if "lokr_w2" in self.t else ("cp" if "lokr_t2" in self.t else "decomposed")
        # Called before check() too (inspect without a base): only what the tensors and config tell.
        return {"kind": f"lokr/w1:{w1},w2:{w2}", "w1": w1, "w2": w2, "rank": self.rank, "alpha": self.alpha,
                "scaling": self.scaling}


@register
class Lokr(Method):
    peft_types = ("LOKR",)
    param_names = frozenset(_NAMES)
    support = (Support("LoKr (full/decomposed factors, CP)", "Linear, Conv1d/2d", "exact", "exact", "0.21.2"),)

    def summary(self, config: AdapterConfig) -> dict[str, Any]:
        return {"scaling_rule": "alpha/r (r from the config, also when both factors are full)",
                "decompose_both": bool(config.get("decompose_both", False)),
                "decompose_factor": int(config.get("decompose_factor", -1)),
                "use_effective_conv2d": bool(config.get("use_effective_conv2d", False))}

    def patch(self, params: ModuleParams) -> Patch:
        config, t = params.config, params.tensors
        source = str(config.path.parent)
        names = [n for n in _NAMES if n in t]
        tensors = dict(zip(names, params.require(*names)))
        shapes = ", ".join(f"{n} {list(v.shape)}" for n, v in tensors.items())

        def fail(what: str) -> InputError:
            return InputError(f"{source}: module {params.module!r}: {what} (LoKr tensors: {shapes}); "
                              "the adapter file is inconsistent")

        if any(v.ndim == 0 for v in tensors.values()):
            raise fail("a factor is a scalar")
        if "lokr_w1" in tensors and ("lokr_w1_a" in tensors or "lokr_w1_b" in tensors):
            raise fail("both a full lokr_w1 and its factors lokr_w1_a/_b are saved")
        if "lokr_w2" in tensors and any(n in tensors for n in ("lokr_w2_a", "lokr_w2_b", "lokr_t2")):
            raise fail("both a full lokr_w2 and its factors lokr_w2_a/_b/lokr_t2 are saved")
        if "lokr_w1" not in tensors:
            params.require("lokr_w1_a", "lokr_w1_b")
        if "lokr_w2" not in tensors:
            params.require("lokr_w2_a", "lokr_w2_b")
        # The ranks the decomposed factors show; they must agree with each other and with the config.
        ranks = set()
        if "lokr_w1_a" in tensors:
            ranks |= {tensors["lokr_w1_a"].shape[-1], tensors["lokr_w1_b"].shape[0]}
        if "lokr_t2" in tensors:
            ranks |= {*tensors["lokr_t2"].shape[:2], tensors["lokr_w2_a"].shape[0], tensors["lokr_w2_b"].shape[0]}
        elif "lokr_w2_a" in tensors:
            ranks |= {tensors["lokr_w2_a"].shape[-1], tensors["lokr_w2_b"].shape[0]}
        if len(ranks) > 1:
            raise fail(f"the factors disagree on the rank ({sorted(ranks)})")
        rank, alpha = config_rank_alpha(config, params.module)
        if rank <= 0:
            raise InputError(f"{source}: module {params.module!r}: the config gives r={rank}; PEFT requires r > 0")
        if ranks and ranks != {rank}:
            raise InputError(f"{source}: module {params.module!r}: the LoKr factors have rank {ranks.pop()} but the "
                             f"config gives r={rank} (r/rank_pattern); PEFT builds the layer and its scaling "
                             "alpha/r from the config and would refuse these tensors")
        return LokrPatch(params.module, source, tensors, rank, alpha, bool(config.get("decompose_both", False)),
                         int(config.get("decompose_factor", -1)), bool(config.get("use_effective_conv2d", False)))
