"""BOFT (``peft_type: BOFT``): butterfly orthogonal fine-tuning on Linear and Conv2d weights.

``boft_R (N, D, b, b)`` holds N butterfly factors of D full b×b matrices each (``D·b = in``, where a
Conv2d weight ``(out, c, k, k)`` counts ``in = c·k·k`` in its (c, kh, kw) flatten order), and
``boft_s`` one scale per output feature (``(out, 1)`` for Linear, ``(1, out)`` for Conv2d).

Every block is turned into a rotation by PEFT's exact Cayley map, ``S = ½(R − Rᵀ)``,
``Q = (I − S)(I + S)⁻¹``; factor i is ``M_i = P_i·blockdiag(Q_i,·)·P_iᵀ`` with PEFT's butterfly
permutation ``P_i`` (the identity for i = 0), the rotation is ``M = M_{N−1}⋯M_1·M_0`` and

    W' = (W·Mᵀ) ⊙ s   (s scales output rows).

N is read from the tensor, never from the config: PEFT silently forces ``boft_n_butterfly_factor``
to 1 when its CUDA extension does not build, so the same config can save N = 1 or N > 1.

Each factor is applied as a column permutation plus a block-diagonal multiply (no dense in×in
matrix). Unmerge divides by s (refused if any s is 0) and undoes the factors in reverse order with
a block-wise float64 solve, i.e. the exact inverse of the float32 blocks that the merge applied,
not their transpose.
"""

from __future__ import annotations

import functools

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..errors import InputError, NotInvertibleError, UnsupportedError
from .base import Method, ModuleParams, Patch, Shapes, Support, Tensors, like, register
from .layers import Layer, input_side

if TYPE_CHECKING:  # adapters import methods; the config is only needed for type hints here
    from ..adapters.config import AdapterConfig

# A rotation whose blocks deviate more than this from orthogonal (max |Q Qᵀ − I|) earns a note.
ORTHO_NOTE_THRESHOLD = 1e-6


