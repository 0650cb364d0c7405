"""VeRA (``peft_type: VERA``): ΔW = Tf((λ_b ⊙ B[:out]) @ (λ_d ⊙ A[:, :in])), on Linear and Conv1D.

``vera_lambda_b (out)`` and ``vera_lambda_d (r)`` are per layer; the random projections ``A (r, max_in)``
and ``B (max_out, r)`` are shared by every layer of the model. PEFT saves them once, as
``base_model.vera_A`` / ``base_model.vera_B``, when ``save_projection`` is true (the default); otherwise
they are regenerated from ``projection_prng_key`` exactly as PEFT does: a CPU ``torch.Generator`` seeded
with the key draws A first, then B, each ``uniform_(-√(6/fan_in), +√(6/fan_in))`` in float32, with
``max_in``/``max_out`` the largest in/out features over *all* targeted layers (taken from the base
shapes every patch records in ``check``, before the first ``apply``). There is no other scaling.

The change is additive and independent of W, so unmerge subtracts it again (exact up to rounding).

On a bf16/fp16 base PEFT merges with *regenerated* projections rounded to the base dtype (saved ones
keep full precision; see ``as_peft_buffer``). We reproduce that from the base dtype the engine hands
each patch (``patch.base_dtypes``).

``SharedProjections`` (the saved-or-regenerated state of one adapter, kept in ``AdapterContext.cache``)
is shared with PVeRA and RandLoRA.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from ..errors import InputError
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
from .hira import Layout, ShapeLayout
from .layers import Layer, Linear

if TYPE_CHECKING:  # adapters import methods; the config is only needed for type hints here
    from ..adapters.config import AdapterConfig

Generate = Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]


class SharedProjections:
    """The model-wide projections of one adapter: the saved pair, or the pair PEFT regenerates.

    Regeneration needs the largest (out, in) over every targeted layer; each patch records its layer's
    dims from the base shapes in ``check`` (all checks run before the first ``apply``), and the pair is
    generated on first use, once per distinct (max_out, max_in).
    """

    def __init__(self, label: str, modules: tuple[str, ...], saved: tuple[torch.Tensor, torch.Tensor] | None,
                 generate: Generate, ignored: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.label = label  # e.g. "VeRA vera_A/vera_B"
        self.modules = modules  # every module of the adapter: all of them count for max_in/max_out
        self.saved = saved
        self.generate = generate
        # Saved projections PEFT ignores (save_projection=false): compared with the regenerated ones.
        self.ignored = ignored
        self.dims: dict[str, tuple[int, int]] = {}  # module -> (out_features, in_features)
        self._memo: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.ignored_note: str | None = None  # set once, told by the first patch that applies

    @property
    def regenerated(self) -> bool:
        return self.saved is None

    def record(self, module: str, out_features: int, in_features: int) -> None:
        self.dims[module] = (out_features, in_features)

    def max_dims(self) -> tuple[int, int]:
        missing = [m for m in self.modules if m not in self.dims]
        if missing:
            raise InputError(f"{self.label}: cannot regenerate the shared projections before the base shape of "
                             f"every targeted layer is known (missing {missing[:3]})")
        return max(o for o, _ in self.dims.values()), max(i for _, i in self.dims.values())

    def get(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) in the precision they were saved or generated in."""
        if self.saved is not None:
            return self.saved
        key = self.max_dims()
        if key not in self._memo:
            self._memo = {key: self.generate(*key)}  # one base at a time: keep only the latest pair
            if self.ignored is not None:
                same = all(s.shape == g.shape and torch.equal(s.to(g.dtype), g)
                           for s, g in zip(self.ignored, self._memo[key]))
                self.ignored_note = None if same else (
                    f"{self.label}: the adapter file holds projections but its config says save_projection=false, "
                    "so (as PEFT does) they were ignored and regenerated from projection_prng_key; the saved ones "
                    "differ from the regenerated ones")
        return self._memo[key]


