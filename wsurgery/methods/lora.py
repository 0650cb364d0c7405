"""LoRA (``peft_type: LORA``) with rsLoRA, rank/alpha patterns, ``lora_bias`` and DoRA, on Linear,
transformers' Conv1D (``fan_in_fan_out``), Embedding and Conv1d/2d/3d; plus the layers and variants
that change where or how ΔW lands: ``nn.MultiheadAttention``, ``target_parameters`` (raw parameters,
fused MoE expert stacks), BD-LoRA (``use_bdlora``) and KaSA (``kasa_config``).

ΔW = s·B·A with s = α/r (α/√r with rsLoRA); r is read from the tensor shapes, α from
``alpha_pattern`` or ``lora_alpha``. DoRA renormalises each output feature of W + ΔW to the saved
magnitude, so its change depends on W and cannot be undone from the files.

* MultiheadAttention: ``<mha>.lora_A/B`` change ``in_proj_weight`` (3E, E) and
  ``<mha>.base_layer.out_proj.lora_A/B`` change ``out_proj.weight``, both with the MHA's own α. PEFT
  <= 0.21.2 adds the out_proj change twice (``MultiheadAttention.merge`` adds it, then calls
  ``out_proj.merge`` which adds it again; the unmerged forward merges the same way, so adapters were
  trained with it): we add it twice too, or once with the option ``mha_single_out_proj``.
* ``target_parameters``: ``<module>.lora_A/B`` (nested wrappers: ``<module>.base_layer[...].lora_A/B``)
  change a parameter of ``<module>`` named in ``target_parameters``. 2-D: ΔW = s·B·A. 3-D (E experts):
  A is (E·r, in) expert-major, B is (out, E·r) with the expert index fastest; the stack is laid out
  (E, out, in) or (E, in, out) depending on the PEFT release and the module's ``is_transposed`` (see
  ``_expert_layout``). Which saved wrapper belongs to which parameter, and the layout, are solved from
  the shapes; what the shapes leave open is refused rather than guessed.
* BD-LoRA: A (r, in/nb) or B (out, r/nb) hold nb diagonal blocks stacked vertically; they are
  expanded to the block-diagonal matrix and merged as LoRA.
* KaSA: ΔW = s·B·diag(lora_diag)·A, applied to the base *after* PEFT's destructive SVD truncation
  (drop the r smallest singular components, fp32 SVD); unmerge cannot restore the dropped part.
* VeLoRA, MonteCLoRA and MiCA change training only (VeLoRA compresses the activations its backward
  pass keeps, MonteCLoRA samples noise around A, MiCA initialises B from the base's minor singular
  vectors and freezes it): PEFT merges them as plain LoRA, and so does wsurgery. Their extra tensors
  (``lora_velora_embed``, ``lora_monteclora_sampler.*``) do not enter the merged weight.

``VARIANTS`` lists every variant PEFT can save, what turns it on, what it saves and where it is built;
a test compares it with PEFT's own registry so that a new variant is never mistaken for a module.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ..errors import InputError, UnsupportedError
from .base import (
    AdditivePatch,
    Method,
    ModuleParams,
    Option,
    Patch,
    Shapes,
    Support,
    Tensors,
    expect_shape,
    like,
    register,
)
from .hira import Layout
from .layers import Conv, Embedding, Layer, Linear, Matrices

if TYPE_CHECKING:  # adapters import methods; the config is only needed for type hints here
    from ..adapters.config import AdapterConfig

# Inits that modify the base weight at the start of training: the saved adapter is relative to a
# different W, unless PEFT converted it on save (then init_lora_weights is reset to True).
_BASE_MUTATING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


@dataclass(frozen=True)
class LoraVariant:
    """One of PEFT's LoRA variants: the layers PEFT builds it on, what it saves, and whether it merges."""

    name: str
    layers: tuple[str, ...]  # LoraPatch kinds: linear, conv1d_transposed (Conv1D), embedding, conv
    tensors: tuple[str, ...] = ()  # per-module tensors it saves besides LoRA's own (first key component)
    refused: str | None = None  # why PEFT cannot merge it either; None where it merges


_LINEAR = ("linear", "conv1d_transposed")  # PEFT's lora.Linear wraps nn.Linear and transformers' Conv1D
#: LoRA's own per-module tensors, saved by every variant.
PLAIN_TENSORS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")
#: Every LoRA variant of PEFT 0.21.2 by the LoraConfig field that turns it on (``mica``: the value of
#: ``init_lora_weights``). PEFT builds one variant per layer, never two together, and none on
#: nn.MultiheadAttention or raw parameters (``target_parameters``).
VARIANTS: dict[str, LoraVariant] = {
    "use_dora": LoraVariant("DoRA", (*_LINEAR, "embedding", "conv"), ("lora_magnitude_vector",)),
    "use_bdlora": LoraVariant("BD-LoRA", _LINEAR),
    "kasa_config": LoraVariant("KaSA", ("linear",), ("lora_diag",)),
    "velora_config": LoraVariant("VeLoRA", _LINEAR, ("lora_velora_embed",)),
    "monteclora_config": LoraVariant("MonteCLoRA", _LINEAR, ("lora_monteclora_sampler",)),
    "mica": LoraVariant("MiCA", (*_LINEAR, "embedding")),
    "alora_invocation_tokens": LoraVariant(
        "activated LoRA", _LINEAR,
        refused="activated LoRA only applies after its invocation tokens, which depends on the input"),
    "arrow_config": LoraVariant("Arrow", _LINEAR, ("lora_arrow",),
                                refused="Arrow routes each token between several LoRAs at run time"),
}
#: QA-LoRA (``use_qalora``) is a variant of PEFT's GPTQ layers only; on a plain nn.Linear PEFT ignores the flag.
_QALORA_REFUSED = "QA-LoRA's A acts on group-pooled inputs; PEFT cannot merge it either"
# Options this release does not cover; refusing beats a silently wrong merge.
_NOT_YET = {
    "layer_replication": "the merged model has more layers than the base (PEFT appends copies of layers that share "
                         "the base weights, and its merge adds every copy's change to the one shared tensor); "
                         "wsurgery writes exactly the base's tensors and cannot add or renumber layers",
}
_MHA_OUT = ".base_layer.out_proj"
_KIND_NAMES = {"linear": "nn.Linear", "conv1d_transposed": "transformers' Conv1D", "embedding": "nn.Embedding",
               "conv": "nn.Conv1d/2d/3d"}
