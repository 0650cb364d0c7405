"""MiSS (``peft_type: MISS``, key ``miss_block``) and its predecessor Bone (``peft_type: BONE``, key
``bone_block``, PEFT 0.14-0.18): the same mathematics on ``nn.Linear`` weights ``W (out, in)``.

* default (``init_weights`` True/False): ``miss_block (r, out)``; ``W[o, i] += block[i mod r, o]``.
  When ``r`` does not divide ``in`` the trailing partial block gets the first ``in mod r`` rows
  (PEFT's forward zero-pads the input to a multiple of r, which is the same thing). Additive.
* ``mini`` (MiSS only): ``miss_block (r, mini_r)`` tiled along ``out``:
  ``W[o, i] += block[i mod r, o mod mini_r]``; needs ``out % mini_r == 0``. Additive.
* ``bat`` (Block-Affine Transformation): ``miss_block (out/r, r, r)``; W is cut into r x r tiles
  ``W_ij`` (i: output tile, j: input tile) and ``W'_ij = W_ij + W_ij B_i + B_i = W_ij (I + B_i) + B_i``.
  Needs r to divide both dimensions (PEFT refuses otherwise). Depends on W; unmerge solves
  ``W_ij = (W'_ij - B_i)(I + B_i)^-1`` in float64, which exists only where ``I + B_i`` is invertible.

The mode comes from each adapter's own ``init_weights`` (not from whatever adapter was loaded
first into a layer: PEFT <= 0.21.2 keeps one ``miss_fn`` per layer, huggingface/peft#3379), and
must agree with the saved block's shape.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ..errors import InputError, NotInvertibleError, UnsupportedError
from .base import AdditivePatch, Method, ModuleParams, Patch, Shapes, Support, Tensors, like, register
from .layers import Layer

if TYPE_CHECKING:  # adapters import methods; the config is only needed for type hints here
    from ..adapters.config import AdapterConfig

# A block I + B_i whose smallest singular value is below this fraction of its largest is treated
# as singular: solving with it would amplify the rounding of the merged weight beyond any use.
_SINGULAR_RTOL = 1e-12


def _linear_shape(module: str, key: str, shapes: Shapes) -> tuple[int, int]:
    w = shapes["weight"]
    if len(w) != 2:
        raise InputError(f"{module}: {key} applies to nn.Linear weights (out, in), but the base weight is "
                         f"{list(w)}; MiSS/Bone have no Conv or Embedding layers")
    return w[0], w[1]


class MissBlockPatch(AdditivePatch):
    """Default and ``mini`` modes: ``W[o, i] += block[i mod r, o mod c]`` with ``block (r, c)``."""

    def __init__(self, module: str, key: str, block: torch.Tensor, mode: str):
        super().__init__(module, ("weight",))
        self.key, self.block, self.mode = key, block, mode
        self.r, self.cols = block.shape
        self._shape: tuple[int, int] | None = None

    def check(self, shapes: Shapes) -> None:
        out, inp = _linear_shape(self.module, self.key, shapes)
        if self.mode == "mini":
            if out % self.cols:
                raise InputError(f"{self.module}: {self.key} is {list(self.block.shape)} (mini_r={self.cols}), but "
                                 f"the base weight's out_features {out} is not a multiple of mini_r "
                                 f"(PEFT refuses this too); was the adapter trained on another model?")
        elif self.cols != out:
            raise InputError(f"{self.module}: {self.key} is {list(self.block.shape)}, expected (r, out_features="
                             f"{out}) for base weight {list(shapes['weight'])}; was the adapter trained on another "
                             "model?")
        if self.r > inp:
            raise InputError(f"{self.module}: {self.key} has r={self.r} > in_features={inp} of base weight "
                             f"{list(shapes['weight'])}; PEFT refuses r > in_features")
        self._shape = (out, inp)

    def _full_block(self, dtype: torch.dtype) -> torch.Tensor:
        """``(r, out)``: the block tiled along out (a no-op outside mini mode)."""
        assert self._shape is not None  # set by check()
        out = self._shape[0]
        b = self.block.to(dtype)
        return b.repeat(1, out // self.cols) if self.cols != out else b

    def _add(self, tensors: Tensors, alpha: float) -> Tensors:
        W = tensors["weight"]
        if self._shape is None:
            self.check({"weight": tuple(W.shape)})
        if not W.is_contiguous():  # the blockwise views below need row-major storage
            W = tensors["weight"] = W.contiguous()
        out, inp = W.shape
        bt = self._full_block(W.dtype).T  # (out, r)
        n = inp // self.r
        if n:  # full r-wide column blocks, without a dense (out, in) delta
            W[:, : n * self.r].view(out, n, self.r).add_(bt[:, None, :], alpha=alpha)
        rem = inp - n * self.r
        if rem:
            W[:, n * self.r:].add_(bt[:, :rem], alpha=alpha)
        return tensors

    def delta(self) -> Tensors:
        assert self._shape is not None  # derived from the shapes by bind()
        inp = self._shape[1]
        reps = -(-inp // self.r)
        return {"weight": self._full_block(torch.float32).T.repeat(1, reps)[:, :inp].contiguous()}

    def add_scaled(self, tensors: Tensors, alpha: float) -> Tensors:
        return self._add(tensors, alpha)  # in place, without a dense ΔW

    def forward(self, x: torch.Tensor, base: Tensors, layer: Layer) -> torch.Tensor:
        """PEFT's MiSS/Bone block-sum form: the input, zero-padded to a multiple of r, summed over its
        r-wide blocks, times the block (tiled along out in mini mode): ``y + Σ_j x_j · block``."""
        out = base["weight"].shape[0]
        block = like(self.block, x)
        if self.cols != out:
            block = block.repeat(1, out // self.cols)
        padded = F.pad(x, (0, -x.shape[-1] % self.r))
        sums = padded.reshape(*x.shape[:-1], -1, self.r).sum(-2)
        return layer(x, base) + sums @ block

    def describe(self) -> dict[str, Any]:
        d = {"kind": "linear", "mode": self.mode, "rank": self.r}
        if self.mode == "mini":
            d["mini_r"] = self.cols
        return d


def _stored_precision(W: torch.Tensor) -> tuple[str, int]:
    """The narrowest float type holding every value of W (the merged file's dtype, before upcasting), and its
    mantissa bits."""
    for dtype, bits in ((torch.bfloat16, 7), (torch.float16, 10), (torch.float32, 23)):
        if dtype.itemsize <= W.dtype.itemsize and torch.equal(W.to(dtype).to(W.dtype), W):
            return str(dtype).removeprefix("torch."), bits
    return str(W.dtype).removeprefix("torch."), 52 if W.dtype == torch.float64 else 23


class MissBatPatch(Patch):
    """``bat``: ``W'_ij = W_ij (I + B_i) + B_i`` on r x r tiles, ``block (out/r, r, r)``."""

    approximate_inverse = True

    def __init__(self, module: str, key: str, block: torch.Tensor):
        super().__init__(module, ("weight",))
        self.key, self.block = key, block
        self.r = block.shape[-1]
        self._cond: torch.Tensor | None = None  # per block: condition number of I + B_i (inf if singular)

    def check(self, shapes: Shapes) -> None:
        out, inp = _linear_shape(self.module, self.key, shapes)
        r = self.r
        if out % r or inp % r:
            raise InputError(f"{self.module}: {self.key} (bat) uses {r}x{r} tiles but the base weight is "
                             f"{list(shapes['weight'])}; r must divide both in and out features (PEFT refuses too)")
        if self.block.shape[0] != out // r:
            raise InputError(f"{self.module}: {self.key} (bat) is {list(self.block.shape)}, expected "
                             f"({out // r}, {r}, {r}) for base weight {list(shapes['weight'])}; was the adapter "
                             "trained on another model?")

    def _tiles(self, W: torch.Tensor) -> torch.Tensor:
        """``(out/r, in/r, r, r)`` view: ``[i, j]`` is tile W_ij."""
        out, inp = W.shape
        r = self.r
        return W.reshape(out // r, r, inp // r, r).permute(0, 2, 1, 3)

    def _change(self, W: torch.Tensor) -> torch.Tensor:
        """``W_ij B_i + B_i`` for every tile, in W's layout (PEFT's delta, same operation order)."""
        B = self.block.to(W.dtype)
        d = torch.einsum("ijab,ibc->ijac", self._tiles(W), B).add_(B[:, None])
        return d.permute(0, 2, 1, 3).reshape(W.shape)

    def apply(self, tensors: Tensors) -> Tensors:
        return self.merge(tensors, 1.0)

    def merge(self, tensors: Tensors, scale: float) -> Tensors:
        W = tensors["weight"]
        W.add_(self._change(W), alpha=scale)
        return tensors

    def conditions(self) -> torch.Tensor:
        """Condition number of ``I + B_i`` per output tile row (float64; inf where singular)."""
        if self._cond is None:
            M = torch.eye(self.r, dtype=torch.float64) + self.block.to(torch.float64)
            s = torch.linalg.svdvals(M)
            smax, smin = s[..., 0], s[..., -1]
            cond = smax / smin
            self._cond = torch.where(smin <= _SINGULAR_RTOL * smax, torch.full_like(cond, float("inf")), cond)
        return self._cond

    def why_not_invertible(self) -> str | None:
        cond = self.conditions()
        bad = torch.nonzero(~torch.isfinite(cond)).flatten().tolist()
        if bad:
            return (f"I + {self.key}[{bad[0]}] is singular ({len(bad)} of {len(cond)} tile rows), so W cannot be "
                    "solved from W' = W(I+B) + B; only the original base checkpoint can give W back")
        return None

    def revert(self, tensors: Tensors) -> Tensors:
        reason = self.why_not_invertible()
        if reason is not None:
            raise NotInvertibleError(f"{self.module}: {reason}")
        W = tensors["weight"]
        Wm = W.to(torch.float64)
        B = self.block.to(torch.float64)
        eye = torch.eye(self.r, dtype=torch.float64)
        tiles = self._tiles(Wm)  # (out/r, in/r, r, r)
        # X (I + B_i) = W'_ij - B_i, solved per tile.
        X = torch.linalg.solve((eye + B)[:, None], tiles - B[:, None], left=False)
        X = X.to(W.dtype)  # the solution as it is handed back; the residual includes that rounding
        Xd = X.to(torch.float64)
        remerged = Xd @ B[:, None] + B[:, None] + Xd
        residual = (remerged - tiles).abs().max().item()
        scale = max(tiles.abs().max().item(), 1e-30)
        # The merged file was rounded to some precision; that rounding E comes back as E (I+B_i)^-1.
        precision, bits = _stored_precision(W)
        inv_norm = torch.linalg.inv(eye + B).abs().sum(-2).amax(-1)  # ||(I+B_i)^-1||_1 per tile row
        band_max = tiles.abs().amax(dim=(1, 2, 3))
        bound = (torch.exp2(torch.floor(torch.log2(band_max.clamp_min(1e-30))) - bits) / 2 * inv_norm).max().item()
        w_max = max(Xd.abs().max().item(), 1e-30)
        dtype = str(W.dtype).removeprefix("torch.")
        self.notes.append(
            f"{self.key} (bat) unmerge is approximate: W = (W' - B)(I + B)^-1 solved per {self.r}x{self.r} tile in "
            f"float64; re-merging the solution (rounded to {dtype}) reproduces the merged weight to max abs "
            f"{residual:.3g} (relative {residual / scale:.3g}); the merged weight's own {precision} rounding, "
            f"amplified by (I+B)^-1 (max cond {self.conditions().max().item():.3g}), can leave W off by up to "
            f"{bound:.3g} ({bound / w_max:.3g} of max|W|)")
        W.copy_(X.permute(0, 2, 1, 3).reshape(W.shape))
        return tensors

    def forward(self, x: torch.Tensor, base: Tensors, layer: Layer) -> torch.Tensor:
        """PEFT's ``bat`` forward is ``F.linear(x, W + W_ij B_i + B_i)``; here on activations: output tile i
        gets ``Σ_j (x_j B_iᵀ) W_ijᵀ + (Σ_j x_j) B_iᵀ`` on top of the base output."""
        W = base["weight"]
        r = self.r
        B = like(self.block, x)  # (out/r, r, r)
        tiles = W.reshape(W.shape[0] // r, r, W.shape[1] // r, r).permute(0, 2, 1, 3)  # [i, j] = W_ij
        xs = x.reshape(x.shape[0], -1, r)  # (t, in/r, r): x_j
        mixed = torch.einsum("tjb,icb->tijc", xs, B)  # x_j B_iᵀ for every output tile i
        change = torch.einsum("tijc,ijac->tia", mixed, tiles) + torch.einsum("tb,iab->tia", xs.sum(1), B)
        return layer(x, base) + change.reshape(x.shape[0], -1)

    def describe(self) -> dict[str, Any]:
        return {"kind": "linear", "mode": "bat", "rank": self.r, "tile_rows": self.block.shape[0],
                "max_cond_I_plus_B": self.conditions().max().item()}


class _MissFamily(Method):
    key: str = ""
    modes: tuple[str, ...] = ()

    def mode(self, config: AdapterConfig) -> str:
        init = config.raw.get("init_weights", True)
        if isinstance(init, str):
            if init not in self.modes:
                raise UnsupportedError(f"{config.path}: {config.peft_type} init_weights={init!r} is unknown (known: "
                                       f"True, False, {', '.join(repr(m) for m in self.modes)})")
            return init
        return "default"

    def check_config(self, config: AdapterConfig) -> None:
        self.mode(config)

    def summary(self, config: AdapterConfig) -> dict[str, Any]:
        mode = self.mode(config)
        s = {"mode": mode, "r": config.get("r")}
        if mode == "mini":
            s["mini_r"] = config.get("mini_r")
        return s

    def patch(self, params: ModuleParams) -> Patch:
        config, t = params.config, params.tensors
        extra = sorted(set(t) - {self.key})
        if extra:
            raise InputError(f"{config.path.parent}: module {params.module!r} has {extra} besides {self.key}; "
                             f"{config.peft_type} saves only {self.key} per module")
        (block,) = params.require(self.key)
        mode = self.mode(config)
        where = f"{config.path.parent}: module {params.module!r}: {self.key}"
        if mode == "bat":
            if block.ndim != 3 or block.shape[1] != block.shape[2] or 0 in block.shape:
                raise InputError(f"{where} is {list(block.shape)}, but init_weights='bat' saves (out/r, r, r)")
            return MissBatPatch(params.module, self.key, block)
        if block.ndim != 2 or 0 in block.shape:
            hint = " (a bat block: is init_weights in adapter_config.json right?)" if block.ndim == 3 else ""
            raise InputError(f"{where} is {list(block.shape)}, but "
                             f"init_weights={config.raw.get('init_weights', True)!r} saves a 2-D block{hint}")
        if mode == "mini":
            mini_r = config.get("mini_r", 1)
            if block.shape[1] != mini_r:
                raise InputError(f"{where} is {list(block.shape)} but the config has mini_r={mini_r}; "
                                 "the adapter file is inconsistent")
        return MissBlockPatch(params.module, self.key, block, mode)


@register
class Miss(_MissFamily):
    peft_types = ("MISS",)
    param_names = frozenset({"miss_block"})
    key = "miss_block"
    modes = ("bat", "mini")
    support = (Support("MiSS (default, mini, bat)", "Linear", "exact (partial last block as PEFT)",
                       "default/mini exact; bat approximate (float64 solve per tile, residual reported)", "0.21.2"),)


@register
class Bone(_MissFamily):
    peft_types = ("BONE",)
    param_names = frozenset({"bone_block"})
    key = "bone_block"
    modes = ("bat",)
    support = (Support("Bone (PEFT 0.14-0.18: default, bat)", "Linear", "exact",
                       "default exact; bat approximate (residual reported)", "0.17.1, 0.15.2"),)
