"""PEANuT (``peft_type: PEANUT``) on nn.Linear: a small non-linear network of W gives the change.

With W (out, in), ``A = peanut_A.weight (r, out)``, ``B = peanut_B.weight (out, r)``, encoders and
decoders ``peanut_encoders.i.weight``, ``peanut_decoders.i.weight (r, r)`` for i < ``depth`` and
``act = ACT2FN[act_fn]`` (transformers' activation table, reproduced here without transformers):

    h = act(Wᵀ Aᵀ)                              (in, r)
    for i < depth:  keep h as residual i;  h = act(h E_iᵀ)
    for i < depth:  h = act(h D_iᵀ) + residual[depth − 1 − i]
    ΔW = (scaling · h Bᵀ)ᵀ                      (out, in)

computed in float32 (PEFT upcasts the adapter to float32 when it loads it, and casts W to it). The
change is a non-linear function of W that the files cannot invert: unmerge is refused.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ..errors import InputError, UnsupportedError
from .base import Method, ModuleParams, Patch, Shapes, Support, Tensors, like, register
from .layers import Layer

if TYPE_CHECKING:  # adapters import methods; the config is only needed for type hints here
    from ..adapters.config import AdapterConfig


def _gelu_tanh_python(x: torch.Tensor) -> torch.Tensor:
    return x * 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def _gelu_new(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def _gelu_accurate(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def _laplace(x: torch.Tensor, mu: float = 0.707107, sigma: float = 0.282095) -> torch.Tensor:
    x = (x - mu).div(sigma * math.sqrt(2.0))
    return 0.5 * (1.0 + torch.erf(x))


# transformers.activations.ACT2CLS (5.x), each written with the very torch operations it uses.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_10": lambda x: torch.clip(F.gelu(x), -10, 10),
    "gelu_fast": lambda x: 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x))),
    "gelu_new": _gelu_new,
    "gelu_python": lambda x: x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0))),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_python_tanh": _gelu_tanh_python,
    "gelu_accurate": _gelu_accurate,
    "hardswish": F.hardswish,
    "laplace": _laplace,
    "leaky_relu": F.leaky_relu,  # nn.LeakyReLU(): slope 0.01
    "linear": lambda x: x,
    "mish": F.mish,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "relu": F.relu,
    "relu2": lambda x: torch.square(F.relu(x)),
    "relu6": F.relu6,
    "sigmoid": torch.sigmoid,
    "silu": F.silu,
    "sqrtsoftplus": lambda x: F.softplus(x).sqrt(),
    "swish": F.silu,
    "tanh": torch.tanh,
    "prelu": lambda x: F.prelu(x, torch.full((1,), 0.25, dtype=x.dtype, device=x.device)),  # a fresh nn.PReLU(): 0.25
}
# In ACT2FN but not reproducible from the config alone.
_NOT_REPRODUCIBLE = {"xielu": "xIELU's parameters are created in bfloat16 and its result depends on a CUDA kernel"}


class PeanutPatch(Patch):
    def __init__(self, module: str, A: torch.Tensor, B: torch.Tensor, encoders: list[torch.Tensor],
                 decoders: list[torch.Tensor], act_fn: str, scaling: float):
        super().__init__(module, ("weight",))
        self.A, self.B, self.encoders, self.decoders = A, B, encoders, decoders
        self.act_fn, self.scaling = act_fn, scaling
        self.rank, self.out = A.shape

    def check(self, shapes: Shapes) -> None:
        w = tuple(shapes["weight"])
        if len(w) != 2 or w[0] != self.out:
            hint = " (PEANuT supports nn.Linear only, stored (out, in))" if len(w) == 2 and w[1] == self.out else ""
            raise InputError(f"{self.module}: peanut_A.weight is {list(self.A.shape)} (r, out_features), but the base "
                             f"weight is {list(w)}{hint}; was the adapter trained on another model?")

    def weight_delta(self, W: torch.Tensor) -> torch.Tensor:
        act = ACTIVATIONS[self.act_fn]
        f32 = torch.float32
        h = act(torch.matmul(W.to(f32).transpose(0, 1), self.A.to(f32).t()))
        residuals = []
        for E in self.encoders:
            residuals.append(h)
            h = act(F.linear(h, E.to(f32)))
        for i, D in enumerate(self.decoders):
            h = act(F.linear(h, D.to(f32)))
            h = h + residuals[len(self.decoders) - 1 - i]
        h = F.linear(h, self.B.to(f32))
        return (h * self.scaling).transpose(0, 1)

    def apply(self, tensors: Tensors) -> Tensors:
        W = tensors["weight"]
        return {"weight": W.add_(self.weight_delta(W).to(W.dtype))}

    def forward(self, x: torch.Tensor, base: Tensors, layer: Layer) -> torch.Tensor:
        """PEFT's forward ``base_layer(x) + x ΔWᵀ``, with ΔWᵀ = s·h Bᵀ applied to activations as
        ``s·(x h) Bᵀ``; h (in, r) is the encoder/decoder network run on ``Wᵀ Aᵀ``, written again here."""
        W = base["weight"]
        act = ACTIVATIONS[self.act_fn]  # transformers' activation table: the parameterisation, shared
        h = act(W.T @ like(self.A, W).T)
        skips = []
        for E in self.encoders:
            skips.append(h)
            h = act(h @ like(E, W).T)
        for D in self.decoders:
            h = act(h @ like(D, W).T) + skips.pop()
        return layer(x, base) + self.scaling * ((x @ h) @ like(self.B, W).T)

    def why_not_invertible(self) -> str | None:
        return ("PEANuT's change is a non-linear function of the base weight (a small network of W), and the files "
                "hold neither W nor a way to invert that function; keep the base checkpoint and merge from it again")

    def describe(self) -> dict[str, Any]:
        return {"kind": "linear", "rank": self.rank, "depth": len(self.encoders), "act_fn": self.act_fn,
                "scaling": self.scaling}


@register
class Peanut(Method):
    peft_types = ("PEANUT",)
    param_names = frozenset({"peanut_A", "peanut_B", "peanut_encoders", "peanut_decoders"})
    support = (
        Support("PEANuT (any depth, transformers' activations except xielu)", "Linear", "exact",
                "refused: ΔW is a non-linear function of W, which is not in the files", "0.21.2"),
    )

    def check_config(self, config: AdapterConfig) -> None:
        act = config.get("act_fn", "relu")
        if act in _NOT_REPRODUCIBLE:
            raise UnsupportedError(f"{config.path}: PEANuT with act_fn={act!r} is not supported: "
                                   f"{_NOT_REPRODUCIBLE[act]}")
        if act not in ACTIVATIONS:
            raise UnsupportedError(f"{config.path}: PEANuT act_fn={act!r} is not one of transformers' activations "
                                   f"that wsurgery knows ({', '.join(sorted(ACTIVATIONS))})")
        depth = config.get("depth", 0)
        if not isinstance(depth, int) or depth < 0:
            raise UnsupportedError(f"{config.path}: PEANuT depth={depth!r} must be a non-negative integer")

    def summary(self, config: AdapterConfig) -> dict[str, Any]:
        return {"depth": config.get("depth", 0), "act_fn": config.get("act_fn", "relu"),
                "scaling": config.get("scaling", 1.0)}

    def patch(self, params: ModuleParams) -> Patch:
        config, t = params.config, params.tensors
        depth = int(config.get("depth", 0))
        where = f"{config.path.parent}: module {params.module!r}"
        for side in ("encoders", "decoders"):
            extra = sorted(k for k in t if k.startswith(f"peanut_{side}.")
                           and k not in {f"peanut_{side}.{i}.weight" for i in range(depth)})
            if extra:
                expected = f"peanut_{side}.0 to .{depth - 1}" if depth else f"no peanut_{side}"
                raise InputError(f"{where} saves {extra[0]}, but the config's depth is {depth} ({expected}); the "
                                 "adapter file and its config disagree")
        A, B = params.require("peanut_A.weight", "peanut_B.weight")
        encoders = params.require(*(f"peanut_encoders.{i}.weight" for i in range(depth)))
        decoders = params.require(*(f"peanut_decoders.{i}.weight" for i in range(depth)))
        r = A.shape[0] if A.ndim == 2 else -1
        bad = A.ndim != 2 or tuple(B.shape) != (A.shape[1], r) or \
            any(tuple(m.shape) != (r, r) for m in (*encoders, *decoders))
        if bad:
            shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in sorted(t.items()))
            raise InputError(f"{where}: {shapes} do not chain (A (r, out), encoders/decoders (r, r), B (out, r)); "
                             "the adapter file is inconsistent")
        return PeanutPatch(params.module, A, B, list(encoders), list(decoders), config.get("act_fn", "relu"),
                           float(config.get("scaling", 1.0)))