#: The last PEFT release whose MultiheadAttention merge was checked (adds the out_proj change twice).
_MHA_CHECKED = (0, 21, 2)


def _variant_on(config: AdapterConfig, name: str) -> bool:
    """PEFT's test: the field is truthy, where any sub-config (even ``{}``) becomes a truthy dataclass."""
    if name == "mica":
        return config.raw.get("init_lora_weights") == "mica"
    value = config.raw.get(name)
    return isinstance(value, dict) or bool(value)


def active_variants(config: AdapterConfig) -> list[str]:
    """The ``VARIANTS`` keys this adapter's config turns on."""
    return [v for v in VARIANTS if _variant_on(config, v)]


def _scaling(config: AdapterConfig, alpha: float, rank: int) -> float:
    return alpha / math.sqrt(rank) if config.get("use_rslora", False) else alpha / rank


class LoraPatch(AdditivePatch):
    """ΔW = s·B·A in the layout the base stores (transposed for Conv1D, (V, d) for embeddings).

    ``role`` is the base tensor changed (``in_proj_weight`` for MultiheadAttention), ``factor`` how
    many times PEFT adds the weight change (2 for MultiheadAttention's out_proj in PEFT <= 0.21.2).
    With a ``layout``, a Linear-or-Conv1D change takes its layout from the base shape, as PEFT takes it
    from the layer type: PEFT saves the ``fan_in_fan_out`` of the last layer it wrapped, which is wrong
    for the Conv1D layers of a model whose targets include nn.Linear layers (GPT-2 with its lm_head).
    """

    def __init__(self, module: str, kind: str, A: torch.Tensor, B: torch.Tensor, alpha: float, scaling: float,
                 bias: torch.Tensor | None = None, *, role: str = "weight", factor: float = 1.0,
                 facts: dict[str, Any] | None = None, layout: Layout | None = None):
        super().__init__(module, (role, "bias") if bias is not None else (role,))
        self._kind, self.A, self.B, self.alpha, self.scaling, self.bias = kind, A, B, alpha, scaling, bias
        self.layout = layout if kind in _LINEAR else None
        self._by_shape: bool | None = None  # stored (in, out) like Conv1D, as the base shape says (None: square)
        self.role, self.factor, self.facts = role, factor, dict(facts or {})
        self.rank = A.shape[0]
        self.qalora_group: int | None = None  # use_qalora's group size: PEFT applies it on GPTQ layers only

    row_separable = True
    @property
    def kind(self) -> str:
        if self.layout is None:
            return self._kind
        return "conv1d_transposed" if self.layout.transposed(self.module, self._by_shape) else "linear"

    def weight_shape(self) -> tuple[int, ...]:
        A, B = self.A, self.B
        if self.kind == "embedding":  # A (r, V), B (d, r)
            return (A.shape[1], B.shape[0])
        if self.kind == "conv":  # A (r, in, k...), B (out, r, 1...)
            return (B.shape[0], *A.shape[1:])
        out_in = (B.shape[0], A.shape[1])
        return out_in[::-1] if self.kind == "conv1d_transposed" else out_in

    def check(self, shapes: Shapes) -> None:
        w = shapes[self.role]
        features = self.A.shape[1]  # lora_A's inputs
        out_in = (self.B.shape[0], features)
        if self.layout is not None and tuple(w) in (out_in, out_in[::-1]):
            self._by_shape = Layout.by_shape(w, *out_in)
            self.layout.observe(self.module, self._by_shape)
        if self.qalora_group and len(w) == 2 and w[0 if self.kind == "conv1d_transposed" else 1] == (
                features * self.qalora_group) != features:
            raise UnsupportedError(f"{self.module}: lora_A reads {features} = in_features/{self.qalora_group} "
                                   f"features, a QA-LoRA (use_qalora) layer: {_QALORA_REFUSED}")
        expect_shape(self.module, "the adapter's change", self.weight_shape(), w, what=self.role)
        if self.bias is not None and shapes.get("bias") != tuple(self.bias.shape):
            raise InputError(f"{self.module}: lora_B.bias is {list(self.bias.shape)} but the base bias is "
                             f"{list(shapes['bias']) if 'bias' in shapes else 'missing'}")

    def weight_delta(self) -> torch.Tensor:
        A = self.A.to(torch.float32)
        B = self.B.to(torch.float32)
        if self.kind == "conv":
            d = torch.einsum("or,ri...->oi...", B.flatten(1), A)
        else:
            d = B @ A
        d.mul_(self.scaling * self.factor)
        return d.T if self.kind in ("embedding", "conv1d_transposed") else d

    def delta(self) -> Tensors:
        d = {self.role: self.weight_delta()}
        if self.bias is not None:
            d["bias"] = self.bias.to(torch.float32) * self.scaling
        return d

    def add_scaled(self, tensors: Tensors, alpha: float) -> Tensors:
        """W += alpha·s·B·A as one ``addmm_`` into W: no dense ΔW is built (the merge's hot path)."""
        W = tensors[self.role]
        A, B = self.A.to(W.dtype), self.B.to(W.dtype)
        a = alpha * self.scaling * self.factor
        if self.kind == "conv":
            W.view(W.shape[0], -1).addmm_(B.flatten(1), A.flatten(1), alpha=a)
        elif self.kind in ("embedding", "conv1d_transposed"):  # W holds (B·A)ᵀ = Aᵀ·Bᵀ
            W.addmm_(A.T, B.T, alpha=a)
        else:
            W.addmm_(B, A, alpha=a)
        if self.bias is not None and "bias" in tensors:
            tensors["bias"].add_(self.bias.to(W.dtype) * self.scaling, alpha=alpha)
        return tensors

    def add_scaled_rows(self, role: str, rows: torch.Tensor, alpha: float, span: tuple[int, int]) -> None:
        start, stop = span
        if role == "bias":
            if self.bias is not None:
                rows.add_(self.bias[start:stop].to(rows.dtype) * self.scaling, alpha=alpha)
            return
        if role != self.role:
            return
        A, B = self.A.to(rows.dtype), self.B.to(rows.dtype)
        a = alpha * self.scaling * self.factor
        if self.kind == "conv":
            rows.view(rows.shape[0], -1).addmm_(B.flatten(1)[start:stop], A.flatten(1), alpha=a)
        elif self.kind in ("embedding", "conv1d_transposed"):  # rows of (B·A)ᵀ = Aᵀ·Bᵀ
            rows.addmm_(A.T[start:stop], B.T, alpha=a)
        else:
            rows.addmm_(B[start:stop], A, alpha=a)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "rank": self.rank, "alpha": self.alpha, "scaling": self.scaling, **self.facts}

    def layer(self, shapes: Shapes) -> Layer:
        if self.kind == "embedding":
            return Embedding(self.role)
        if self.kind == "conv":
            return Conv(self.role)
        return Linear(self.kind == "conv1d_transposed", self.role)

    def forward(self, x: torch.Tensor, base: Tensors, layer: Layer) -> torch.Tensor:
        """PEFT's ``base_layer(x) + lora_B(lora_A(x))·s`` (embedding: ``B(A[ids])`` with A (r, V))."""
        return layer(x, base) + self.adapter_path(x) * (self.scaling * self.factor)

    def adapter_path(self, x: torch.Tensor) -> torch.Tensor:
        """``lora_B(lora_A(x))`` without the scaling, as PEFT's LoRA layers compute it."""
        A, B = like(self.A, x), like(self.B, x)
        if self.kind == "embedding":
            return A.T[x] @ B.T
        if self.kind == "conv":
            conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[A.dim()]
            y = conv(conv(x, A), B)
        else:
            y = x @ A.T @ B.T
        if self.bias is not None:
            y = y + like(self.bias, x).view(-1, *([1] * (y.dim() - 2)))
        return y