def as_peft_buffer(patch: Patch, projections: SharedProjections, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """Slices of the shared projections as PEFT holds them when it merges, in float32.

    PEFT builds the projections when it injects the adapter and casts them to the base layer's dtype
    there (``_move_adapter_to_device_of_base_layer``), then back to float32 (``autocast_adapter_dtype``);
    saved projections are loaded afterwards into those float32 buffers, at full precision. So on a
    bf16/fp16 base, *regenerated* projections are rounded to that dtype and saved ones are not.
    """
    dtype = patch.base_dtypes.get("weight")
    low = projections.regenerated and dtype is not None and dtype.is_floating_point and dtype.itemsize < 4
    return [(t.to(dtype) if low else t).to(torch.float32) for t in tensors]


def kaiming_uniform_vera(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """PEFT's VeRA ``_kaiming_init``: float32 uniform(±√3·√2/√fan_in) drawn with ``generator``."""
    tensor = torch.empty(shape)
    fan = shape[1] * math.prod(shape[2:])
    gain = math.sqrt(2)
    std = gain / math.sqrt(fan)
    bound = math.sqrt(3.0) * std
    with torch.no_grad():
        return tensor.uniform_(-bound, bound, generator=generator)


def vera_generator(r: int, key: int) -> Generate:
    def generate(max_out: int, max_in: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator(device="cpu").manual_seed(key)
        A = kaiming_uniform_vera((r, max_in), g)
        B = kaiming_uniform_vera((max_out, r), g)
        return A, B
    return generate


def linear_dims(module: str, label: str, shape: tuple[int, ...], fan_in_fan_out: bool) -> tuple[int, int]:
    """(out, in) of a Linear (weight (out, in)) or, with fan_in_fan_out, a Conv1D (weight (in, out))."""
    if len(shape) != 2:
        raise InputError(f"{module}: {label} applies to Linear and Conv1D weights, but the base weight is "
                         f"{list(shape)}")
    return (shape[1], shape[0]) if fan_in_fan_out else (shape[0], shape[1])


def shared_pair(params: ModuleParams, names: tuple[str, str], label: str, save_projection: bool,
                generate: Generate, per_layer: bool = False) -> SharedProjections:
    """The adapter's ``SharedProjections``, built by the first module's ``patch`` and cached on the context.

    ``per_layer``: PEFT may also have written identical copies of the projections under every module
    (RandLoRA in 0.21); these are read (so none is ignored) and must agree with the model-wide pair.
    """
    context: AdapterContext = params.context
    cache_key = f"shared_projections:{names[0]}"
    state = context.cache.get(cache_key)
    folder = params.config.path.parent
    copies = [params.tensors.get(n) for n in names] if per_layer else [None, None]
    if state is None:
        model_wide = [context.shared.get(n) for n in names]
        if (model_wide[0] is None) != (model_wide[1] is None):
            have, lack = (names[0], names[1]) if model_wide[0] is not None else (names[1], names[0])
            raise InputError(f"{folder}: the adapter holds base_model.{have} but not base_model.{lack}; the adapter "
                             "file is incomplete")
        wide_A, wide_B = model_wide
        copy_A, copy_B = copies
        pair: tuple[torch.Tensor, torch.Tensor] | None = None
        if wide_A is not None and wide_B is not None:
            pair = (wide_A, wide_B)
        elif copy_A is not None and copy_B is not None:
            pair = (copy_A, copy_B)  # only the per-layer copies were saved
        if save_projection:
            if pair is None:
                raise InputError(f"{folder}: adapter_config.json says save_projection=true but the adapter holds no "
                                 f"base_model.{names[0]} / base_model.{names[1]} (PEFT refuses to load it too)")
            state = SharedProjections(label, context.modules, pair, generate)
        else:
            state = SharedProjections(label, context.modules, None, generate, ignored=pair)
        context.cache[cache_key] = state
    if per_layer:
        if (copies[0] is None) != (copies[1] is None):
            raise InputError(f"{folder}: module {params.module!r} holds only one of {names[0]}/{names[1]}; the "
                             "adapter file is incomplete")
        reference = state.saved if state.saved is not None else state.ignored
        copy_A, copy_B = copies
        if copy_A is not None and copy_B is not None and reference is not None:
            for name, copy, ref in zip(names, (copy_A, copy_B), reference):
                if copy.shape != ref.shape or not torch.equal(copy, ref.to(copy.dtype)):
                    raise InputError(f"{folder}: module {params.module!r} holds a {name} {list(copy.shape)} that "
                                     f"differs from the model-wide one {list(ref.shape)}; PEFT loads all of them "
                                     "into one shared buffer, so the adapter file is inconsistent")
    return state


class VeraPatch(ShapeLayout, AdditivePatch):
    """ΔW = Tf((λ_b ⊙ B[:out]) @ (λ_d[:r] ⊙ A[:r, :in])); PVeRA uses the first (mean) half of λ_d and A.

    Linear or Conv1D (Tf) as the axis of length ``len(λ_b)`` says, not the saved ``fan_in_fan_out``: PEFT
    saves the last wrapped layer's, wrong for the Conv1D layers of a model that also has nn.Linear targets.
    """

    def __init__(self, module: str, label: str, lambda_b: torch.Tensor, lambda_d: torch.Tensor, rank: int,
                 layout: Layout, projections: SharedProjections):
        super().__init__(module, ("weight",))
        self.label, self.lambda_b, self.lambda_d, self.rank = label, lambda_b, lambda_d, rank
        self.layout, self.projections = layout, projections
        self.out_features = lambda_b.shape[0]
        self.in_features: int | None = None

    def check(self, shapes: Shapes) -> None:
        w = shapes["weight"]
        if len(w) == 2 and self.out_features in w:
            self._by_shape = Layout.by_shape(w, self.out_features, None)
            self.layout.observe(self.module, self._by_shape)
        out_f, in_f = linear_dims(self.module, self.label, w, self.transposed)
        if out_f != self.out_features:
            raise InputError(f"{self.module}: {self.label} lambda_b has {self.out_features} entries but the base "
                             f"weight {list(shapes['weight'])} has {out_f} output features")
        self.in_features = in_f
        self.projections.record(self.module, out_f, in_f)
        if self.projections.saved is not None:
            A, B = self.projections.saved
            if A.shape[1] < in_f or B.shape[0] < out_f:
                raise InputError(f"{self.module}: the shared projections A {list(A.shape)} / B {list(B.shape)} are "
                                 f"too small for the base weight {list(shapes['weight'])} ({out_f} out, {in_f} in)")

    def delta(self) -> Tensors:
        if self.in_features is None:
            raise InputError(f"{self.module}: {self.label} needs the base shape (check) before its change")
        A, B = self.projections.get()
        if self.projections.ignored_note is not None:
            self.notes.append(self.projections.ignored_note)
            self.projections.ignored_note = None  # told once per adapter
        r = self.rank
        sliced_A, sliced_B = as_peft_buffer(self, self.projections, A[:r, : self.in_features],
                                            B[: self.out_features, :])
        lambda_b = self.lambda_b.to(torch.float32).unsqueeze(-1)
        lambda_d = self.lambda_d[:r].to(torch.float32).unsqueeze(-1)
        d = (lambda_b * sliced_B) @ (lambda_d * sliced_A)
        return {"weight": d.T if self.transposed else d}

    def layer(self, shapes: Shapes) -> Layer:
        return Linear(self.transposed)

    def forward(self, x: torch.Tensor, base: Tensors, layer: Layer) -> torch.Tensor:
        """PEFT's ``base(x) + λ_b ⊙ F.linear(λ_d ⊙ F.linear(x, A[:, :in]), B[:out])``; PVeRA's eval path keeps the
        first (mean) half of ``λ_d ⊙ F.linear(x, A)`` (``chunk(2)[0]``) before B. The projections come from the
        shared saved-or-regenerated state, as PEFT holds them (``SharedProjections.get``, ``as_peft_buffer``)."""
        A, B = self.projections.get()
        A, B = as_peft_buffer(self, self.projections, A[:, : self.in_features], B[: self.out_features, :])
        h = (x @ like(A, x).T) * like(self.lambda_d, x)
        adapter = (h[..., : self.rank] @ like(B, x).T) * like(self.lambda_b, x)
        return layer(x, base) + adapter

    def describe(self) -> dict[str, Any]:
        facts: dict[str, Any] = {"kind": "conv1d_transposed" if self.transposed else "linear",
                                 "rank": self.rank, "out_features": self.out_features}
        facts["projections"] = "regenerated from projection_prng_key" if self.projections.regenerated else "saved"
        return facts


class _VeraFamily(Method):
    """VeRA and PVeRA: per-layer λ_b, λ_d and a shared (A, B) pair."""

    label = "VeRA"
    prefix = "vera"
    a_rows = 1  # A has a_rows·r rows and λ_d a_rows·r entries (PVeRA: 2, mean and log-variance halves)

    def generator(self, r: int, key: int) -> Generate:
        return vera_generator(r, key)

    def summary(self, config: AdapterConfig) -> dict[str, Any]:
        return {"r": config.get("r", 256), "save_projection": bool(config.get("save_projection", True)),
                "projection_prng_key": config.get("projection_prng_key", 0),
                "fan_in_fan_out": bool(config.get("fan_in_fan_out", False))}

    def extra_notes(self, config: AdapterConfig) -> list[str]:
        return []

    def patch(self, params: ModuleParams) -> Patch:
        config, p = params.config, self.prefix
        lambda_b, lambda_d = params.require(f"{p}_lambda_b", f"{p}_lambda_d")
        r = int(config.get("r", 256))
        folder = config.path.parent
        if lambda_b.ndim != 1 or lambda_d.ndim != 1:
            raise InputError(f"{folder}: module {params.module!r}: {p}_lambda_b {list(lambda_b.shape)} and "
                             f"{p}_lambda_d {list(lambda_d.shape)} must be vectors")
        if lambda_d.shape[0] != self.a_rows * r:
            raise InputError(f"{folder}: module {params.module!r}: {p}_lambda_d has {lambda_d.shape[0]} entries but "
                             f"r={r} in adapter_config.json needs {self.a_rows * r}")
        key = int(config.get("projection_prng_key", 0))
        state = shared_pair(params, (f"{p}_A", f"{p}_B"), f"{self.label} {p}_A/{p}_B",
                            bool(config.get("save_projection", True)), self.generator(r, key))
        for tensor, (name, rows) in zip((state.saved or state.ignored or ()),
                                        ((f"{p}_A", self.a_rows * r), (f"{p}_B", r))):
            axis = 0 if name.endswith("_A") else 1
            if tensor.ndim != 2 or tensor.shape[axis] != rows:
                raise InputError(f"{folder}: base_model.{name} is {list(tensor.shape)}, but r={r} needs "
                                 f"{'rows' if axis == 0 else 'columns'} = {rows}")
        layout = Layout.of(params.context, self.label, bool(config.get("fan_in_fan_out", False)))
        patch = VeraPatch(params.module, self.label, lambda_b, lambda_d, r, layout, state)
        if params.module == params.context.modules[0]:
            patch.notes.extend(self.extra_notes(config))
        return patch


@register
class Vera(_VeraFamily):
    peft_types = ("VERA",)
    param_names = frozenset({"vera_lambda_b", "vera_lambda_d"})
    shared_names = frozenset({"vera_A", "vera_B"})
    support = (Support("VeRA (saved or PRNG-regenerated projections)", "Linear, Conv1D (fan_in_fan_out)",
                       "exact", "exact", "0.21.2"),)
