"""RoAd (``peft_type: ROAD``): a 2×2 rotation-scaling of pairs of output features, ``W' = R·W``,
``b' = R·b``.

Outputs are split into groups of ``group_size`` (g); inside a group, element ``p < g/2`` is paired
with ``q = p + g/2``, and (PEFT's ``_apply_road`` / ``_get_delta_weight``)::

    y_p = c1_p·x_p − c2_p·x_q
    y_q = c1_q·x_q + c2_q·x_p

``c1``/``c2`` (length out) come from ``road_theta``/``road_alpha`` by variant:

* ``road_1`` (length out/2): per group the g/2 values serve both halves; c1 = α·cos θ, c2 = α·sin θ;
* ``road_2`` (length out): c1 = α·cos θ, c2 = α·sin θ elementwise;
* ``road_4`` (length 2·out, viewed (−1, 2, g)): c1 = α[:,0]·cos θ[:,0], c2 = α[:,1]·sin θ[:,1].

The merge works on the (out/g, 2, g/2, in) view of W, never building the (out, out) R. Unmerge applies
the exact inverse of every 2×2 block ``[[c1_p, −c2_p], [c2_q, c1_q]]`` (determinant
``c1_p·c1_q + c2_p·c2_q``), computed in float64; it is refused where a block is singular (α = 0).
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import InputError
from .base import Method, ModuleParams, Patch, Shapes, Support, Tensors, like, register
from .layers import Layer

_LENGTH = {"road_1": 0.5, "road_2": 1, "road_4": 2}  # parameter count per output feature


def prepare_cols(variant: str, group: int, theta: torch.Tensor,
                 alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's ``_prepare_cols``: the per-output coefficients (c1, c2), in the dtype of theta/alpha."""
    if variant == "road_1":
        theta = theta.reshape(-1, group // 2).repeat_interleave(2, dim=0).flatten()
        alpha = alpha.reshape(-1, group // 2).repeat_interleave(2, dim=0).flatten()
        return alpha * theta.cos(), alpha * theta.sin()
    if variant == "road_2":
        return alpha * theta.cos(), alpha * theta.sin()
    theta = theta.reshape(-1, 2, group)
    alpha = alpha.reshape(-1, 2, group)
    return (alpha[:, 0, :] * theta[:, 0, :].cos()).flatten(), (alpha[:, 1, :] * theta[:, 1, :].sin()).flatten()


class RoadPatch(Patch):
    """y = R x on pairs (p, p + g/2) of output features, for the weight's rows and the bias."""

    def __init__(self, module: str, variant: str, group: int, theta: torch.Tensor, alpha: torch.Tensor):
        super().__init__(module, ("weight",), optional_roles=("bias",))
        self.variant, self.group, self.theta, self.alpha = variant, group, theta, alpha
        self.out = round(theta.numel() / _LENGTH[variant])
        self._cols: tuple[torch.Tensor, torch.Tensor] | None = None

    # -- coefficients ------------------------------------------------------------------------------
    def blocks(self) -> tuple[torch.Tensor, ...]:
        """(a, b, c, d) of every pair's block [[a, −b], [c, d]], float64, shaped (out/g, g/2)."""
        if self._cols is None:
            # PEFT evaluates cos/sin in the adapter dtype; so do we, then widen for the algebra.
            dtype = torch.promote_types(self.theta.dtype, torch.float32)
            c1, c2 = prepare_cols(self.variant, self.group, self.theta.to(dtype), self.alpha.to(dtype))
            self._cols = (c1.double(), c2.double())
        c1, c2 = (c.view(-1, 2, self.group // 2) for c in self._cols)
        return c1[:, 0], c2[:, 0], c2[:, 1], c1[:, 1]

    def determinants(self) -> torch.Tensor:
        a, b, c, d = self.blocks()
        return a * d + b * c

    def _rotate(self, x: torch.Tensor, a, b, c, d) -> torch.Tensor:
        """In place on the rows of x: [x_p; x_q] <- [[a, −b], [c, d]] [x_p; x_q]."""
        x = x.contiguous()
        v = x.view(-1, 2, self.group // 2, *x.shape[1:])
        extra = (1,) * (x.ndim - 1)
        a, b, c, d = (t.to(x.dtype).view(*t.shape, *extra) for t in (a, b, c, d))
        xp, xq = v[:, 0], v[:, 1]
        old_p = xp.clone()
        xp.mul_(a).addcmul_(xq, b, value=-1.0)
        xq.mul_(d).addcmul_(old_p, c)
        return x

    # -- Patch interface -----------------------------------------------------------------------
    def check(self, shapes: Shapes) -> None:
        w = shapes["weight"]
        if len(w) != 2:
            raise InputError(f"{self.module}: RoAd only applies to nn.Linear weights (out, in), but the base weight "
                             f"is {list(w)}")
        if w[0] != self.out:
            raise InputError(f"{self.module}: {self.variant} road_theta/road_alpha have {self.theta.numel()} entries, "
                             f"which fits {self.out} output features, but the base weight is {list(w)}; was the "
                             "adapter trained on another model (or is 'variant' in adapter_config.json wrong)?")
        if w[0] % self.group:
            raise InputError(f"{self.module}: {w[0]} output features are not divisible by group_size {self.group} "
                             "(PEFT refuses such a layer too)")
        if "bias" in shapes and shapes["bias"] != (w[0],):
            raise InputError(f"{self.module}: the base bias is {list(shapes['bias'])}, expected [{w[0]}]")

    def apply(self, tensors: Tensors) -> Tensors:
        a, b, c, d = self.blocks()
        return {role: self._rotate(t, a, b, c, d) for role, t in tensors.items()}

    def revert(self, tensors: Tensors) -> Tensors:
        a, b, c, d = self.blocks()
        det = self.determinants()
        # [[a, −b], [c, d]]⁻¹ = [[d, b], [−c, a]] / det
        inv = (d / det, -b / det, -c / det, a / det)  # in _rotate's (a, b, c, d) convention
        cond = self.condition()
        if cond > 1e3:
            self.notes.append(f"RoAd unmerge: the worst 2x2 block has condition number {cond:.3g}, so rounding "
                              "errors in the merged weights grow by up to that factor")
        return {role: self._rotate(t, *inv) for role, t in tensors.items()}

    def forward(self, x: torch.Tensor, base: Tensors, layer: Layer) -> torch.Tensor:
        """PEFT's RoAd forward (``_apply_road``): the base output, bias included, becomes
        ``y·c1 + rotate_half(y)·c2`` per group, with ``rotate_half`` pairing (−y_q, y_p); the coefficients
        are the parameterization shared with the merge (``prepare_cols``)."""
        y = layer(x, base)
        c1, c2 = prepare_cols(self.variant, self.group, like(self.theta, y), like(self.alpha, y))
        halves = y.reshape(-1, 2, self.group // 2)
        rotated = torch.stack((-halves[:, 1], halves[:, 0]), dim=1).reshape(y.shape)
        return y * c1 + rotated * c2

    def condition(self) -> float:
        a, b, c, d = self.blocks()
        blocks = torch.stack([torch.stack([a, -b], -1), torch.stack([c, d], -1)], -2).reshape(-1, 2, 2)
        s = torch.linalg.svdvals(blocks)
        return float((s[:, 0] / s[:, 1]).max())

    def why_not_invertible(self) -> str | None:
        det = self.determinants().flatten()
        bad = (det == 0) | ~torch.isfinite(det)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            g, p = divmod(i, self.group // 2)
            return (f"{int(bad.sum())} of its 2x2 output rotations are singular (e.g. outputs "
                    f"{g * self.group + p} and {g * self.group + p + self.group // 2}, determinant 0, e.g. from "
                    "road_alpha = 0), so the merge erased information; unmerging needs the base checkpoint")
        return None

    def describe(self) -> dict[str, Any]:
        det = self.determinants()
        return {"kind": "linear", "variant": self.variant, "group_size": self.group,
                "min_abs_det": float(det.abs().min()), "max_block_condition": self.condition(),
                "orthogonality_deviation": self.orthogonality_deviation()}

    def orthogonality_deviation(self) -> float:
        """max |R Rᵀ − I| (R is a scaled rotation, so this mostly reports |α| ≠ 1)."""
        a, b, c, d = self.blocks()
        # rows of each block: (a, −b) and (c, d)
        pp = a * a + b * b - 1
        qq = c * c + d * d - 1
        pq = a * c - b * d
        return float(torch.stack([pp.abs(), qq.abs(), pq.abs()]).max())


@register
class Road(Method):
    peft_types = ("ROAD",)
    param_names = frozenset({"road_theta", "road_alpha"})
    support = (Support("RoAd (road_1/2/4)", "Linear (weight and bias)", "exact",
                       "exact (refused on a singular 2x2 block)", "0.21.2"),)

    def summary(self, config) -> dict[str, Any]:
        return {"variant": config.get("variant", "road_1"), "group_size": int(config.get("group_size", 64)),
                "rule": "W' = R·W, b' = R·b (2x2 blocks on output pairs)"}

    def patch(self, params: ModuleParams) -> Patch:
        config = params.config
        theta, alpha = params.require("road_theta", "road_alpha")
        variant = str(config.get("variant", "road_1"))
        group = config.get("group_size", 64)
        where = f"{config.path.parent}: module {params.module!r}"
        if variant not in _LENGTH:
            raise InputError(f"{config.path}: unknown RoAd variant {variant!r} (PEFT knows road_1, road_2, road_4)")
        if not isinstance(group, int) or group <= 0 or group % 2:
            raise InputError(f"{config.path}: group_size must be a positive even integer, got {group!r}")
        if theta.ndim != 1 or theta.shape != alpha.shape:
            raise InputError(f"{where}: road_theta {list(theta.shape)} and road_alpha {list(alpha.shape)} must be "
                             "vectors of the same length")
        n = theta.numel()
        per_group = int(group * _LENGTH[variant])
        if n == 0 or n % per_group:
            raise InputError(f"{where}: {variant} with group_size {group} needs a multiple of {per_group} "
                             f"road_theta entries, got {n}")
        return RoadPatch(params.module, variant, group, theta, alpha)