class DoraPatch(Patch):
    """W' = m / ‖W + ΔW‖ · (W + ΔW), the norm taken per output feature."""

    def __init__(self, lora: LoraPatch, magnitude: torch.Tensor):
        super().__init__(lora.module, ("weight",))
        self.lora = lora
        self.magnitude = magnitude

    def check(self, shapes: Shapes) -> None:
        self.lora.check(shapes)
        w = self.lora.weight_shape()
        features = w[1] if self.lora.kind in ("embedding", "conv1d_transposed") else w[0]
        if self.magnitude.numel() != features:
            raise InputError(f"{self.module}: lora_magnitude_vector has {self.magnitude.numel()} entries, "
                             f"expected {features} (one per output feature)")

    def apply(self, tensors: Tensors) -> Tensors:
        V = tensors["weight"].add_(self.lora.weight_delta())
        m = self.magnitude.to(V.dtype).flatten()
        if self.lora.kind in ("embedding", "conv1d_transposed"):  # features are columns
            return {"weight": V.mul_((m / torch.linalg.norm(V, dim=0))[None, :])}
        factor = m / torch.linalg.norm(V.flatten(1), dim=1)
        return {"weight": V.mul_(factor.view(-1, *([1] * (V.ndim - 1))))}

    def layer(self, shapes: Shapes) -> Layer:
        return self.lora.layer(shapes)

    def forward(self, x: torch.Tensor, base: Tensors, layer: Layer) -> torch.Tensor:
        """PEFT's DoRA at inference: ``m/‖W + s·BA‖ · (W x) + m/‖W + s·BA‖ · s·B A x`` per output feature;
        the norm is taken of the composed weight, the rest runs on activations."""
        lora = self.lora
        W = base["weight"]
        A, B = like(lora.A, W), like(lora.B, W)
        s = lora.scaling * lora.factor
        m = like(self.magnitude, W).flatten()
        if lora.kind == "conv":
            composed = W.flatten(1) + s * (B.flatten(1) @ A.flatten(1))
            norm = torch.linalg.norm(composed, dim=1)
        elif lora.kind in ("embedding", "conv1d_transposed"):
            norm = torch.linalg.norm(W + s * (A.T @ B.T), dim=0)
        else:
            norm = torch.linalg.norm(W + s * (B @ A), dim=1)
        y = layer(x, {"weight": W}) + lora.adapter_path(x) * s
        if lora.bias is not None:  # lora_B's bias is part of the adapter path above, outside the norm
            y = y - like(lora.bias, W).view(-1, *([1] * (y.dim() - 2))) * s
        shape = (-1, *([1] * (y.dim() - 2)))
        y = y * (m / norm).view(shape)
        if "bias" in base:
            y = y + base["bias"].view(shape)
        return y

    def why_not_invertible(self) -> str | None:
        return ("DoRA rescales every output feature of W+ΔW to the saved magnitude; the files keep the "
                "magnitude but not the norm of W+ΔW, so W cannot be recovered. Keep the base checkpoint "
                "and merge from it again instead")

    def describe(self) -> dict[str, Any]:
        return {**self.lora.describe(), "dora": True}


