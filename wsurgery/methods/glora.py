"""GLoRA (``peft_type: GLORA``) on ``nn.Linear``: ``W' = W + W⊙A + B`` and, where the base has a bias,
``b' = b + b⊙D + E + W·C`` with the *original* W (PEFT computes every term from ``w0`` before it
assigns the new weight).

Each of the five paths is saved as one of (``config_A_B``, ``config_C``, ``config_D_E``):

* ``lora``: ``glora_X.Xd`` and ``glora_X.Xu``, X = Xd·Xu — A/B: (out, r)·(r, in); C: (in, r)·(r, 1);
* ``vector``: ``glora_X.X`` — (out, 1) for A/B (one value per output row), (in, 1) for C, (out,) for D/E;
* ``constant``: ``glora_X.X`` of shape (1,), used as a scalar (A, B, D, E);
* ``none``: the all-zero buffer ``glora_X.zeros`` (A/B (out, in), C (in, 1), D/E (out,)).

PEFT only builds trainable C/D/E paths when the base layer has a bias; without one it saves their
zero buffers and leaves the bias alone. So trainable C/D/E require a base bias; zero buffers never
touch it.

Unmerge (as PEFT's own): ``W = (W' − B)/(1 + A)``, then ``b = (b' − E − W·C)/(1 + D)`` with that W;
exact division, refused where ``1 + A`` or ``1 + D`` is 0 (the merge wiped those values).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..errors import InputError, NotInvertibleError, UnsupportedError
from .base import Method, ModuleParams, Patch, Shapes, Support, Tensors, like, register
from .layers import Direct, Layer, default_layer

if TYPE_CHECKING:  # adapters import methods; the config is only needed for type hints here
    from ..adapters.config import AdapterConfig

_CONFIG = {"A": "config_A_B", "B": "config_A_B", "C": "config_C", "D": "config_D_E", "E": "config_D_E"}
_DEFAULT = {"config_A_B": "lora", "config_C": "lora", "config_D_E": "constant"}
_VALID = {"config_A_B": ("lora", "vector", "constant", "none"), "config_C": ("lora", "vector", "none"),
          "config_D_E": ("vector", "constant", "none")}
_AMPLIFICATION_NOTE = 1e-2


class GloraPath:
    """One saved path ``glora_<letter>``: its storage kind and its value, shaped to broadcast."""

    def __init__(self, letter: str, kind: str, tensors: dict[str, torch.Tensor]):
        self.letter, self.kind, self.tensors = letter, kind, tensors  # kind: lora | x | zeros

    @property
    def name(self) -> str:
        return f"glora_{self.letter}"

    @property
    def trainable(self) -> bool:
        return self.kind != "zeros"

    def shapes_text(self) -> str:
        return ", ".join(f"{self.name}.{k} {list(v.shape)}" for k, v in self.tensors.items())

    def value(self) -> torch.Tensor:
        """float32; a 0-d tensor for a constant."""
        if self.kind == "lora":
            return self.tensors["Xd"].to(torch.float32) @ self.tensors["Xu"].to(torch.float32)
        X = self.tensors["X" if self.kind == "x" else "zeros"].to(torch.float32)
        if self.kind == "x" and tuple(X.shape) == (1,) and self.letter != "C":
            return X[0]  # GloraScalarPath returns X[0]
        return X

    def fits(self, shape: tuple[int, ...]) -> bool:
        """Whether the value (by its saved shapes alone) broadcasts as PEFT's ``shape``-sized term."""
        if self.kind == "lora":
            Xd, Xu = self.tensors["Xd"], self.tensors["Xu"]
            return Xd.ndim == 2 and Xu.ndim == 2 and Xd.shape[1] == Xu.shape[0] and \
                (Xd.shape[0], Xu.shape[1]) == shape
        X = self.tensors["X" if self.kind == "x" else "zeros"]
        if self.kind == "zeros":
            return tuple(X.shape) == shape
        if tuple(X.shape) == (1,) and self.letter != "C":
            return True  # constant
        return tuple(X.shape) == ((shape[0], 1) if len(shape) == 2 else shape)  # vector


