"""TinyLoRA (``peft_type: TINYLORA``): a frozen SVD basis of each layer, steered by a tiny shared vector.

Per layer PEFT 0.21.2 saves ``tinylora_A (r, in)`` and ``tinylora_B (out, r)`` (``√S·Vᵀ`` and ``U·√S``
of the base weight's truncated SVD, persistent buffers, so no SVD is needed here) and, with
``save_projection=True`` (the default), the fixed random projections ``tinylora_P (u, r, r)``.
The trainable vectors are shared by groups of layers: ``base_model.tinylora_v.<g> (u)``.

* ``R = Σ_i v_g[i]·P[i]`` (``einsum("i,ijk->jk")``), ``ΔW = Tf(B @ R @ A)``; no scaling. Embeddings:
  ``ΔW = B @ R @ A`` is ``(V, d)``, the embedding's own layout.

Which group ``g`` a layer uses, and the seed of its projections, depend on the layer's index ``k`` in
the model's ``named_modules()`` order among the ``n`` targeted layers:
``P = torch.normal(0, 1/√r, (u, r, r), generator=Generator().manual_seed(projection_seed + k))``;
``num_groups = max(1, round(n·(1 − weight_tying)))``, ``group_size = max(1, n // num_groups)``,
``g = min(k // group_size, num_groups − 1)``. That order is the model class's registration order, which
no file records (safetensors lists names alphabetically, and ``layers.10`` sorts before ``layers.2``).
We recover ``k`` from the files instead:

* one group (``weight_tying=1``, or a single targeted layer): ``k`` does not matter when P is saved;
* otherwise the saved P of each layer is matched against ``torch.normal`` drawn with
  ``projection_seed + k`` for every ``k < n`` (n = layers in the file): P *is* that draw, so an exact
  match names the layer's position. Refused, with the reason, when no draw matches (an adapter made by a
  torch whose CPU ``normal`` differs, or targeted layers missing from the file), when draws from different
  groups coincide (tiny u·r² in low precision), or when P was not saved (``save_projection=False``) and
  more than one layer is targeted.

A single targeted layer without saved P is position 0: P is regenerated, and rounded to bf16/fp16 when
the saved SVD factors are (PEFT rounds P to the dtype of the base it loads into; a note says so).

Linear or Conv1D: PEFT transposes per layer by its type and saves the ``fan_in_fan_out`` of the last Linear
or Conv1D layer it wrapped (GPT-2's nn.Linear ``lm_head`` after its Conv1D layers saves False). A non-square
weight tells by its shape against ``B·A`` (an Embedding ``(V, d)`` is never transposed); a square one follows
the other modules when they agree, else the flag, and is refused among modules of both layouts
(:class:`TypeLayout`). An Embedding looks like an nn.Linear, so with a saved True (which says the last
Linear or Conv1D layer was a Conv1D; PEFT leaves the flag alone for embeddings) an ``(out, in)`` module is
not counted as an nn.Linear: a square weight then follows the flag, as before.

Additive: unmerge subtracts the same ΔW.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..errors import InputError, UnsupportedError
from .base import (
    AdapterContext,
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
from .hira import Layout
from .layers import Layer, Linear

if TYPE_CHECKING:  # adapters import methods; the config is only needed for type hints here
    from ..adapters.config import AdapterConfig

V = "tinylora_v"
_FINGERPRINT = 16  # leading values that key the table of candidate draws


def projection(seed: int, u: int, r: int) -> torch.Tensor:
    """PEFT's ``_init_projection``: ``torch.normal(0, 1/√r, (u, r, r))`` from a CPU generator."""
    gen = torch.Generator().manual_seed(seed)
    return torch.normal(mean=0.0, std=1.0 / (r**0.5), size=(u, r, r), generator=gen)


def _fingerprint(P: torch.Tensor) -> bytes:
    return P.reshape(-1)[:_FINGERPRINT].to(torch.float32).numpy().tobytes()


# PEFT draws P in float32, casts it to the base layer's dtype and back to float32 (autocast_adapter_dtype):
# on a bf16/fp16 base the saved P is the draw rounded to that dtype.
_ROUNDINGS = (None, torch.bfloat16, torch.float16)