class KasaPatch(Patch):
    """KaSA: W' = truncate(W) + s·B·diag(lora_diag)·A (+ s·lora_B.bias), Linear only.

    PEFT replaces the base weight by its rank-(k − r) SVD approximation (k = min(out, in), fp32 SVD,
    the r smallest singular components dropped) when it creates the layer, before training; the
    adapter is relative to that truncated weight, so the merge truncates too.
    """

    def __init__(self, module: str, A: torch.Tensor, B: torch.Tensor, diag: torch.Tensor, alpha: float,
                 scaling: float, bias: torch.Tensor | None = None):
        super().__init__(module, ("weight", "bias") if bias is not None else ("weight",))
        self.A, self.B, self.diag, self.alpha, self.scaling, self.bias = A, B, diag, alpha, scaling, bias
        self.rank = A.shape[0]

    def check(self, shapes: Shapes) -> None:
        want = (self.B.shape[0], self.A.shape[1])
        if shapes["weight"] != want:
            raise InputError(f"{self.module}: the adapter's change has shape {list(want)} but the base weight is "
                             f"{list(shapes['weight'])}; was the adapter trained on another model?")
        if self.rank >= min(want):
            raise InputError(f"{self.module}: KaSA rank {self.rank} must be below min(out, in) = {min(want)}; PEFT "
                             "refuses this layer too")
        if self.bias is not None and shapes.get("bias") != tuple(self.bias.shape):
            raise InputError(f"{self.module}: lora_B.bias is {list(self.bias.shape)} but the base bias is "
                             f"{list(shapes['bias']) if 'bias' in shapes else 'missing'}")

    def weight_delta(self) -> torch.Tensor:
        B = self.B.to(torch.float32) * self.diag.to(torch.float32)
        return (B @ self.A.to(torch.float32)).mul_(self.scaling)

    def apply(self, tensors: Tensors) -> Tensors:
        W = tensors["weight"]
        # PEFT: torch.linalg.svd of the fp32 weight, keep the largest k − r components, (U·S)·Vh.
        U, S, Vh = torch.linalg.svd(W.to(torch.float32), full_matrices=False)
        keep = min(W.shape) - self.rank
        truncated = (U[:, :keep] * S[:keep]) @ Vh[:keep, :]
        del U, S, Vh
        out = {"weight": W.copy_(truncated.to(W.dtype)).add_(self.weight_delta())}
        if self.bias is not None:
            out["bias"] = tensors["bias"].add_(self.bias.to(torch.float32), alpha=self.scaling)
        return out

    def layer(self, shapes: Shapes) -> Layer:
        return Linear()

    def forward(self, x: torch.Tensor, base: Tensors, layer: Layer) -> torch.Tensor:
        """PEFT's KaSA forward: the base layer over the truncated weight, written as PEFT's deferred-truncation
        forward corrects an untruncated one (minus ``x·Vh_dᵀ·(U_d·S_d)ᵀ``, the r dropped components of the fp32
        SVD), plus ``lora_B(lora_A(x)·lora_diag)·s`` (lora_B's bias included)."""
        W = base["weight"]
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        keep = min(W.shape) - self.rank
        dropped = (x @ Vh[keep:].T) @ (U[:, keep:] * S[keep:]).T
        A, B, diag = like(self.A, x), like(self.B, x), like(self.diag, x)
        adapter = ((x @ A.T) * diag) @ B.T
        if self.bias is not None:
            adapter = adapter + like(self.bias, x)
        return layer(x, base) - dropped + adapter * self.scaling

    def why_not_invertible(self) -> str | None:
        return ("KaSA truncated the base weight by SVD (dropping its r smallest singular components) before "
                "training; those components are not in the adapter files, so unmerging could only return to the "
                "truncated weight, not the original. Keep the base checkpoint and merge from it again instead")

    def describe(self) -> dict[str, Any]:
        return {"kind": "linear", "variant": "kasa", "rank": self.rank, "alpha": self.alpha, "scaling": self.scaling,
                "base_truncation": f"SVD, the {self.rank} smallest singular components dropped"}


def _expert_layout(version: tuple[int, ...] | None, transposed: bool) -> str:
    """How PEFT lays out a 3-D (E, ·, ·) parameter's change: "oi" = (E, out, in), "io" = (E, in, out).

    PEFT <= 0.18 always read the stack as (E, in, out). 0.19.0 swapped to (E, out, in) when the module
    had ``is_transposed=True`` (backwards); 0.19.1 and later use (E, out, in) unless ``is_transposed``
    (transformers' GPT-OSS, Aria), which is what the experts kernels assume. No ``peft_version`` in
    the config means PEFT <= 0.17.
    """
    if version is None or version < (0, 19, 0):
        return "io"
    if version[:3] == (0, 19, 0):
        return "oi" if transposed else "io"
    return "io" if transposed else "oi"


def _layout_name(layout: str, ndim: int) -> str:
    if ndim == 2:
        return "(out, in)"
    return "(E, out, in)" if layout == "oi" else "(E, in, out)"


def _fits(A: tuple[int, ...], B: tuple[int, ...], shape: tuple[int, ...], version, transposed: bool) -> str | None:
    """The layout in which a wrapper with factors of shapes A, B changes a parameter of ``shape``, or None."""
    if len(A) != 2 or len(B) != 2 or A[0] != B[1]:
        return None
    if len(shape) == 2:
        return "oi" if shape == (B[0], A[1]) else None
    if len(shape) != 3 or shape[0] == 0 or A[0] % shape[0]:
        return None
    if shape[0] == 1:  # one expert: PEFT adds B·A as it is (broadcast over the expert axis)
        layout = "oi"
    else:
        layout = _expert_layout(version, transposed)
    want = (B[0], A[1]) if layout == "oi" else (A[1], B[0])
    return layout if shape[1:] == want else None


