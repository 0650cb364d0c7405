"""FourierFT (``peft_type: FOURIERFT``): a sparse 2-D spectrum, brought to weight space by an inverse FFT.

For a layer whose change is ``(out, in)`` (Linear ``(out, in)``; transformers' Conv1D stores ``(in, out)``
and ``fan_in_fan_out`` says so, the change is then transposed):

* the ``n`` spectral positions are never saved: PEFT draws them with
  ``torch.randperm(out·in, generator=torch.Generator().manual_seed(random_loc_seed))[:n]``, row
  ``idx // in``, column ``idx % in``; we call exactly that (CPU generator, default int64), so the
  positions depend only on the seed, the layer shape and ``n`` (the length of ``fourierft_spectrum``);
* ``dense[rows, cols] = spectrum`` (float32), ``ΔW = Re(ifft2(dense)) · scaling`` (torch's default
  "backward" normalisation, ÷ out·in).

Additive, so unmerge subtracts the same ΔW exactly. ``n_frequency_pattern`` is matched the way
FourierFT does (``re.match(rf".*\\.{key}$", path)``, then the path itself as a key) and must agree
with the saved spectrum length, as PEFT itself would refuse to load it otherwise.

Linear or Conv1D: PEFT transposes the change per layer by its type and saves the ``fan_in_fan_out`` of the
last layer it wrapped, and nothing the adapter saves tells out from in (the positions are drawn for either
shape). The base tells it instead (:func:`layer_type`): transformers' Conv1D always has a bias as long as
its weight's second axis, an nn.Linear has none or one as long as the first. A square weight follows the
adapter's other modules (:class:`~.hira.Layout`), and is refused where they are of both types.

The positions come from torch's CPU ``randperm``: an adapter trained with a torch whose ``randperm``
draws differently would get other positions, which nothing in the files can reveal.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import torch

from ..errors import InputError, UnsupportedError
from .base import (AdapterContext, AdditivePatch, Method, ModuleParams, Patch, Shapes, Support, Tensors, like,
                   register)
from .hira import Layout
from .layers import Layer, Linear

if TYPE_CHECKING:  # adapters import methods; the config is only needed for type hints here
    from ..adapters.config import AdapterConfig


def frequency_indices(context: AdapterContext, seed: int, out: int, in_: int, n: int) -> tuple[torch.Tensor, ...]:
    """PEFT's ``randperm`` positions (rows, cols) for an ``(out, in)`` change, cached per adapter."""
    key = ("randperm_positions", seed, out, in_, n)
    hit = context.cache.get(key)
    if hit is None:
        idx = torch.randperm(out * in_, generator=torch.Generator().manual_seed(seed))[:n]
        hit = context.cache[key] = (idx // in_, idx % in_)
    return hit


def expected_n(config: AdapterConfig, module: str, rule: str) -> int | None:
    """``n_frequency`` for ``module`` from the config, by FourierFT's (``rule="fourierft"``) or the
    generic PEFT pattern rule; None where the config gives no number."""
    patterns = config.raw.get("n_frequency_pattern") or {}
    template = r".*\.{}$" if rule == "fourierft" else r"(.*\.)?({})$"
    try:
        key = next((k for k in patterns if re.match(template.format(k), module)), module)
    except re.error as e:
        raise InputError(f"{config.path}: n_frequency_pattern holds an invalid regular expression ({e})") from None
    n = patterns.get(key, config.raw.get("n_frequency"))
    return int(n) if isinstance(n, (int, float)) and not isinstance(n, bool) else None


def spectrum_of(params: ModuleParams, name: str, rule: str) -> torch.Tensor:
    """The saved 1-D spectrum, checked against the config's ``n_frequency(_pattern)``."""
    (spectrum,) = params.require(name)
    where = f"{params.config.path.parent}: module {params.module!r}"
    if spectrum.ndim != 1 or spectrum.numel() == 0 or not spectrum.is_floating_point():
        raise InputError(f"{where}: {name} must be a non-empty 1-D float tensor, got {list(spectrum.shape)} "
                         f"{spectrum.dtype}; the adapter file is damaged")
    if rule != "skip":
        n = expected_n(params.config, params.module, rule)
        if n is not None and n != spectrum.numel():
            raise InputError(f"{where}: {name} has {spectrum.numel()} entries but n_frequency/n_frequency_pattern "
                             f"in adapter_config.json give {n}; the adapter file and its config disagree")
    return spectrum


def layer_dims(module: str, shapes: Shapes, transposed: bool, n: int, method: str) -> tuple[int, int]:
    """``(out, in)`` of the change from the base weight's shape; refuses what PEFT refuses."""
    w = shapes["weight"]
    if len(w) != 2:
        raise InputError(f"{module}: {method} only applies to Linear and Conv1D layers (2-D weights), but the base "
                         f"weight is {list(w)}")
    out, in_ = (w[1], w[0]) if transposed else (w[0], w[1])
    if n > out * in_:
        raise InputError(f"{module}: the spectrum has {n} entries but the base weight {list(w)} has only "
                         f"{out * in_} positions; was the adapter trained on another model?")
    return out, in_


def layer_type(module: str, shapes: Shapes) -> bool | None:
    """True for transformers' Conv1D (weight stored (in, out)), False for nn.Linear, None where the shapes
    cannot tell (a square weight). Conv1D always has a bias of length out; nn.Linear none, or length out."""
    w, bias = tuple(shapes["weight"]), shapes.get("bias")
    if len(w) != 2 or w[0] == w[1]:
        return None
    if bias is None:
        return False
    if tuple(bias) in ((w[1],), (w[0],)):
        return tuple(bias) == (w[1],)
    raise InputError(f"{module}: the base bias {list(bias)} fits neither axis of the weight {list(w)}; is this "
                     "base the model the adapter was trained on?")


def config_seed(config: AdapterConfig) -> int:
    seed = config.raw.get("random_loc_seed", 777)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise InputError(f"{config.path}: random_loc_seed must be an integer (got {seed!r}); the spectral positions "
                         "are drawn from it and cannot be regenerated otherwise")
    return seed


class FourierFTPatch(AdditivePatch):
    """ΔW = Tf(Re(ifft2(dense spectrum)) · scaling)."""

    peeked_roles = ("bias",)  # the layer type (layer_type)

    def __init__(self, module: str, spectrum: torch.Tensor, scaling: float, seed: int, fan_in_fan_out: bool,
                 context: AdapterContext):
        super().__init__(module, ("weight",))
        self.spectrum, self.scaling, self.seed = spectrum, scaling, seed
        self.context, self.layout = context, Layout.of(context, "FourierFT", fan_in_fan_out)
        self._by_shape: bool | None = None  # Conv1D? as the base's shapes say (None: square)
        self.dims: tuple[int, int] | None = None  # (out, in), from the base shape in ``check``

    @property
    def transposed(self) -> bool:
        return self.layout.transposed(self.module, self._by_shape)

    def check(self, shapes: Shapes) -> None:
        self._by_shape = layer_type(self.module, shapes)
        self.layout.observe(self.module, self._by_shape)
        self.dims = layer_dims(self.module, shapes, self.transposed, self.spectrum.numel(), "FourierFT")

    def delta(self) -> Tensors:
        assert self.dims is not None  # derived from the shapes by bind()
        out, in_ = self.dims
        rows, cols = frequency_indices(self.context, self.seed, out, in_, self.spectrum.numel())
        dense = torch.zeros(out, in_, dtype=torch.float32)
        dense[rows, cols] = self.spectrum.to(torch.float32)
        d = torch.fft.ifft2(dense).real * self.scaling
        return {"weight": d.T if self.transposed else d}

    def layer(self, shapes: Shapes) -> Layer:
        return Linear(self.transposed)

    def forward(self, x: torch.Tensor, base: Tensors, layer: Layer) -> torch.Tensor:
        """PEFT's ``FourierFTLinear.forward`` adds ``F.linear(x, Re(ifft2(D))·s)``. Here on activations, without
        ΔW: since x is real, ``x·Re(ifft2(D))ᵀ = Re(ifft_out(D · ifft_in(x)))`` along the features, and D holds
        only n entries, so each frequency (k, l) carries ``ifft(x)[l]`` to output frequency k."""
        out, in_ = layer_dims(self.module, {"weight": tuple(base["weight"].shape)}, self.transposed,
                              self.spectrum.numel(), "FourierFT")
        rows, cols = frequency_indices(self.context, self.seed, out, in_, self.spectrum.numel())
        rows, cols = rows.to(x.device), cols.to(x.device)
        u = torch.fft.ifft(x.to(torch.complex64), dim=-1)  # (tokens, in)
        z = torch.zeros(x.shape[0], out, dtype=u.dtype, device=x.device)
        z.index_add_(1, rows, u[:, cols] * like(self.spectrum, x))
        return layer(x, base) + torch.fft.ifft(z, dim=-1).real * self.scaling


@register
class FourierFT(Method):
    peft_types = ("FOURIERFT",)
    param_names = frozenset({"fourierft_spectrum"})
    support = (Support("FourierFT (n_frequency_pattern; spectral positions regenerated from random_loc_seed)",
                       "Linear, Conv1D (fan_in_fan_out)", "exact", "exact", "0.21.2"),
               Support("FourierFT on Conv1D and Linear layers at once (each layer's type from the base's bias)",
                       "square weights among layers of both types", "refused: PEFT saves only the last wrapped "
                       "layer's fan_in_fan_out and a square weight's type is not in the files; merge with PEFT",
                       "-", "0.21.2"))

    def summary(self, config: AdapterConfig) -> dict[str, Any]:
        return {"scaling": float(config.get("scaling", 150.0)),
                "random_loc_seed": config.raw.get("random_loc_seed", 777),
                "fan_in_fan_out": bool(config.get("fan_in_fan_out", False)),
                "positions": f"regenerated with torch.randperm (CPU generator, torch {torch.__version__})"}

    def check_config(self, config: AdapterConfig) -> None:
        config_seed(config)
        scaling = config.get("scaling", 150.0)
        if not isinstance(scaling, (int, float)) or isinstance(scaling, bool):
            raise UnsupportedError(f"{config.path}: scaling must be a number, got {scaling!r}")

    def patch(self, params: ModuleParams) -> Patch:
        config = params.config
        spectrum = spectrum_of(params, "fourierft_spectrum", "fourierft")
        return FourierFTPatch(params.module, spectrum, float(config.get("scaling", 150.0)), config_seed(config),
                              bool(config.get("fan_in_fan_out", False)), params.context)