def _as_saved(draw: torch.Tensor, rounding: torch.dtype | None, dtype: torch.dtype) -> torch.Tensor:
    return (draw if rounding is None else draw.to(rounding)).to(dtype)


def layer_positions(context: AdapterContext, P: torch.Tensor, seed: int, n: int) -> list[int]:
    """Every ``k < n`` whose draw ``projection(seed + k)`` (maybe rounded to bf16/fp16) equals the saved ``P``."""
    u, r = P.shape[0], P.shape[1]
    key = ("tinylora_draws", seed, u, r, P.dtype, n)
    table = context.cache.get(key)
    if table is None:
        table = {}
        for k in range(n):
            draw = projection(seed + k, u, r)
            for rounding in _ROUNDINGS:
                hits = table.setdefault(_fingerprint(_as_saved(draw, rounding, P.dtype)), [])
                if k not in hits:
                    hits.append(k)
        context.cache[key] = table
    found = []
    for k in table.get(_fingerprint(P), []):
        draw = projection(seed + k, u, r)
        if any(torch.equal(_as_saved(draw, rounding, P.dtype), P) for rounding in _ROUNDINGS):
            found.append(k)
    return found


def half_precision_of(*tensors: torch.Tensor) -> torch.dtype | None:
    """bf16/fp16 if every value of the float32 ``tensors`` is representable there (PEFT's SVD factors of a
    half-precision base are rounded to its dtype), else None."""
    for dtype in (torch.bfloat16, torch.float16):
        if all(torch.equal(t.to(dtype).to(t.dtype), t) for t in tensors):
            return dtype
    return None


class TypeLayout(Layout):
    """``Layout`` whose refusal of a square weight among modules of both layouts says what to do."""

    def observe(self, module: str, transposed: bool | None) -> None:
        try:
            super().observe(module, transposed)
        except InputError:
            raise UnsupportedError(
                f"{self.square[0]}: its weight is square, and this {self.method} adapter also changes layers stored "
                f"(out, in) like nn.Linear (e.g. {self.evidence[False][0]}) and (in, out) like Conv1D (e.g. "
                f"{self.evidence[True][0]}); PEFT transposes the change per layer by its type, which the files do not "
                "record (the saved fan_in_fan_out is only the last layer's). Merge it with PEFT (merge_and_unload), "
                "or train one adapter per layer type") from None


class TinyLoraPatch(AdditivePatch):
    """ΔW = Tf(B @ (Σ v_i P_i) @ A), transposed as the base shape says (a square one as ``layout`` decides)."""

    def __init__(self, module: str, A: torch.Tensor, B: torch.Tensor, P: torch.Tensor, v: torch.Tensor, group: str,
                 position: str, layout: TypeLayout, P_source: str):
        super().__init__(module, ("weight",))
        self.A, self.B, self.P, self.v = A, B, P, v
        self.group, self.position, self.layout, self.P_source = group, position, layout, P_source
        self.rank = A.shape[0]
        self._by_shape: bool | None = None

    @property
    def transposed(self) -> bool:
        return self.layout.transposed(self.module, self._by_shape)

    def check(self, shapes: Shapes) -> None:
        have = tuple(shapes["weight"])
        out, in_ = self.B.shape[0], self.A.shape[1]
        if have not in ((out, in_), (in_, out)):
            raise InputError(f"{self.module}: TinyLoRA's change is {[out, in_]} (tinylora_B {list(self.B.shape)}, "
                             f"tinylora_A {list(self.A.shape)}), stored as is or transposed for Conv1D, but the "
                             f"base weight is {list(have)}; was the adapter trained on another model?")
        self._by_shape = Layout.by_shape(have, out, in_)
        if not (self._by_shape is False and self.layout.fan_in_fan_out):  # maybe an Embedding: no evidence
            self.layout.observe(self.module, self._by_shape)

    def delta(self) -> Tensors:
        R = torch.einsum("i,ijk->jk", self.v.to(torch.float32), self.P.to(torch.float32))
        d = self.B.to(torch.float32) @ R @ self.A.to(torch.float32)
        return {"weight": d.T if self.transposed else d}

    def layer(self, shapes: Shapes) -> Layer:
        # An Embedding's (V, d) weight is read as a Linear too: the files do not say which it is, and both
        # are linear in the same tensor (PEFT's embedding path B[ids]·R·A is this product, row by row).
        return Linear(self.transposed)

    def forward(self, x: torch.Tensor, base: Tensors, layer: Layer) -> torch.Tensor:
        """PEFT's ``base(x) + F.linear(F.linear(F.linear(x, A), R), B)`` with ``R = Σ_i v_i·P_i``."""
        R = torch.einsum("i,ijk->jk", like(self.v, x), like(self.P, x))
        return layer(x, base) + ((x @ like(self.A, x).T) @ R.T) @ like(self.B, x).T

    def describe(self) -> dict[str, Any]:
        return {"kind": "conv1d_transposed" if self.transposed else "linear", "rank": self.rank, "u": self.v.numel(),
                "group": self.group, "position": self.position, "projection": self.P_source}