def _path(params: ModuleParams, letter: str) -> GloraPath:
    prefix = f"glora_{letter}."
    found = {k[len(prefix):]: v for k, v in params.tensors.items() if k.startswith(prefix)}
    subs = set(found)
    if subs == {"Xd", "Xu"}:
        kind = "lora"
    elif subs == {"X"}:
        kind = "x"
    elif subs == {"zeros"}:
        kind = "zeros"
    elif not subs:
        params.require(f"glora_{letter}.Xd", f"glora_{letter}.Xu")  # raises: names what a path needs
        raise AssertionError("unreachable")
    else:
        raise InputError(f"{params.config.path.parent}: module {params.module!r} saves "
                         f"{sorted(prefix + s for s in subs)}, which is no GLoRA path (one of .Xd+.Xu, .X or .zeros); "
                         "the adapter file is inconsistent")
    tensors = {s: params.tensors[prefix + s] for s in sorted(subs)}  # read through the tracker
    path = GloraPath(letter, kind, tensors)
    setting = str(params.config.get(_CONFIG[letter], _DEFAULT[_CONFIG[letter]]))
    expected = {"lora": "lora", "vector": "x", "constant": "x", "none": "zeros"}.get(setting)
    # Without a base bias PEFT saves C/D/E as zero buffers whatever the config says.
    if kind != expected and not (letter in "CDE" and kind == "zeros"):
        raise InputError(f"{params.config.path.parent}: module {params.module!r} saves {path.shapes_text()}, but "
                         f"{_CONFIG[letter]} is {setting!r}; the adapter file and its config disagree")
    if kind == "zeros" and bool(tensors["zeros"].any()):
        raise InputError(f"{params.config.path.parent}: module {params.module!r}: {path.name}.zeros (a disabled "
                         "path) holds non-zero values; the adapter file is damaged")
    return path


