"""The interface every fine-tuning method implements, and the registry that finds it by peft_type.

A method turns the tensors an adapter saved for one module into a ``Patch``: an object that knows
which base tensors of that module it changes (its *roles*: ``weight``, ``bias``, ...) and how to
apply the change to them, undo it, and, where the change is additive, give the dense delta. The
merge engine never looks inside a patch: adding a method means adding one module that registers
itself here.

Contract: ``apply``/``revert`` receive fresh float32 (float64 for float64 bases) tensors that they
may change in place, and return the results in the same precision; the engine reads base tensors,
upcasts, calls the patch, and rounds once to the output dtype. In-place updates keep peak memory
near two float32 copies of the largest changed tensor.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..errors import InputError, NotInvertibleError, UnsupportedError
from .layers import Layer, default_layer

if TYPE_CHECKING:  # adapters import methods; the config is only needed for type hints here
    from ..adapters.config import AdapterConfig

Shapes = dict[str, tuple[int, ...]]
Tensors = dict[str, torch.Tensor]


@dataclass
class AdapterContext:
    """What all modules of one adapter share; the same object is handed to each of its ``ModuleParams``."""

    #: Model-wide tensors saved as ``base_model.<name>`` (``vera_A``, ``vblora_vector_bank``...).
    shared: dict[str, torch.Tensor] = field(default_factory=dict)
    #: Options the user gave for this run (``task_id``...); only names in ``Method.option_names``.
    options: dict[str, Any] = field(default_factory=dict)
    #: Every module path the adapter changes, in the adapter file's order.
    modules: tuple[str, ...] = ()
    #: Room for state a method derives once per adapter (regenerated projections, index maps...).
    #: Patches may fill it during ``check`` (all checks run before the first ``apply``).
    #: Keys are names or tuples (name, parameters...).
    cache: dict[Hashable, Any] = field(default_factory=dict)


@dataclass
class ModuleParams:
    """One adapter's saved tensors for one module: ``{"lora_A.weight": ..., "lora_B.weight": ...}``."""

    module: str  # module path as the adapter names it, without ``base_model.model.``
    tensors: dict[str, torch.Tensor]
    config: AdapterConfig
    context: AdapterContext = field(default_factory=AdapterContext)

    def require(self, *names: str) -> list[torch.Tensor]:
        missing = [n for n in names if n not in self.tensors]
        if missing:
            raise InputError(
                f"{self.config.path.parent}: module {self.module!r} has {sorted(self.tensors)} but lacks "
                f"{missing}; the adapter file is incomplete"
            )
        return [self.tensors[n] for n in names]


def expect_shape(module: str, change: str, want: tuple[int, ...], have: tuple[int, ...], detail: str = "",
                 what: str = "weight") -> None:
    """Refuse, before any data is read, a change whose shape does not fit the base tensor; where the two
    are transposes of each other, say that ``fan_in_fan_out`` is the likely culprit."""
    want, have = tuple(want), tuple(have)
    if want == have:
        return
    transposed = len(have) == 2 and have == want[::-1]
    hint = " (transposed: is fan_in_fan_out set right in adapter_config.json?)" if transposed else ""
    raise InputError(f"{module}: {change} has shape {list(want)}{detail} but the base {what} is {list(have)}{hint}; "
                     "was the adapter trained on another model?")