def _config_values(config: AdapterConfig) -> tuple[int, float]:
    seed = config.raw.get("projection_seed", 42)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise UnsupportedError(f"{config.path}: projection_seed must be an integer, got {seed!r}")
    tying = config.get("weight_tying", 0.0)
    if not isinstance(tying, (int, float)) or isinstance(tying, bool) or not 0.0 <= tying <= 1.0:
        raise UnsupportedError(f"{config.path}: weight_tying must be a number in [0, 1], got {tying!r}")
    return seed, float(tying)


@register
class TinyLora(Method):
    peft_types = ("TINYLORA",)
    param_names = frozenset({"tinylora_A", "tinylora_B", "tinylora_P"})
    shared_names = frozenset({V})
    support = (
        Support("TinyLoRA (save_projection=True, any weight_tying; layer positions recovered from the saved "
                "projections)", "Linear, Conv1D (fan_in_fan_out), Embedding", "exact", "exact", "0.21.2"),
        Support("TinyLoRA on Conv1D and Linear layers at once (layout of each non-square weight from B·A's shape)",
                "square weights among layers stored both ways", "refused: PEFT saves only the last wrapped layer's "
                "fan_in_fan_out and a square weight's layout is not in the files; merge with PEFT", "-", "0.21.2"),
        Support("TinyLoRA (save_projection=False, more than one layer)", "Linear, Conv1D, Embedding",
                "refused: projections and groups follow the model's module registration order, which no file "
                "records; re-save with save_projection=True", "-", "0.21.2"),
    )

    def check_config(self, config: AdapterConfig) -> None:
        _config_values(config)

    def summary(self, config: AdapterConfig) -> dict[str, Any]:
        return {"u": config.get("u"), "weight_tying": config.get("weight_tying", 0.0),
                "projection_seed": config.raw.get("projection_seed", 42),
                "save_projection": bool(config.get("save_projection", True)),
                "fan_in_fan_out": bool(config.get("fan_in_fan_out", False))}

    def patch(self, params: ModuleParams) -> Patch:
        config, context = params.config, params.context
        where = f"{config.path.parent}: module {params.module!r}"
        seed, tying = _config_values(config)
        A, B = params.require("tinylora_A", "tinylora_B")
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] == 0 or B.shape[1] != A.shape[0]:
            raise InputError(f"{where}: tinylora_A {list(A.shape)} and tinylora_B {list(B.shape)} must be (r, in) "
                             "and (out, r) matrices of the same rank; the adapter file is inconsistent")
        r = A.shape[0]

        groups = sorted(k[len(V) + 1:] for k in context.shared if k.startswith(V + "."))
        if not groups:
            raise InputError(f"{config.path.parent}: the adapter file has no base_model.{V}.<group> vectors; the "
                             "file is incomplete")
        if sorted(groups) != sorted(str(g) for g in range(len(groups))):
            raise InputError(f"{config.path.parent}: the shared vectors are base_model.{V}.{{{', '.join(groups)}}}, "
                             f"expected groups 0..{len(groups) - 1}; the adapter file is damaged")
        n = len(context.modules)
        num_groups = max(1, round(n * (1.0 - tying)))
        if num_groups != len(groups):
            raise UnsupportedError(
                f"{config.path.parent}: the file has {n} TinyLoRA layers, which with weight_tying={tying} makes "
                f"{num_groups} group(s), but it holds {len(groups)} shared vectors; PEFT counted targeted layers "
                "that are not in the file, so the layer positions (and groups) cannot be recovered")
        group_size = max(1, n // num_groups)

        P = params.tensors.get("tinylora_P")
        if P is not None and (P.ndim != 3 or P.shape[1:] != (r, r) or not P.is_floating_point()):
            raise InputError(f"{where}: tinylora_P is {list(P.shape)} {P.dtype}, expected (u, {r}, {r}) floats")

        rounded = None
        if num_groups == 1:
            group, position = "0", "not needed (one group)"
            if P is None:
                if n > 1:
                    raise UnsupportedError(f"{where}: {self._no_projection(n)}")
                P = projection(seed, self._u(params, context.shared[V + ".0"]), r)
                position, P_source = "0", "regenerated from projection_seed"
                half = half_precision_of(A, B) if A.dtype == torch.float32 else A.dtype
                if half in (torch.bfloat16, torch.float16):
                    # PEFT rounds the draw to the base's dtype; the saved SVD factors tell which one it had.
                    P, rounded = P.to(half).to(torch.float32), str(half).removeprefix("torch.")
                    P_source += f", rounded to {rounded} like the saved SVD factors"
            else:
                P_source = "saved"
        else:
            if P is None:
                raise UnsupportedError(f"{where}: {self._no_projection(n)}")
            P_source = "saved"
            hits = layer_positions(context, P, seed, n)
            if not hits:
                raise UnsupportedError(
                    f"{where}: its saved tinylora_P is not torch.normal(0, 1/sqrt(r)) drawn with projection_seed + k "
                    f"for any of the k < {n} layer positions, so its position in the model, which picks its shared "
                    f"vector (weight_tying={tying}), cannot be recovered (adapter made by a torch whose CPU normal() "
                    "draws differently, or PEFT targeted layers that are not in the file)")
            candidates = {str(min(k // group_size, num_groups - 1)) for k in hits}
            if len(candidates) > 1:
                raise UnsupportedError(
                    f"{where}: its saved tinylora_P matches the draws of positions {hits}, which belong to different "
                    "groups, so its shared vector is ambiguous (u·r² too small to tell the draws apart)")
            (group,) = candidates
            position = str(hits[0]) if len(hits) == 1 else f"one of {hits}"
            if len(hits) == 1:
                claimed = context.cache.setdefault("tinylora_positions", {})
                other = claimed.setdefault(hits[0], params.module)
                if other != params.module:
                    raise InputError(f"{where}: its tinylora_P is the draw of position {hits[0]}, which is also "
                                     f"{other!r}'s; the adapter file is damaged")
        v = context.shared[f"{V}.{group}"]
        u = self._u(params, v)
        if P.shape[0] != u:
            raise InputError(f"{where}: tinylora_P has {P.shape[0]} projections but base_model.{V}.{group} has {u} "
                             "entries; the adapter file is inconsistent")
        layout = context.cache.setdefault("tinylora_layout",
                                          TypeLayout("TinyLoRA", bool(config.get("fan_in_fan_out", False))))
        patch = TinyLoraPatch(params.module, A, B, P, v, group, position, layout, P_source)
        if rounded is not None:
            patch.notes.append(f"tinylora_P was not saved; regenerated from projection_seed and rounded to {rounded}, "
                               "the dtype of the base the saved SVD factors come from, as PEFT does when it loads the "
                               "adapter into such a base (into a base of another dtype PEFT would round differently)")
        return patch

    @staticmethod
    def _u(params: ModuleParams, v: torch.Tensor) -> int:
        if v.ndim != 1 or v.numel() == 0 or not v.is_floating_point():
            raise InputError(f"{params.config.path.parent}: base_model.{V}.* must be non-empty 1-D float vectors, got "
                             f"{list(v.shape)} {v.dtype}")
        return v.numel()

    @staticmethod
    def _no_projection(n: int) -> str:
        return (f"this TinyLoRA adapter has no saved tinylora_P (save_projection=False) and {n} layers: PEFT draws "
                "each layer's projections from projection_seed + the layer's position in the model's module "
                "registration order (and groups layers by it), which neither the adapter nor the checkpoint "
                "records. To fix: set \"save_projection\": true in adapter_config.json, load the adapter with PEFT "
                "(PeftModel.from_pretrained on the base model, which regenerates the projections) and "
                "save_pretrained it again")