def block_butterfly_perm(n: int, b: int, r: int, n_butterfly_factor: int) -> torch.Tensor:
    """PEFT's ``BOFTLayer.block_butterfly_perm``, ported line by line.

    ``n`` is the size, ``b`` the number of groups after permuting, ``r`` the base chunk size (half a
    block) and ``n_butterfly_factor`` PEFT's zero-based factor count (N − 1): 0 gives the identity.
    Inside each group of n/b entries, the chunks of r are reordered evens first, then odds.
    """
    if n_butterfly_factor == 0:
        return torch.arange(n)
    if b * r * 2 > n:
        raise ValueError("Invalid number of blocks!")
    block_size = int(n // b)
    indices = torch.arange(n)

    def sort_block(b, r):
        step = b / r
        initial_order = torch.arange(b)
        sorted_order = torch.empty(b, dtype=torch.long)
        evens = torch.arange(0, step, 2)
        odds = torch.arange(1, step, 2)
        sorted_seq = torch.cat((evens, odds), dim=0)
        for i, pos in enumerate(sorted_seq):
            sorted_order[int(i * r): int(i * r + r)] = initial_order[int(pos * r): int(pos * r + r)]
        return sorted_order

    sorted_order = sort_block(block_size, r)
    for i in range(0, n, block_size):
        block_end = i + block_size
        tmp_indices = indices[i:block_end]
        indices[i:block_end] = tmp_indices[sorted_order]
    return indices


@functools.lru_cache(maxsize=64)
def butterfly_perms(n: int, N: int, D: int, b: int) -> tuple[torch.Tensor | None, ...]:
    """``perm`` of every level as PEFT builds ``boft_P`` (``P[j, perm[j]] = 1``); None for the identity.

    Cached: a model has only a few layer shapes, and the port of PEFT's loop is slow. Read-only.
    """
    perms: list[torch.Tensor | None] = []
    for i in range(N):
        perm = block_butterfly_perm(n, int(D / (2 ** i)), int(b / 2), N - 1)
        perms.append(None if torch.equal(perm, torch.arange(n)) else perm)
    return tuple(perms)


def cayley(R: torch.Tensor) -> torch.Tensor:
    """PEFT's ``cayley_batch``: ``Q = (I − S)(I + S)⁻¹`` with ``S = ½(R − Rᵀ)``, here in float64."""
    R = R.to(torch.float64)
    S = 0.5 * (R - R.transpose(-1, -2))
    eye = torch.eye(R.shape[-1], dtype=torch.float64).expand_as(S)
    return torch.linalg.solve(eye + S, eye - S, left=False)


# Rows are rotated independently, so the weight is processed in row chunks of about this many
# elements, in place: peak memory stays near one copy of the weight plus a few chunks. 1 MB chunks keep
# the gathers and the batched product in the CPU caches: about 5x faster than 16 MB chunks on a
# 5504 x 2048 weight (measured: 22 ms against 113 ms).
CHUNK_ELEMENTS = 1 << 18


def _permute_cols(W: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    return W if index is None else W.index_select(1, index)


def _factors(X: torch.Tensor, blocks: torch.Tensor, perms: Sequence[torch.Tensor | None], levels) -> torch.Tensor:
    """``X·(P_i·blockdiag(blocks[i])·P_iᵀ)ᵀ`` for each level i in ``levels``, in that order; X is (rows, n).

    ``X·(P·B·Pᵀ)ᵀ = ((X·P)·Bᵀ)·Pᵀ``: ``X·P`` takes the columns ``perm⁻¹``, ``Y·Pᵀ`` the columns ``perm``
    (``P[j, perm[j]] = 1``), and ``·Bᵀ`` is one small product per block.
    """
    rows, n = X.shape
    _, D, b, _ = blocks.shape
    for i in levels:
        perm = perms[i]
        X = _permute_cols(X, None if perm is None else torch.argsort(perm)).reshape(rows, D, b)
        X = torch.einsum("odk,djk->odj", X, blocks[i]).reshape(rows, n)
        X = _permute_cols(X, perm)
    return X


def composed_groups(n: int, blocks: torch.Tensor, perms: Sequence[torch.Tensor | None]
                    ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``M = M_{N−1}⋯M_0`` as groups: ``(G, C)`` with ``(W·Mᵀ)[:, G_c] = W[:, G_c]·C_c`` for each group c.

    A butterfly of N factors with b×b blocks only ever mixes indices within groups of ``b·2^(N−1)``:
    M is block-diagonal after a permutation. Found from the structure (which indices each block of each
    level touches), then the small composed blocks are read off one product of the factors with a
    (group size × n) one-hot matrix, since groups do not interact. Applying M then takes two gathers and
    one batched product instead of two gathers and a product per factor. None if the groups are uneven.
    """
    N, D, b, _ = blocks.shape
    members = [torch.arange(n) if p is None else torch.argsort(p) for p in perms]
    label = torch.arange(n)
    while True:  # smallest index reachable through the blocks of any level
        before = label.clone()
        for level in members:
            idx = level.view(D, b)
            label[idx] = label[idx].amin(dim=1, keepdim=True).expand(D, b)
        if torch.equal(label, before):
            break
    order = torch.argsort(label, stable=True)
    counts = torch.unique(label, return_counts=True)[1]
    g = int(counts[0])
    if not bool((counts == g).all()):
        return None
    groups = order.view(-1, g)  # (C, g): the indices of each group, ascending
    one_hot = torch.zeros(g, n, dtype=torch.float64)
    one_hot.scatter_(1, groups.T.contiguous(), 1.0)
    Y = _factors(one_hot, blocks.to(torch.float64), perms, range(N))  # row r: Σ_c (Mᵀ)[G_c[r], :]
    C = Y[:, groups].permute(1, 0, 2)  # (C, g, g): C_c[r, s] = (Mᵀ)[G_c[r], G_c[s]]
    return order, C.contiguous()


def rotate_rows(W: torch.Tensor, blocks: torch.Tensor, perms: Sequence[torch.Tensor | None],
                scale: torch.Tensor | None = None,
                groups: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """In place: ``W ← (W·Mᵀ) ⊙ scale`` for ``M = M_{N−1}⋯M_0``, ``M_i = P_i·blockdiag(blocks[i])·P_iᵀ``;
    through the composed ``groups`` (see ``composed_groups``) where given, else factor by factor."""
    rows, n = W.shape
    step = max(1, CHUNK_ELEMENTS // max(n, 1))
    if groups is None:
        blocks = blocks.to(W.dtype)
        for start in range(0, rows, step):
            chunk = W[start:start + step]
            out = _factors(chunk, blocks, perms, range(blocks.shape[0]))
            if scale is not None:
                out.mul_(scale[start:start + step].to(W.dtype).reshape(-1, 1))
            chunk.copy_(out)
        return W
    order, C = groups[0], groups[1].to(W.dtype)
    ngroups, g = C.shape[0], C.shape[1]
    scale = None if scale is None else scale.to(W.dtype)
    # Buffers for one chunk, allocated once: fresh 1 MB temporaries per chunk would each be a new
    # mapping to fault in, which costs more than the arithmetic.
    buffers: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    for start in range(0, rows, step):
        chunk = W[start:start + step]
        r = chunk.shape[0]
        if r not in buffers:
            buffers[r] = (torch.empty(r, n, dtype=W.dtype), torch.empty(ngroups, r, g, dtype=W.dtype),
                          torch.empty(ngroups, r, g, dtype=W.dtype))
        flat, grouped, product = buffers[r]
        torch.index_select(chunk, 1, order, out=flat)  # columns group by group
        grouped.copy_(flat.view(r, ngroups, g).transpose(0, 1))
        torch.bmm(grouped, C, out=product)  # per group: W[:, G_c]·C_c
        if scale is not None:
            product.mul_(scale[start:start + r].view(1, r, 1))
        flat.view(r, ngroups, g).copy_(product.transpose(0, 1))
        chunk.index_copy_(1, order, flat)
    return W


def unrotate_rows(W: torch.Tensor, blocks: torch.Tensor, perms: Sequence[torch.Tensor | None],
                  scale: torch.Tensor | None = None) -> torch.Tensor:
    """In place, the exact inverse of ``rotate_rows``: ``W ← (W ⊘ scale)·M⁻ᵀ``, in float64.

    Every block is inverted by a float64 solve (``B⁻¹ = solve(B, I)``, not ``Bᵀ``: this undoes the
    float32 blocks the merge applied, whether or not they are exactly orthogonal), and the factors
    are undone in reverse order: ``M⁻ᵀ = M_{N−1}⁻ᵀ⋯M_0⁻ᵀ`` applied to the right, last level first.
    """
    rows, n = W.shape
    B = blocks.to(torch.float64)
    inv = torch.linalg.solve(B, torch.eye(B.shape[-1], dtype=torch.float64).expand_as(B))
    step = max(1, CHUNK_ELEMENTS // max(n, 1))
    for start in range(0, rows, step):
        chunk = W[start:start + step]
        X = chunk.to(torch.float64)
        if scale is not None:
            X = X / scale[start:start + step].to(torch.float64).reshape(-1, 1)
        chunk.copy_(_factors(X, inv, perms, reversed(range(B.shape[0]))))
    return W


class BoftPatch(Patch):
    def __init__(self, module: str, R: torch.Tensor, s: torch.Tensor, config_factors: int | None):
        super().__init__(module, ("weight",))
        self.R, self.s = R, s
        self.N, self.D, self.b = R.shape[0], R.shape[1], R.shape[2]
        self.n = self.D * self.b
        self.config_factors = config_factors
        self.perms = butterfly_perms(self.n, self.N, self.D, self.b)
        self._blocks: torch.Tensor | None = None
        self._groups: tuple[torch.Tensor, torch.Tensor] | tuple[()] | None = None  # () where not composable
        self._deviation: float | None = None
        # Linear saves s as (out, 1), Conv2d as (1, out); check() settles it from the base weight.
        self.kind: str | None = ("linear" if s.shape[0] > 1 else "conv2d") if s.numel() > 1 else None

    # -- the rotation ----------------------------------------------------------------------------
    @property
    def blocks(self) -> torch.Tensor:
        """The float32 Cayley blocks (N, D, b, b) that the merge applies (computed once)."""
        if self._blocks is None:
            Q = cayley(self.R.reshape(-1, self.b, self.b)).to(torch.float32)
            Qd = Q.to(torch.float64)
            eye = torch.eye(self.b, dtype=torch.float64)
            self._deviation = (Qd @ Qd.transpose(-1, -2) - eye).abs().max().item()
            if self._deviation > ORTHO_NOTE_THRESHOLD:
                self.notes.append(f"BOFT rotation is {self._deviation:.2e} from orthogonal (max |R R^T - I| over "
                                  "its blocks); unmerge uses the exact inverse")
            self._blocks = Q.reshape(self.N, self.D, self.b, self.b)
        return self._blocks

    @property
    def orthogonality_deviation(self) -> float:
        self.blocks  # noqa: B018 (computes it)
        assert self._deviation is not None  # set together with the blocks
        return self._deviation

    # -- validation --------------------------------------------------------------------------------
    def check(self, shapes: Shapes) -> None:
        w = shapes["weight"]
        s_shape = tuple(self.s.shape)
        if len(w) == 2:
            self.kind, want_s = "linear", (w[0], 1)
        elif len(w) == 4:
            if w[2] != w[3]:
                raise UnsupportedError(f"{self.module}: BOFT needs a square Conv2d kernel (PEFT flattens the weight "
                                       f"with kernel_size[0]²), the base weight is {list(w)}")
            self.kind, want_s = "conv2d", (1, w[0])
        else:
            raise InputError(f"{self.module}: BOFT changes Linear (2-D) or Conv2d (4-D) weights, but the base weight "
                             f"is {list(w)}")
        fan_in = math.prod(w[1:])
        if fan_in != self.n:
            what = "in_channels·k·k" if self.kind == "conv2d" else "in_features"
            raise InputError(f"{self.module}: boft_R {list(self.R.shape)} rotates {self.D}·{self.b} = {self.n} inputs "
                             f"but the base weight {list(w)} has {what} = {fan_in}; was the adapter trained on "
                             "another model?")
        if s_shape != want_s:
            raise InputError(f"{self.module}: boft_s is {list(s_shape)}, expected {list(want_s)} for the "
                             f"{self.kind} base weight {list(w)}")

    # -- the change ---------------------------------------------------------------------------------
    def apply(self, tensors: Tensors) -> Tensors:
        W = tensors["weight"].contiguous()
        if self._groups is None:
            self._groups = composed_groups(self.n, self.blocks, self.perms) or ()
        rotate_rows(W.view(W.shape[0], -1), self.blocks, self.perms, self.s.reshape(-1), self._groups or None)
        return {"weight": W}

    def revert(self, tensors: Tensors) -> Tensors:
        reason = self.why_not_invertible()
        if reason is not None:
            raise NotInvertibleError(f"{self.module}: {reason}")
        W = tensors["weight"].contiguous()
        unrotate_rows(W.view(W.shape[0], -1), self.blocks, self.perms, self.s.reshape(-1))
        return {"weight": W}

    def forward(self, x: torch.Tensor, base: Tensors, layer: Layer) -> torch.Tensor:
        """PEFT's BOFT forward: ``base_layer(x·M)`` with the outputs (not the bias) times ``boft_s``; M is
        applied to activations factor by factor (for Conv2d to every unfolded input patch, the rotation
        PEFT applies to the flattened weight). The Cayley blocks and butterfly permutations are the
        parameterization shared with the merge (``cayley``, ``butterfly_perms``)."""
        Q = like(cayley(self.R.reshape(-1, self.b, self.b)), x).reshape(self.N, self.D, self.b, self.b)
        inverse = [None if p is None else torch.argsort(p).to(x.device) for p in self.perms]
        perms = [None if p is None else p.to(x.device) for p in self.perms]

        def rotate(v: torch.Tensor) -> torch.Tensor:
            # v·M = v·M_{N−1}⋯M_0, M_i = P_i·blockdiag(Q_i)·P_iᵀ; v·P is v[perm⁻¹], u·Pᵀ is u[perm]
            for i in reversed(range(self.N)):
                if inverse[i] is not None:
                    v = v[..., inverse[i]]
                v = torch.einsum("...dk,dkj->...dj", v.reshape(*v.shape[:-1], self.D, self.b), Q[i])
                v = v.reshape(*v.shape[:-2], self.n)
                if perms[i] is not None:
                    v = v[..., perms[i]]
            return v

        y = input_side(layer, x, {"weight": base["weight"]}, rotate)
        shape = (-1, *([1] * (y.dim() - 2)))
        y = y * like(self.s, x).reshape(shape)
        return y + base["bias"].view(shape) if "bias" in base else y

    def why_not_invertible(self) -> str | None:
        zeros = int((self.s == 0).sum())
        if zeros:
            return (f"boft_s has {zeros} zero entr{'y' if zeros == 1 else 'ies'}, which zeroed those output rows; "
                    "they cannot be recovered from the merged weights. Keep the base checkpoint and merge from it "
                    "again instead")
        return None

    def describe(self) -> dict[str, Any]:
        s = self.s.to(torch.float32)
        return {"kind": self.kind, "butterfly_factors": self.N, "block_num": self.D, "block_size": self.b,
                "in_features": self.n, "scale_min": s.min().item(), "scale_max": s.max().item(),
                "orthogonality_deviation": self.orthogonality_deviation,
                "config_butterfly_factor": self.config_factors}


@register
class Boft(Method):
    peft_types = ("BOFT",)
    param_names = frozenset({"boft_R", "boft_s"})
    support = (Support("BOFT (any number of butterfly factors)", "Linear, Conv2d", "exact, factor by factor",
                       "exact (refused where boft_s has a zero)", "0.21.2"),)

    def summary(self, config: AdapterConfig) -> dict[str, Any]:
        return {"boft_block_size": config.get("boft_block_size", 0), "boft_block_num": config.get("boft_block_num", 0),
                "boft_n_butterfly_factor (config)": config.get("boft_n_butterfly_factor", 1),
                "rotation": "Cayley (I-S)(I+S)^-1 per block, butterfly permutations; W' = (W M^T) * s"}

    def patch(self, params: ModuleParams) -> Patch:
        R, s = params.require("boft_R", "boft_s")
        where = f"{params.config.path.parent}: module {params.module!r}"
        if R.ndim != 4 or R.shape[2] != R.shape[3] or 0 in R.shape:
            raise InputError(f"{where}: boft_R is {list(R.shape)}, expected (factors, blocks, b, b)")
        if s.ndim != 2 or 1 not in s.shape:
            raise InputError(f"{where}: boft_s is {list(s.shape)}, expected (out, 1) or (1, out)")
        N, D, b = R.shape[0], R.shape[1], R.shape[2]
        if N > 1:  # PEFT's own constraints for butterfly factors > 1 (it refuses other shapes)
            if b % 2 or D % 2:
                raise InputError(f"{where}: boft_R {list(R.shape)} has {N} butterfly factors, which need an even "
                                 "block size and block count (PEFT refuses others)")
            if D % (2 ** (N - 1)):
                raise InputError(f"{where}: boft_R {list(R.shape)}: {N} butterfly factors need the block count {D} "
                                 f"to be a multiple of 2^{N - 1} (PEFT refuses others)")
        factors = params.config.get("boft_n_butterfly_factor")
        return BoftPatch(params.module, R, s, int(factors) if factors is not None else None)