def like(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """An adapter tensor as float32 on ``x``'s device: forward paths run where ``verify`` puts the inputs."""
    return t.to(device=x.device, dtype=torch.float32)


class Patch(ABC):
    """What one adapter does to the tensors of one base module."""

    #: Replacements (modules_to_save, saved biases) run before method patches on the same module.
    priority: ClassVar[int] = 1
    #: True where ``revert`` solves for W numerically (its residual goes to ``notes``).
    approximate_inverse: ClassVar[bool] = False
    #: Base tensors of the module whose shapes ``check`` sees (where the base has them) but which the patch
    #: leaves alone: a layer's type shows in them where the adapter's files do not say it (a bias's length).
    peeked_roles: ClassVar[tuple[str, ...]] = ()
    #: True where the patch puts saved tensors in the base tensors' place: a copy, so it may replace an
    #: integer buffer (a BatchNorm's num_batches_tracked), which no arithmetic change may touch.
    replaces: ClassVar[bool] = False
    #: True where ``add_scaled_rows`` works: the change of each row of the first dimension depends on that
    #: row's index alone, so the engine may merge a tensor too large to hold in chunks of rows.
    row_separable: ClassVar[bool] = False

    def scales_linearly(self) -> bool:
        """Whether ``merge(W, s) = W + s·(merge(W, 1) − W)``, as ``verify`` assumes for ``--scale s``; False
        where the ecosystem puts the multiplier inside the change (LyCORIS' DoRA and OFT, diffusers' DoRA)."""
        return True

    def __init__(self, module: str, roles: tuple[str, ...], optional_roles: tuple[str, ...] = ()):
        self.module = module
        self.roles = roles  # base tensors (relative to the module) that must exist
        self.optional_roles = optional_roles  # changed too where the base has them (e.g. a bias)
        self.notes: list[str] = []  # facts worth telling the user after the run (e.g. a residual)
        # The base tensors' stored dtypes by role, given to ``bind``: PEFT rounds some regenerated state
        # (e.g. VeRA's projections) to the base dtype, and so must we.
        self.base_dtypes: dict[str, torch.dtype] = {}

    def bind(self, shapes: Shapes, base_dtypes: dict[str, torch.dtype] | None = None) -> Bound:
        """Check the patch against the base tensors it will change and return it bound to them.

        The change can only be applied through a ``Bound``: what ``check`` derives from the shapes
        (layer kind, padded sizes...) is always there when ``apply``/``delta`` run.
        """
        self.base_dtypes = dict(base_dtypes or {})
        self.check(shapes)
        return Bound(self, {r: tuple(s) for r, s in shapes.items()})

    # -- validation, before any data is read ---------------------------------------------------
    def check(self, shapes: Shapes) -> None:
        """Raise ``InputError`` if the base tensors' shapes do not fit this patch.

        ``shapes`` holds every role in ``roles`` and those of ``optional_roles`` the base has;
        ``apply``/``revert`` later receive tensors for exactly these roles.
        """

    def output_shapes(self, shapes: Shapes) -> Shapes:
        """Shapes after the change (only replacements of resized embeddings differ)."""
        return dict(shapes)

    # -- the change itself ---------------------------------------------------------------------
    @abstractmethod
    def apply(self, tensors: Tensors) -> Tensors:
        """Merged tensors from base tensors (float32 in, float32 out)."""

    def revert(self, tensors: Tensors) -> Tensors:
        """Base tensors from merged ones; raises ``NotInvertibleError`` where that is impossible."""
        raise NotInvertibleError(f"{self.module}: {self.why_not_invertible()}")

    def delta(self) -> Tensors | None:
        """The dense additive change per role, for methods whose change does not depend on W."""
        return None

    def why_not_invertible(self) -> str | None:
        """None if ``revert`` works; otherwise the reason, phrased for the user."""
        return "this change cannot be undone from the files alone"

    def describe(self) -> dict[str, Any]:
        """Facts for ``inspect``: rank, alpha, scaling, layer kind..."""
        return {}

    def same_change(self, other: Patch) -> bool:
        """True if ``other`` makes exactly this change (PEFT saves some changes twice for tied weights)."""
        return False

    def unmerge_status(self) -> str:
        """``exact``, ``approximate`` or ``impossible: <reason>``, for ``inspect``."""
        reason = self.why_not_invertible()
        if reason is not None:
            return f"impossible: {reason}"
        return "approximate" if self.approximate_inverse else "exact"

    # -- the unmerged forward path, for verify --------------------------------------------------
    def layer(self, shapes: Shapes) -> Layer:
        """How the base module computes from its tensors (``shapes`` as in ``check``)."""
        return default_layer(shapes)

    def forward(self, x: torch.Tensor, base: Tensors, layer: Layer) -> torch.Tensor:
        """The module's output on ``x`` with this adapter active but not merged, computed the way PEFT
        computes it at inference, from the float32 base tensors and the adapter's own tensors.

        It must not use ``apply``, ``revert``, ``delta``, ``add_scaled`` or the helpers they call:
        ``verify`` compares it with the merged file, and a shared code path would make that circular.
        """
        raise UnsupportedError(f"{self.module}: {type(self).__name__} has no forward path to verify with")

    # -- scaled application, shared by all methods -----------------------------------------------
    def add_scaled(self, tensors: Tensors, alpha: float) -> Tensors | None:
        """``tensors += alpha·ΔW`` in place where the change has a dense delta, else None.

        Additive methods may override this to avoid materialising ΔW (LoRA adds B·A with one addmm_).
        """
        d = self.delta()
        return None if d is None else _add(tensors, d, alpha)

    def add_scaled_rows(self, role: str, rows: torch.Tensor, alpha: float, span: tuple[int, int]) -> None:
        """``rows += alpha·ΔW[role][start:stop]`` in place, where ``rows`` (float32) holds rows
        ``span = (start, stop)`` of the base tensor ``role``; nothing where the patch leaves ``role``
        alone. Row-separable patches only; the arithmetic is ``add_scaled``'s, row for row."""
        raise NotImplementedError(f"{type(self).__name__} changes whole tensors only")

    def merge(self, tensors: Tensors, scale: float) -> Tensors:
        """``W + scale·ΔW``, where ΔW is this patch's effective change of W."""
        added = self.add_scaled(tensors, scale)
        if added is not None:
            return added
        if scale == 1.0:
            return self.apply(tensors)
        before = {r: t.clone() for r, t in tensors.items()}
        after = self.apply(tensors)
        return {r: torch.lerp(before[r], after[r], scale) for r in after}

    def unmerge(self, tensors: Tensors, scale: float) -> Tensors:
        """Undo ``merge(·, scale)``."""
        added = self.add_scaled(tensors, -scale)
        if added is not None:
            return added
        if scale == 1.0:
            return self.revert(tensors)
        raise NotInvertibleError(
            f"{self.module}: unmerging with --scale other than 1 needs an additive change; this one is not"
        )


@dataclass(frozen=True)
class Bound:
    """A patch checked against the shapes (and dtypes) of the base tensors it changes: plan -> bind -> apply."""

    patch: Patch
    shapes: Shapes

    @property
    def module(self) -> str:
        return self.patch.module

    @property
    def notes(self) -> list[str]:
        return self.patch.notes

    def output_shapes(self) -> Shapes:
        return self.patch.output_shapes(self.shapes)

    def merge(self, tensors: Tensors, scale: float) -> Tensors:
        return self.patch.merge(tensors, scale)

    def unmerge(self, tensors: Tensors, scale: float) -> Tensors:
        return self.patch.unmerge(tensors, scale)

    def delta(self) -> Tensors | None:
        return self.patch.delta()

    def apply(self, tensors: Tensors) -> Tensors:
        return self.patch.apply(tensors)

    def layer(self, shapes: Shapes | None = None) -> Layer:
        return self.patch.layer(self.shapes if shapes is None else shapes)

    def forward(self, x: torch.Tensor, base: Tensors, layer: Layer) -> torch.Tensor:
        return self.patch.forward(x, base, layer)


def _add(tensors: Tensors, delta: Tensors, alpha: float) -> Tensors:
    """In place: tensors[role] += alpha·delta[role], for the roles the base has."""
    for role, change in delta.items():
        if role in tensors:
            tensors[role].add_(change, alpha=alpha)
    return tensors


class AdditivePatch(Patch):
    """A change ``W' = W + ΔW`` with ΔW independent of W: exact inverse by subtraction."""

    @abstractmethod
    def delta(self) -> Tensors: ...

    def add_scaled(self, tensors: Tensors, alpha: float) -> Tensors:
        return _add(tensors, self.delta(), alpha)

    def apply(self, tensors: Tensors) -> Tensors:
        return self.add_scaled(tensors, 1.0)

    def revert(self, tensors: Tensors) -> Tensors:
        return self.add_scaled(tensors, -1.0)

    def why_not_invertible(self) -> str | None:
        return None


@dataclass(frozen=True)
class Option:
    """A user choice a method understands, declared with it; the command line's options are made from these."""

    name: str  # the Python name (``task_id``); the command-line flag is ``--task-id``
    help: str
    type: type = bool  # int, or bool for a flag
    #: A boolean's negative flag (``experts-not-transposed``), where "not given" differs from "off".
    negative: str | None = None


@dataclass(frozen=True)
class Support:
    """One row of the support table (README, ``wsurgery methods``), declared next to the code it describes."""

    name: str  # what users call it, e.g. "DoRA (LoRA with use_dora)"
    layers: str  # e.g. "Linear, Conv1D, Embedding, Conv1d/2d/3d"
    merge: str  # "exact" or how it is done
    unmerge: str  # "exact", "approximate (...)" or "refused: <why>"
    peft_versions: str  # the PEFT releases the tests compare against


class Method(ABC):
    """A fine-tuning method: turns saved per-module tensors into patches."""

    #: ``peft_type`` values this method handles.
    peft_types: ClassVar[tuple[str, ...]] = ()
    #: The first key component of every per-module tensor this method saves (``lora_A``...).
    param_names: ClassVar[frozenset[str]] = frozenset()
    #: The first component (after ``base_model.``) of model-wide tensors it saves (``vera_A``...).
    shared_names: ClassVar[frozenset[str]] = frozenset()
    #: User options it understands (``task_id``...), passed through ``AdapterContext.options``.
    options: ClassVar[tuple[Option, ...]] = ()
    #: Rows for the support table.
    support: ClassVar[tuple[Support, ...]] = ()

    @property
    def option_names(self) -> frozenset[str]:
        return frozenset(o.name for o in self.options)

    @property
    def key_prefix(self) -> str | None:
        """The longest ``…_`` prefix all ``param_names`` share (``lora_``, ``vera_lambda_``: PEFT names every
        per-module tensor of a method with its tuner's prefix), or None. A key component that has it but is
        not a known name is a tensor this code does not know (a newer PEFT variant), never a module."""
        common = os.path.commonprefix(sorted(self.param_names))
        cut = common.rfind("_")
        return common[: cut + 1] if cut > 0 else None

    def check_config(self, config: AdapterConfig) -> None:
        """Refuse configs whose options this implementation does not cover, before any work."""

    @abstractmethod
    def patch(self, params: ModuleParams) -> Patch:
        """The patch for one module."""

    def summary(self, config: AdapterConfig) -> dict[str, Any]:
        """Method-wide facts for ``inspect`` (variant, scaling rule...)."""
        return {}


_REGISTRY: dict[str, Method] = {}
_NOT_MERGEABLE: dict[str, str] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available for its peft_types."""
    instance = cls()
    for peft_type in cls.peft_types:
        if peft_type in _REGISTRY:
            raise RuntimeError(f"two methods register peft_type {peft_type}")
        _REGISTRY[peft_type] = instance
    return cls


def register_not_mergeable(peft_type: str, reason: str) -> None:
    """Record a method that has no weight-space merge, with the reason shown to users."""
    _NOT_MERGEABLE[peft_type] = reason


def get_method(config: AdapterConfig) -> Method:
    peft_type = config.peft_type
    if peft_type in _NOT_MERGEABLE:
        raise UnsupportedError(f"{config.path}: {peft_type} cannot be merged into weights: {_NOT_MERGEABLE[peft_type]}")
    method = _REGISTRY.get(peft_type)
    if method is None:
        known = ", ".join(sorted(_REGISTRY))
        raise UnsupportedError(f"{config.path}: peft_type {peft_type!r} is not supported (supported: {known})")
    return method


def registered() -> dict[str, Method]:
    return dict(_REGISTRY)


def not_mergeable() -> dict[str, str]:
    return dict(_NOT_MERGEABLE)