class ParamLoraPatch(AdditivePatch):
    """LoRA on a raw parameter (``target_parameters``): one PEFT ``ParamWrapper``.

    Several wrappers on one module are nested (``<m>.lora_A``, ``<m>.base_layer.lora_A``...), in the
    order the module registers its parameters, which the files do not record; ``check`` solves which
    wrapper changes which parameter from the shapes, jointly for all wrappers of the module.
    """

    def __init__(self, module: str, depth: int, A: torch.Tensor, B: torch.Tensor, candidates: tuple[str, ...],
                 params: ModuleParams):
        super().__init__(module, (), candidates)
        self.depth, self.A, self.B, self.candidates = depth, A, B, candidates
        self.config, self.context = params.config, params.context
        self.where = f"{params.config.path.parent}: module {params.module!r}"
        group = params.context.cache.setdefault("lora_param_wrappers", {}).setdefault(module, {})
        group[depth] = (tuple(A.shape), tuple(B.shape))
        self.param: str | None = None
        self.layout = "oi"
        self.experts = 1
        self.ndim = 2
        self.rank = A.shape[0]
        self.alpha = self.scaling = 0.0  # set by check(), as param is
        self.transposed_from: str | None = None

    def _solve(self, shapes: Shapes) -> dict[int, tuple[str, str]]:
        """{depth: (parameter, layout)} for every wrapper of this module, or raise if not unique."""
        group: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = \
            self.context.cache["lora_param_wrappers"][self.module]
        depths = sorted(group)
        present = [c for c in self.candidates if c in shapes]
        listed = ", ".join(f"{c} {list(shapes[c])}" for c in present) or "none of " + ", ".join(self.candidates)
        saved = "; ".join(f"lora_A {list(group[d][0])}, lora_B {list(group[d][1])}" for d in depths)
        if len(present) != len(depths):
            raise InputError(f"{self.where}: the adapter holds {len(depths)} LoRA(s) for raw parameters of "
                             f"{self.module} but target_parameters names {len(present)} that the base has ({listed})")
        version = self.config.peft_version
        option = self.context.options.get("experts_transposed")
        by_transposed: dict[bool, set[tuple[tuple[str, str], ...]]] = {}
        for transposed in ((False, True) if option is None else (bool(option),)):
            found = by_transposed.setdefault(transposed, set())
            for perm in itertools.permutations(present):
                layouts = [_fits(*group[d], shapes[p], version, transposed) for d, p in zip(depths, perm)]
                fitted = [layout for layout in layouts if layout is not None]
                if len(fitted) == len(layouts):
                    found.add(tuple(zip(perm, fitted)))
        solutions = set().union(*by_transposed.values())
        release = ".".join(map(str, version)) if version else "<= 0.17"
        if not solutions:
            raise InputError(f"{self.where}: the saved LoRA factors ({saved}) fit none of the targeted base "
                             f"parameters ({listed}) as PEFT {release} lays them out; was the adapter trained on "
                             "another model?")
        if any(len(found) > 1 for found in by_transposed.values()):
            raise UnsupportedError(
                f"{self.where}: the saved LoRA factors ({saved}) fit the base parameters ({listed}) in more than one "
                "way: PEFT nests one wrapper per parameter in the module's parameter registration order, which the "
                "files do not record, and these shapes cannot tell the wrappers apart")
        if len(solutions) > 1:
            raise UnsupportedError(
                f"{self.where}: the saved LoRA factors ({saved}) fit the square expert stack(s) ({listed}) in more "
                f"than one way: PEFT {release} lays a stack out as (E, out, in) or (E, in, out) "
                "depending on the model class's is_transposed (True for GPT-OSS and Aria), which the files do not "
                "record. Pass the option experts_transposed=True or False")
        (sol,) = solutions
        stacked = any(len(shapes[p]) == 3 and shapes[p][0] > 1 for p, _ in sol)
        if stacked and version is not None and version >= (0, 19, 0):
            if option is not None:
                self.transposed_from = f"is_transposed={bool(option)}, from the option experts_transposed"
            elif sum(sol in found for found in by_transposed.values()) == 1:
                transposed = next(t for t, found in by_transposed.items() if sol in found)
                self.transposed_from = f"is_transposed={transposed}, read from the shapes"
        return dict(zip(depths, sol))

    def check(self, shapes: Shapes) -> None:
        self.param, self.layout = self._solve(shapes)[self.depth]
        shape = shapes[self.param]
        self.ndim = len(shape)
        self.experts = shape[0] if self.ndim == 3 else 1
        self.rank = self.A.shape[0] // self.experts
        key = f"{self.module}.{self.param}"  # PEFT matches alpha_pattern against the parameter's full name
        a = self.config.pattern("alpha_pattern", key)
        self.alpha = float(a if a is not None else self.config.get("lora_alpha", 8))
        self.scaling = _scaling(self.config, self.alpha, self.rank)

    def delta(self) -> Tensors:
        assert self.param is not None  # derived from the shapes by bind()
        A = self.A.to(torch.float32)
        B = self.B.to(torch.float32)
        if self.ndim == 2 or self.experts == 1:
            d = B @ A
            if self.ndim == 3:
                d = d.unsqueeze(0)
        else:
            E = self.experts
            A3 = A.reshape(E, -1, A.shape[-1])  # (E, r, in): expert-major rows
            B3 = B.reshape(B.shape[0], -1, E)  # (out, r, E): expert index fastest in B's columns
            d = torch.einsum("ore,eri->eoi" if self.layout == "oi" else "ore,eri->eio", B3, A3)
        return {self.param: d.mul_(self.scaling)}

    row_separable = True

    def add_scaled_rows(self, role: str, rows: torch.Tensor, alpha: float, span: tuple[int, int]) -> None:
        """Rows of a 2-D parameter, or experts of a stack (``delta``'s arithmetic on a slice of them)."""
        if role != self.param:
            return
        start, stop = span
        A, B = self.A.to(torch.float32), self.B.to(torch.float32)
        if self.ndim == 2:
            d = B[start:stop] @ A
        elif self.experts == 1:
            d = (B @ A).unsqueeze(0)[start:stop]
        else:
            E = self.experts
            A3 = A.reshape(E, -1, A.shape[-1])[start:stop]
            B3 = B.reshape(B.shape[0], -1, E)[:, :, start:stop]
            d = torch.einsum("ore,eri->eoi" if self.layout == "oi" else "ore,eri->eio", B3, A3)
        rows.add_(d.mul_(self.scaling), alpha=alpha)

    def layer(self, shapes: Shapes) -> Layer:
        """Every targeted parameter of the module (the first wrapper's layer is shared by all of them)."""
        solution = self._solve(shapes)
        params = [solution[depth] for depth in sorted(solution)]
        return Matrices(tuple(p for p, _ in params), tuple(layout == "io" for _, layout in params))

    def forward(self, x: torch.Tensor, base: Tensors, layer: Layer) -> torch.Tensor:
        """PEFT runs the module over ``W + s·lhs@rhs`` per expert (``_LoraFactorsProxy``); on activations that is
        ``s·(x·A_eᵀ)·B_eᵀ`` with A_e = A's e-th block of rows and B_e = B's columns of expert e (index fastest),
        whichever way the stack is laid out: the layout only decides how the layer reads W."""
        if not isinstance(layer, Matrices) or self.param not in layer.roles:
            raise UnsupportedError(f"{self.module}: LoRA on {self.param} stacked with another kind of change")
        A, B = like(self.A, x), like(self.B, x)
        A3 = A.reshape(self.experts, -1, A.shape[-1])  # (E, r, in)
        B3 = B.reshape(B.shape[0], -1, self.experts)  # (out, r, E)
        h = torch.einsum("ti,eri->ter", x[:, : A.shape[-1]], A3)
        adapter = torch.einsum("ter,ore->teo", h, B3).reshape(x.shape[0], -1) * self.scaling
        return torch.cat([layer.part(x, base[r], f) + (adapter if r == self.param else 0)
                          for r, f in zip(layer.roles, layer.in_first)], dim=-1)

    def describe(self) -> dict[str, Any]:
        facts: dict[str, Any] = {"kind": "parameter (target_parameters)", "wrapper_depth": self.depth}
        if self.param is None:  # before check(): the base shapes decide
            facts["parameter"] = " or ".join(f"{self.module}.{c}" for c in self.candidates)
            facts["rank_x_experts"] = self.A.shape[0]
        else:
            facts.update({"parameter": f"{self.module}.{self.param}", "layout": _layout_name(self.layout, self.ndim),
                          "experts": self.experts, "rank": self.rank, "alpha": self.alpha, "scaling": self.scaling})
            if self.transposed_from:
                facts["expert_layout_from"] = self.transposed_from
        return facts