class GloraPatch(Patch):
    def __init__(self, module: str, paths: dict[str, GloraPath]):
        self.paths = paths
        self.changes_weight = paths["A"].trainable or paths["B"].trainable
        # Trainable C/D/E exist only where PEFT saw a bias, so the base must have one.
        self.changes_bias = any(paths[x].trainable for x in "CDE")
        # W is read for W·C even where A and B are "none" (the engine then writes it back unchanged).
        reads_weight = self.changes_weight or paths["C"].trainable or not self.changes_bias
        super().__init__(module, ("weight",) * reads_weight + ("bias",) * self.changes_bias)
        self.rank = next((p.tensors["Xd"].shape[1] for p in paths.values() if p.kind == "lora"), None)

    def check(self, shapes: Shapes) -> None:
        if "weight" in shapes:
            w = tuple(shapes["weight"])
            if len(w) != 2:
                raise InputError(f"{self.module}: GLoRA applies to nn.Linear weights (out, in), but the base weight "
                                 f"is {list(w)}")
            out, inp = w
            want: dict[str, tuple[int, ...]] = {"A": (out, inp), "B": (out, inp), "C": (inp, 1)}
        else:  # only D/E change the bias; W is neither read nor written
            w, out = shapes["bias"], shapes["bias"][0]
            want = {}  # A/B/C are disabled paths (zero buffers) with nothing to check against
        want.update(D=(out,), E=(out,))
        for letter, path in self.paths.items():
            if letter not in want:
                continue
            if not path.fits(want[letter]):
                raise InputError(f"{self.module}: {path.shapes_text()} does not fit the base weight {list(w)} "
                                 f"(expected a {list(want[letter])} term); was the adapter trained on another model?")
        if "bias" in shapes and tuple(shapes["bias"]) != (out,):
            raise InputError(f"{self.module}: the base bias is {list(shapes['bias'])}, expected [{out}]")

    def apply(self, tensors: Tensors) -> Tensors:
        p = self.paths
        if "bias" in tensors:  # from the original W, before the weight changes
            b = tensors["bias"]
            D, E = (p[x].value().to(b.dtype) for x in "DE")
            change = b * D + E
            if p["C"].trainable:  # then W is read (see __init__)
                change += (tensors["weight"] @ p["C"].value().to(b.dtype)).squeeze(-1)
            b.add_(change)
        if self.changes_weight:
            W = tensors["weight"]
            change = self._scaled(W) if p["A"].trainable else torch.zeros_like(W)
            if p["B"].trainable:
                change.add_(p["B"].value().to(W.dtype))
            W.add_(change)
        return tensors

    def _scaled(self, W: torch.Tensor) -> torch.Tensor:
        """W ⊙ A as a new tensor (A's own product reused where it is a full low-rank matrix)."""
        A = self.paths["A"].value()
        if self.paths["A"].kind == "lora":
            return A.to(W.dtype).mul_(W)
        return W * A.to(W.dtype)

    def layer(self, shapes: Shapes) -> Layer:
        # Where only D/E change the bias, W is not read: the bias itself is compared.
        return default_layer(shapes) if "weight" in shapes else Direct(("bias",))

    def forward(self, x: torch.Tensor, base: Tensors, layer: Layer) -> torch.Tensor:
        """PEFT's GLoRA forward, ``F.linear(x, W + W⊙A + B, b + b⊙D + E + W·C)``, with the weight terms
        on activations: ``x(W⊙A)ᵀ`` is ``Σ_k ((x⊙Xu_k) Wᵀ)⊙Xd_k`` for a low-rank A (a row or global scale
        of ``x Wᵀ`` otherwise), ``x Bᵀ`` is ``(x Xuᵀ) Xdᵀ`` (a row or global scale of ``Σ_i x_i`` otherwise)."""
        p = self.paths

        def value(letter: str) -> torch.Tensor:  # a path as PEFT's path module returns it (shared with the merge)
            return like(p[letter].value(), x)

        if "weight" not in base:
            b = base["bias"]
            return (b + b * value("D") + value("E")).reshape(-1)
        W = base["weight"]
        y = layer(x, base)
        A, Bp = p["A"], p["B"]
        if A.kind == "lora":
            Xd, Xu = like(A.tensors["Xd"], x), like(A.tensors["Xu"], x)
            y = y + torch.einsum("tro,or->to", (x[:, None, :] * Xu) @ W.T, Xd)
        elif A.kind == "x":
            y = y + (x @ W.T) * value("A").reshape(-1)
        if Bp.kind == "lora":
            y = y + (x @ like(Bp.tensors["Xu"], x).T) @ like(Bp.tensors["Xd"], x).T
        elif Bp.kind == "x":
            y = y + x.sum(-1, keepdim=True) * value("B").reshape(-1)
        if "bias" in base:
            b = base["bias"]
            y = y + b * value("D") + value("E")
            if p["C"].trainable:
                y = y + (W @ value("C")).reshape(-1)
        return y

    def _zeros(self) -> dict[str, int]:
        letters = "A" * self.changes_weight + "D" * self.changes_bias
        return {letter: int((self.paths[letter].value() == -1).sum()) for letter in letters}

    def why_not_invertible(self) -> str | None:
        zeros = {k: v for k, v in self._zeros().items() if v}
        if zeros:
            parts = [f"1 + glora_{k} is 0 for {v} {'weight' if k == 'A' else 'bias'} element(s)" if
                     self.paths[k].value().ndim else f"1 + glora_{k} (a constant) is 0" for k, v in zeros.items()]
            return "; ".join(parts) + (": the merge wiped those values, so they cannot be divided back; only the "
                                       "base checkpoint can restore them")
        return None

    def revert(self, tensors: Tensors) -> Tensors:
        reason = self.why_not_invertible()
        if reason is not None:
            raise NotInvertibleError(f"{self.module}: {reason}")
        p = self.paths
        if self.changes_weight:
            W = tensors["weight"]
            if p["B"].trainable:
                W.sub_(p["B"].value().to(W.dtype))
            if p["A"].trainable:
                factor = p["A"].value().to(W.dtype)
                factor = factor.add_(1.0) if p["A"].kind == "lora" else factor + 1.0
                self._note_smallest("A", factor)
                W.div_(factor)
        if "bias" in tensors:  # with the recovered W, as PEFT's unmerge
            b = tensors["bias"]
            D, E = (p[x].value().to(b.dtype) for x in "DE")
            b.sub_(E)
            if p["C"].trainable:  # then W is read (see __init__)
                b.sub_((tensors["weight"] @ p["C"].value().to(b.dtype)).squeeze(-1))
            factor = D + 1.0
            self._note_smallest("D", factor)
            b.div_(factor)
        return tensors

    def _note_smallest(self, letter: str, factor: torch.Tensor) -> None:
        smallest = float(factor.abs().min()) if factor.numel() else 1.0
        if smallest < _AMPLIFICATION_NOTE:
            self.notes.append(f"GLoRA unmerge divides by 1 + glora_{letter}, whose smallest magnitude is "
                              f"{smallest:.3g}: the merged file's rounding grows by up to {1 / smallest:.3g}x there")

    def describe(self) -> dict[str, Any]:
        kinds = {"lora": "low-rank", "zeros": "none"}
        facts: dict[str, Any] = {"kind": "linear"}
        for letter, path in self.paths.items():
            kind = kinds.get(path.kind) or ("constant" if path.value().ndim == 0 else "vector")
            facts[f"path_{letter}"] = kind
        if self.rank is not None:
            facts["rank"] = self.rank
        facts["changes_weight"], facts["changes_bias"] = self.changes_weight, self.changes_bias
        return facts


@register
class Glora(Method):
    peft_types = ("GLORA",)
    param_names = frozenset({"glora_A", "glora_B", "glora_C", "glora_D", "glora_E"})
    support = (
        Support("GLoRA (A/B/C/D/E as lora, vector, constant or none)", "Linear (bias changed where it has one)",
                "exact", "exact division by 1 + A (bias by 1 + D); refused where either is 0", "0.21.2"),
    )

    def check_config(self, config: AdapterConfig) -> None:
        for name, valid in _VALID.items():
            value = config.get(name, _DEFAULT[name])
            if value not in valid:
                raise UnsupportedError(f"{config.path}: GLoRA {name}={value!r} is unknown (PEFT accepts "
                                       f"{', '.join(valid)})")

    def summary(self, config: AdapterConfig) -> dict[str, Any]:
        return {name: config.get(name, default) for name, default in _DEFAULT.items()}

    def patch(self, params: ModuleParams) -> Patch:
        return GloraPatch(params.module, {letter: _path(params, letter) for letter in "ABCDE"})