def _targeted_parameters(config: AdapterConfig, module: str) -> tuple[str, ...]:
    """Parameter names of ``module`` that ``target_parameters`` selects (PEFT's suffix rule on ``module.param``)."""
    names = []
    for target in config.get("target_parameters") or []:
        param = str(target).rpartition(".")[2]
        key = f"{module}.{param}"
        if key == target or key.endswith("." + str(target)):
            names.append(param)
    return tuple(dict.fromkeys(names))


def _block_diagonal(M: torch.Tensor, nblocks: int, what: str, where: str) -> torch.Tensor:
    if M.shape[0] % nblocks:
        raise InputError(f"{where}: BD-LoRA {what} has {M.shape[0]} rows, not divisible into nblocks={nblocks}")
    return torch.block_diag(*torch.chunk(M, nblocks, dim=0))


@register
class Lora(Method):
    peft_types = ("LORA",)
    param_names = frozenset(PLAIN_TENSORS).union(*(v.tensors for v in VARIANTS.values()))
    options = (
        Option("mha_single_out_proj", "LoRA on nn.MultiheadAttention: add the out_proj change once (PEFT adds it "
               "twice)."),
        Option("experts_transposed", "LoRA on square fused-expert stacks (PEFT >= 0.19): the stack is stored (E, in, "
               "out) / (E, out, in); needed only where the files cannot tell.", negative="experts-not-transposed"),
    )
    support = (
        Support("LoRA (incl. rsLoRA, rank/alpha patterns, lora_bias, trainable_token_indices)",
                "Linear, Conv1D (fan_in_fan_out), Embedding, Conv1d/2d/3d", "exact", "exact", "0.21.2"),
        Support("DoRA (LoRA with use_dora)", "Linear, Conv1D, Embedding, Conv1d/2d/3d", "exact",
                "refused: the norm of W+ΔW is not in the files", "0.21.2"),
        Support("LoRA on nn.MultiheadAttention", "in_proj_weight, out_proj.weight (+ lora_bias on out_proj)",
                "exact; out_proj change added twice as PEFT <= 0.21.2 does (once with --mha-single-out-proj)",
                "exact", "0.21.2"),
        Support("LoRA target_parameters (raw nn.Parameter, fused MoE experts)",
                "2-D and 3-D (E, out, in) / is_transposed (E, in, out) parameters, nested wrappers",
                "exact; both fused-expert layouts (PEFT <= 0.18 / 0.19.0 / >= 0.19.1) by peft_version",
                "exact", "0.17.1, 0.18.1, 0.19.0, 0.21.2"),
        Support("BD-LoRA (LoRA with use_bdlora)", "Linear", "exact", "exact", "0.21.2"),
        Support("KaSA (LoRA with kasa_config)", "Linear", "exact (incl. PEFT's SVD truncation of the base)",
                "refused: the SVD truncation dropped base components that are not in the files", "0.21.2"),
        Support("VeLoRA, MonteCLoRA (LoRA with velora_config, monteclora_config)", "Linear, Conv1D",
                "exact (plain LoRA: their extra tensors only act in training)", "exact", "0.21.2"),
        Support("MiCA (LoRA with init_lora_weights=\"mica\")", "Linear, Conv1D, Embedding", "exact (plain LoRA)",
                "exact", "0.21.2"),
    )

    def check_config(self, config: AdapterConfig) -> None:
        variants = active_variants(config)
        for option in variants:
            reason = VARIANTS[option].refused
            if reason is not None:
                raise UnsupportedError(f"{config.path}: LoRA with {option} cannot be merged into weights: {reason}")
        for option, reason in _NOT_YET.items():
            if config.get(option):
                raise UnsupportedError(f"{config.path}: LoRA with {option} is not supported: {reason}")
        if len(variants) > 1:
            raise UnsupportedError(f"{config.path}: LoRA with both {variants[0]} and {variants[1]} is not a "
                                   "combination PEFT can build")
        init = config.get("init_lora_weights", True)
        if isinstance(init, str) and init.startswith(_BASE_MUTATING_INITS):
            raise UnsupportedError(
                f"{config.path}: init_lora_weights={init!r} changed the base weights before training, so this "
                "adapter does not apply to the original base; re-save it with PEFT's "
                "save_pretrained(..., path_initial_model_for_weight_conversion=...) to get a plain LoRA"
            )

    def summary(self, config: AdapterConfig) -> dict[str, Any]:
        facts: dict[str, Any] = {
            "scaling_rule": "lora_alpha/sqrt(r)" if config.get("use_rslora", False) else "lora_alpha/r",
            "dora": _variant_on(config, "use_dora"),
            "fan_in_fan_out": bool(config.get("fan_in_fan_out", False)),
            "lora_bias": bool(config.get("lora_bias", False)),
        }
        if _variant_on(config, "use_bdlora"):
            facts["bdlora"] = dict(config.raw["use_bdlora"]) if isinstance(config.raw["use_bdlora"], dict) else True
        if _variant_on(config, "kasa_config"):
            facts["kasa"] = "base truncated by SVD before ΔW = s·B·diag(lora_diag)·A"
        for option in ("velora_config", "monteclora_config", "mica"):
            if _variant_on(config, option):
                facts["variant"] = f"{VARIANTS[option].name}: merged as plain LoRA (it only changes training)"
        if config.get("target_parameters"):
            facts["target_parameters"] = list(config.get("target_parameters"))
        return facts

    def alpha(self, config: AdapterConfig, module: str) -> float:
        a = config.pattern("alpha_pattern", module)
        return float(a if a is not None else config.get("lora_alpha", 8))

    def patch(self, params: ModuleParams) -> Patch:
        config, t, module = params.config, params.tensors, params.module
        where = f"{config.path.parent}: module {module!r}"
        parts = module.split(".")
        plain = ".".join(p for p in parts if p != "base_layer")  # the module as the base names it
        targeted = _targeted_parameters(config, plain) if config.get("target_parameters") else ()
        if targeted and "lora_A.weight" in t:
            return self._param_patch(params, plain, targeted, where)
        if module.endswith(_MHA_OUT):
            return self._mha_patch(params, module[: -len(_MHA_OUT)], out_proj=True)
        if module + _MHA_OUT in params.context.modules:
            return self._mha_patch(params, module, out_proj=False)
        if "base_layer" in parts:
            raise InputError(f"{where}: a LoRA inside another wrapper ('base_layer'), which is neither "
                             "MultiheadAttention's out_proj nor a parameter named in target_parameters")

        if "lora_embedding_A" in t or "lora_embedding_B" in t:
            A, B = params.require("lora_embedding_A", "lora_embedding_B")
            kind = "embedding"
        else:
            A, B = params.require("lora_A.weight", "lora_B.weight")
            if A.ndim > 2:
                kind = "conv"
            elif config.get("fan_in_fan_out", False):
                kind = "conv1d_transposed"
            else:
                kind = "linear"
        variants = self._check_variant(params, kind, where)
        facts: dict[str, Any] = {}
        if "use_bdlora" in variants:
            A, B, facts = self._bdlora(config, module, kind, A, B, where)
        rank = A.shape[0]
        if rank == 0 or B.shape[-1 if kind == "embedding" else 1] != rank:
            raise InputError(f"{config.path.parent}: module {module!r}: lora_A has rank {rank} but lora_B "
                             f"has shape {list(B.shape)}; the adapter file is inconsistent")
        alpha = self.alpha(config, module)
        scaling = _scaling(config, alpha, rank)
        if "kasa_config" in variants:
            return self._kasa_patch(params, kind, A, B, alpha, scaling, where)
        for name in (*VARIANTS["velora_config"].tensors, *VARIANTS["monteclora_config"].tensors):
            # Training-only state: read (so that the loader knows it was seen), not merged, as in PEFT.
            for key in [k for k in t if k.split(".")[0] == name]:
                t.get(key)
        layout = Layout.of(params.context, "LoRA", bool(config.get("fan_in_fan_out", False)))
        lora = LoraPatch(module, kind, A, B, alpha, scaling, t.get("lora_B.bias"), facts=facts, layout=layout)
        if config.get("use_qalora", False) and kind in _LINEAR:
            lora.qalora_group = int(config.get("qalora_group_size", 16))
        if "use_dora" in variants:
            magnitude = t.get("lora_magnitude_vector", t.get("lora_magnitude_vector.weight"))
            if magnitude is None:
                (magnitude,) = params.require("lora_magnitude_vector")  # raises: it is missing
            if lora.bias is not None:
                raise UnsupportedError(f"{module}: DoRA with lora_bias is not a valid PEFT configuration")
            return DoraPatch(lora, magnitude)
        return lora

    # -- variants and special layers ---------------------------------------------------------------
    @staticmethod
    def _check_variant(params: ModuleParams, kind: str, where: str) -> list[str]:
        """The config's active variants, after refusing a variant on a layer PEFT does not build it on, and
        a variant's tensors under a config that does not turn it on (PEFT would not load them)."""
        config, t = params.config, params.tensors
        variants = active_variants(config)
        for option in variants:
            v = VARIANTS[option]
            if kind not in v.layers:
                layers = ", ".join(_KIND_NAMES[k] for k in v.layers)
                raise UnsupportedError(f"{where}: {v.name} ({option}) on {_KIND_NAMES[kind]}; PEFT builds it only "
                                       f"on {layers}")
        for option, v in VARIANTS.items():
            saved = [k for k in t if k.split(".")[0] in v.tensors]
            if saved and option not in variants:
                raise InputError(f"{where}: the adapter holds {saved[0]} ({v.name}) but its config has no {option}; "
                                 "the adapter file and its config disagree")
        return variants

    @staticmethod
    def _refuse_variants(config: AdapterConfig, t: dict, where: str, layer: str) -> None:
        """PEFT builds no variant on MultiheadAttention and raw parameters."""
        for option in active_variants(config):
            raise UnsupportedError(f"{where}: LoRA with {option} ({VARIANTS[option].name}) on {layer} is not a "
                                   "combination PEFT can build")
        for name in t:
            if name.split(".")[0] not in PLAIN_TENSORS:
                raise UnsupportedError(f"{where}: {name} on {layer}; PEFT has no such variant there")

    def _mha_patch(self, params: ModuleParams, mha: str, out_proj: bool) -> Patch:
        config, t = params.config, params.tensors
        where = f"{config.path.parent}: module {params.module!r}"
        self._refuse_variants(config, t, where, "nn.MultiheadAttention")
        A, B = params.require("lora_A.weight", "lora_B.weight")
        rank = A.shape[0]
        if rank == 0 or A.ndim != 2 or B.ndim != 2 or B.shape[1] != rank:
            raise InputError(f"{where}: lora_A {list(A.shape)} and lora_B {list(B.shape)} do not form a LoRA pair")
        alpha = self.alpha(config, mha)  # out_proj's LoRA is created with the MultiheadAttention's r and α
        scaling = _scaling(config, alpha, rank)
        facts: dict[str, Any] = {"layer": "nn.MultiheadAttention"}
        bias = t.get("lora_B.bias")
        if not out_proj:
            facts["changes"] = "in_proj_weight"
            patch = LoraPatch(mha, "linear", A, B, alpha, scaling, role="in_proj_weight", facts=facts)
            if bias is not None and bool(bias.any()):
                # MultiheadAttention.merge and its forward use only the in_proj weight change: PEFT never adds
                # this bias (it stays at its zero init in training); adding it would differ from PEFT.
                patch.notes.append("lora_B.bias for in_proj is ignored, as PEFT's MultiheadAttention ignores it "
                                   "(in merge and forward)")
                patch.facts["in_proj_lora_bias"] = "ignored, as in PEFT"
            return patch
        single = bool(params.context.options.get("mha_single_out_proj", False))
        factor = 1.0 if single else 2.0
        facts["changes"] = "out_proj.weight" + (", out_proj.bias" if bias is not None else "")
        facts["out_proj_factor"] = int(factor)
        facts["out_proj_rule"] = (
            "W + 1·ΔW (option mha_single_out_proj; PEFT <= 0.21.2 adds it twice)" if single else
            "W + 2·ΔW, as PEFT <= 0.21.2 merges (and trains) it; --mha-single-out-proj adds it once")
        patch = LoraPatch(f"{mha}.out_proj", "linear", A, B, alpha, scaling, bias, factor=factor, facts=facts)
        version = config.peft_version
        if not single and version is not None and version > _MHA_CHECKED:
            patch.notes.append(
                f"saved by PEFT {'.'.join(map(str, version))}, newer than {'.'.join(map(str, _MHA_CHECKED))}: the "
                "out_proj change was added twice as PEFT <= 0.21.2 does; if that release fixed it (PEFT PR #3774), "
                "merge again with --mha-single-out-proj")
        return patch

    def _param_patch(self, params: ModuleParams, plain: str, targeted: tuple[str, ...], where: str) -> Patch:
        config, t = params.config, params.tensors
        self._refuse_variants(config, t, where, "a raw parameter (target_parameters)")
        for option in ("fan_in_fan_out", "lora_bias"):
            if config.get(option):
                raise UnsupportedError(f"{where}: {option} with target_parameters; PEFT refuses this combination")
        if "lora_B.bias" in t:
            raise UnsupportedError(f"{where}: lora_B.bias on a raw parameter; PEFT has no bias there")
        A, B = params.require("lora_A.weight", "lora_B.weight")
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] == 0 or B.shape[1] != A.shape[0]:
            raise InputError(f"{where}: lora_A {list(A.shape)} and lora_B {list(B.shape)} do not form a LoRA pair")
        depth = params.module.split(".").count("base_layer")
        return ParamLoraPatch(plain, depth, A, B, targeted, params)

    @staticmethod
    def _bdlora(config: AdapterConfig, module: str, kind: str, A: torch.Tensor, B: torch.Tensor,
                where: str) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """Expand BD-LoRA's stacked diagonal blocks of A or B to the full block-diagonal matrix."""
        bd = config.raw["use_bdlora"] if isinstance(config.raw["use_bdlora"], dict) else {}
        on_a = any(p in module for p in bd.get("target_modules_bd_a") or [])
        on_b = any(p in module for p in bd.get("target_modules_bd_b") or [])
        nblocks = int(bd.get("nblocks", 1) or 1)
        if on_a and on_b:
            raise UnsupportedError(f"{where}: matches both BD-LoRA A and B patterns; PEFT refuses this")
        if not (on_a or on_b):
            if bd.get("match_strict", True):
                raise UnsupportedError(f"{where}: matches neither BD-LoRA pattern while match_strict is set; PEFT "
                                       "refuses this")
            return A, B, {"bdlora": "none (plain LoRA)"}
        if on_a:
            return _block_diagonal(A, nblocks, "lora_A", where), B, {"bdlora": f"A block-diagonal, {nblocks} blocks"}
        return A, _block_diagonal(B, nblocks, "lora_B", where), {"bdlora": f"B block-diagonal, {nblocks} blocks"}

    @staticmethod
    def _kasa_patch(params: ModuleParams, kind: str, A: torch.Tensor, B: torch.Tensor, alpha: float,
                    scaling: float, where: str) -> Patch:
        (diag,) = params.require("lora_diag")
        if diag.numel() != A.shape[0]:
            raise InputError(f"{where}: lora_diag has {diag.numel()} entries but the rank is {A.shape[0]}")
        return KasaPatch(params.module, A, B, diag.flatten(), alpha, scaling, params.tensors.get("lora_B.bias"))
