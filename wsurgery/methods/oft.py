"""OFT (``peft_type: OFT``): a block-diagonal rotation of the weight, in every storage format PEFT wrote.

Three formats, told apart by the saved keys (the block size always comes from the tensor shapes):

* **peft >= 0.16** ``oft_R.weight (p, b(b-1)/2)`` (``oft_embedding_R.weight`` for embeddings, 0.19+):
  the strict upper triangle, row-major ``triu_indices(b, b, 1)``, of a skew matrix Q. With ``coft``
  each block's Q is first projected onto the Frobenius ball of radius ``eps/sqrt(p)``. The rotation is
  the Cayley-Neumann series (``use_cayley_neumann``, ``num_cayley_neumann_terms`` t; the series
  changed in 0.18, and configs without ``peft_version`` are older: for those we use the old series,
  matching what peft 0.16/0.17 merged, whereas peft >= 0.18 only warns and applies the new one) or the
  exact Cayley map ``(I - Q)(I + Q)^-1`` (the series approximates the *transpose* of that). It acts on the input
  side: Linear ``W' = W R^T``, Conv2d the same on W viewed as ``(out, in*k*k)`` (flatten order c, kh,
  kw), Embedding ``E' = E R``.
* **peft 0.14.0-0.15.2** ``oft_r (p, b, b)`` full matrices plus ``oft_s (out, 1)``:
  ``S = (M - M^T)/2``, exact Cayley, ``W' = diag(oft_s) (W R^T)``; coft projects M onto radius
  ``eps*ceil(out/r)^2/sqrt(p)`` with r the number of blocks.
* **peft <= 0.13** ``oft_r (p, b, b)``, b = ceil(out/r), on the **output** side: ``W' = R^T W`` with the
  block-diagonal R cut to ``out x out`` (the last block may be cut to its top-left corner); coft
  radius ``eps*b^2/sqrt(p)``, applied to M.

``block_share`` saves one block (p = 1) that is repeated. The rotation is applied block by block
(never as a dense in x in matrix). Unmerge applies the exact inverse of every block, computed in
float64: Neumann-series rotations are not orthogonal, so the transpose would be wrong; how far each R
is from orthogonal, ``max|R R^T - I|``, is reported in ``describe()`` and, above 1e-6, in a note.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from ..errors import InputError, NotInvertibleError, UnsupportedError
from .base import Method, ModuleParams, Patch, Shapes, Support, Tensors, like, register
from .layers import Embedding, Layer, default_layer, input_side

if TYPE_CHECKING:  # adapters import methods; the config is only needed for type hints here
    from ..adapters.config import AdapterConfig

ORTHOGONALITY_NOTE = 1e-6  # report max|R R^T - I| above this
_CHUNK = 1 << 22  # elements of W rotated at once (16 MB of float32), so memory stays near one copy of W
_NEUMANN_CHANGED = (0, 18)
_ILL_CONDITIONED = 1e3  # note the condition number of the inverse above this
_SINGULAR = 1e12  # refuse to unmerge above this  # peft 0.18.0 changed the Cayley-Neumann series

FORMAT_NAMES = {
    "v16": "peft>=0.16 (oft_R triangle vector)",
    "v14": "peft 0.14-0.15 (oft_r full matrices + oft_s)",
    "v13": "peft<=0.13 (oft_r full matrices, output side)",
}


# -- the rotation blocks -----------------------------------------------------------------------------

def block_size_from_triangle(n: int) -> int | None:
    """b with b(b-1)/2 == n, or None."""
    b = (1 + math.isqrt(1 + 8 * n)) // 2
    return b if b * (b - 1) // 2 == n else None


def skew_from_triangle(vec: torch.Tensor, b: int) -> torch.Tensor:
    """(p, b(b-1)/2) -> (p, b, b) skew matrices, PEFT's row-major strict upper triangle."""
    rows, cols = torch.triu_indices(b, b, 1)
    Q = torch.zeros(vec.shape[0], b, b, dtype=vec.dtype)
    Q[:, rows, cols] = vec
    return Q - Q.transpose(-2, -1)


def project_frobenius(M: torch.Tensor, radius: float) -> torch.Tensor:
    """COFT: every block whose Frobenius norm exceeds ``radius`` is scaled back onto that sphere."""
    norm = torch.linalg.matrix_norm(M, keepdim=True)
    return torch.where(norm <= radius, M, M * (radius / norm))


def cayley_exact(S: torch.Tensor) -> torch.Tensor:
    """R = (I - S)(I + S)^-1 for a batch of skew matrices (float64)."""
    eye = torch.eye(S.shape[-1], dtype=S.dtype).expand_as(S)
    return torch.linalg.solve(eye + S, eye - S, left=False)


def cayley_neumann(Q: torch.Tensor, terms: int, legacy: bool) -> torch.Tensor:
    """PEFT's truncated series for (I + Q)(I - Q)^-1.

    peft >= 0.18: ``I + 2Q + 2Q^2 + ... + 2Q^(t-2) + Q^(t-1)`` (t = 3 and 4 both give I+2Q+2Q^2+Q^3);
    peft 0.16-0.17 (``legacy``): ``I + 2Q + ... + 2Q^(t-1)``. Written as PEFT's loops, term for term.
    """
    R = torch.eye(Q.shape[-1], dtype=Q.dtype).repeat(Q.shape[0], 1, 1)
    if terms > 1:
        R.add_(Q, alpha=2.0)
        if terms > 2:
            power = Q @ Q
            R.add_(power, alpha=2.0)
            if legacy:
                for _ in range(3, terms):
                    power = power @ Q
                    R.add_(power, alpha=2.0)
            else:
                for _ in range(3, terms - 1):
                    power = power @ Q
                    R.add_(power, alpha=2.0)
                power = power @ Q
                R.add_(power)
    return R


# -- applying blocks to W ------------------------------------------------------------------------------

def rotate_columns(W: torch.Tensor, A: torch.Tensor) -> None:
    """In place, for W (rows, nblk*b) and A (nblk or 1, b, b): every column block k becomes ``W_k A_k^T``."""
    rows, n = W.shape
    b = A.shape[-1]
    nblk = n // b
    A = A.to(W.dtype)
    step = max(1, _CHUNK // max(n, 1))
    for start in range(0, rows, step):
        x = W[start:start + step]
        if A.shape[0] == 1:  # block_share: one matrix for every block, a plain matmul
            x.view(-1, b).copy_(x.reshape(-1, b) @ A[0].T)
        else:
            x = x.view(-1, nblk, b)
            x.copy_(torch.einsum("okj,kij->oki", x, A))


def rotate_rows(W: torch.Tensor, A: torch.Tensor, last: torch.Tensor | None) -> None:
    """In place, for W (out, n): every row block k of size b becomes ``A_k W_k``; the rows after the last
    full block (fewer than b) become ``last @ W_rest``."""
    out, n = W.shape
    b = A.shape[-1]
    full = out // b
    A = A.to(W.dtype)
    group = max(1, _CHUNK // max(b * n, 1))
    for k in range(0, full, group):
        g = min(group, full - k)
        x = W[k * b:(k + g) * b].view(g, b, n)
        blocks = A.expand(g, b, b) if A.shape[0] == 1 else A[k:k + g]
        x.copy_(torch.bmm(blocks, x))
    if last is not None:
        x = W[full * b:]
        x.copy_(last.to(W.dtype) @ x)


def _rotate_features(v: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """``v_k R_k`` for every block k of b features along v's last axis (one shared R: every block), as
    PEFT's ``OFTRotationModule.forward`` rotates activations."""
    b = R.shape[-1]
    blocks = v.reshape(*v.shape[:-1], -1, b)
    if R.shape[0] == 1:
        return (blocks @ R[0]).reshape(v.shape)
    return torch.einsum("...kj,kjc->...kc", blocks, R).reshape(v.shape)


def _rotate_output_blocks(y: torch.Tensor, R: torch.Tensor, share: bool) -> torch.Tensor:
    """peft <= 0.13: ``y @ blockdiag(R)[:out, :out]`` over y's last axis (out features); the rows after
    the last full block meet the top-left corner of the next block."""
    out, b = y.shape[-1], R.shape[-1]
    full = out // b
    blocks = R.expand(full, b, b) if share else R[:full]
    head = torch.einsum("...kj,kjc->...kc", y[..., : full * b].reshape(*y.shape[:-1], full, b), blocks)
    rest = y[..., full * b:]
    if rest.shape[-1]:
        corner = R[0 if share else full, : rest.shape[-1], : rest.shape[-1]]
        rest = rest @ corner
    return torch.cat([head.reshape(*y.shape[:-1], full * b), rest], dim=-1)


def max_orthogonality_error(R: torch.Tensor) -> float:
    eye = torch.eye(R.shape[-1], dtype=R.dtype)
    return (R @ R.transpose(-2, -1) - eye).abs().max().item() if R.numel() else 0.0


# -- the patch ----------------------------------------------------------------------------------------

class OftPatch(Patch):
    """One OFT rotation (and, for peft 0.14-0.15, output scale) of one module's weight."""

    def __init__(self, module: str, *, fmt: str, kind: str, raw: torch.Tensor, block: int, share: bool,
                 cayley: str, terms: int, coft: bool, eps: float, scale: torch.Tensor | None, tensor_name: str):
        super().__init__(module, ("weight",))
        self.fmt, self.kind, self.block, self.share = fmt, kind, block, share
        self.raw = raw.to(torch.float64)  # triangle vectors (v16) or full matrices (v13/v14)
        self.cayley, self.terms, self.coft, self.eps = cayley, terms, coft, eps
        self.scale = None if scale is None else scale.to(torch.float32).flatten()
        self.tensor_name = tensor_name
        self.weight_shape: tuple[int, ...] | None = None
        self._R: torch.Tensor | None = None  # (p, b, b) float64 rotation blocks, after COFT
        self._noted: set[str] = set()
        self._cond: tuple[float, float] | None = None

    # -- geometry ---------------------------------------------------------------------------------
    @property
    def stored_blocks(self) -> int:
        return self.raw.shape[0]

    def _describe_tensor(self) -> str:
        return f"{self.tensor_name} {list(self.raw.shape)}"

    def check(self, shapes: Shapes) -> None:
        shape = tuple(shapes["weight"])
        b = self.block
        where = f"{self.module}: {self._describe_tensor()}"
        if self.kind == "embedding":
            if len(shape) != 2:
                raise InputError(f"{where} rotates an embedding but the base weight is {list(shape)}, not (V, d)")
        elif len(shape) not in (2, 4):
            raise InputError(f"{where}: OFT covers Linear, Conv2d and Embedding layers, but the base weight is "
                             f"{list(shape)}; was the adapter trained on another model?")
        if self.fmt == "v13":  # output side: b = ceil(out/r) rows per block, the last one possibly cut
            if not self.share and math.ceil(shape[0] / self.stored_blocks) != b:
                raise InputError(f"{where}: {self.stored_blocks} blocks of {b} rows do not fit the "
                                 f"{shape[0]} output rows of the base weight {list(shape)} (PEFT<=0.13 used "
                                 "b = ceil(out/r)); was the adapter trained on another model?")
        else:  # input side: in (in*k*k for Conv2d, d for Embedding) split in blocks of b
            if len(shape) == 4 and shape[2] != shape[3]:
                raise UnsupportedError(f"{where}: the base Conv2d kernel is {shape[2]}x{shape[3]}; PEFT's OFT "
                                       "assumes a square kernel and cannot merge this either")
            n = math.prod(shape[1:])
            if n % b or (not self.share and self.stored_blocks * b != n):
                covered = "a multiple of " + str(b) if self.share else str(self.stored_blocks * b)
                raise InputError(f"{where} rotates {covered} input features but the base weight {list(shape)} "
                                 f"has {n}; was the adapter trained on another model?")
        if self.scale is not None and self.scale.numel() != shape[0]:
            raise InputError(f"{self.module}: oft_s has {self.scale.numel()} entries but the base weight "
                             f"{list(shape)} has {shape[0]} output features")
        if self.weight_shape is not None and self.weight_shape != shape:
            self._R = self._cond = None
        self.weight_shape = shape

    # -- the rotation -----------------------------------------------------------------------------
    def rotation(self) -> torch.Tensor:
        """The (p, b, b) float64 rotation blocks R_k, exactly as PEFT builds them (up to rounding)."""
        if self._R is not None:
            return self._R
        b, p = self.block, self.stored_blocks
        if self.fmt == "v16":
            Q = skew_from_triangle(self.raw, b)
            if self.coft:
                Q = project_frobenius(Q, self.eps / math.sqrt(p))
            if self.cayley == "exact":
                R = cayley_exact(Q)
            else:
                R = cayley_neumann(Q, self.terms, legacy=self.cayley == "neumann-legacy")
        else:
            M = self.raw
            if self.coft:
                M = project_frobenius(M, self._old_coft_radius())
            R = cayley_exact(0.5 * (M - M.transpose(-2, -1)))
        self._R = R
        return R

    def _old_coft_radius(self) -> float:
        b, p = self.block, self.stored_blocks
        if self.fmt == "v13":  # eps * ceil(out/r)^2 with ceil(out/r) = b
            return self.eps * b * b / math.sqrt(p)
        # v14: eps * ceil(out/r)^2, r = number of blocks = in/b
        assert self.scale is not None  # peft 0.14-0.15 always save oft_s
        out = self.scale.numel()
        if self.share:
            assert self.weight_shape is not None  # derived from the shapes by bind()
            r = math.prod(self.weight_shape[1:]) // b
        else:
            r = p
        return self.eps * math.ceil(out / r) ** 2 / math.sqrt(p)

    def _needs_shape(self) -> bool:
        return self.fmt == "v14" and self.coft and self.share

    def _action(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The matrices A_k the patch multiplies by (see rotate_columns / rotate_rows), and the cut last
        block of the output-side format."""
        R = self.rotation()
        if self.kind == "embedding":  # E' = E R: columns become E_k R_k = E_k (R_k^T)^T
            return R.transpose(-2, -1), None
        if self.fmt == "v13":  # W' = R^T W on the rows, R cut to out x out
            assert self.weight_shape is not None  # derived from the shapes by bind()
            out = self.weight_shape[0]
            rem = out % self.block
            last = None
            if rem:
                k = out // self.block
                last = R[0 if self.share else k, :rem, :rem].T
            return R.transpose(-2, -1), last
        return R, None  # W' = W R^T on column blocks

    def _rotate(self, W2: torch.Tensor, A: torch.Tensor, last: torch.Tensor | None) -> None:
        if self.fmt == "v13":
            full = W2.shape[0] // self.block
            rotate_rows(W2, A if self.share else A[:full], last)
        else:
            rotate_columns(W2, A)

    # -- merge / unmerge --------------------------------------------------------------------------
    def apply(self, tensors: Tensors) -> Tensors:
        W = tensors["weight"].contiguous()
        if self.weight_shape is None:
            self.check({"weight": tuple(W.shape)})
        W2 = W.view(W.shape[0], -1)
        A, last = self._action()
        self._rotate(W2, A, last)
        if self.scale is not None:
            W2.mul_(self.scale.to(W.dtype)[:, None])
        self._note_orthogonality("merged")
        return {"weight": W}

    def _conditions(self) -> tuple[float, float]:
        """Largest condition number of the blocks the merge used, and of the cut last block (peft<=0.13)."""
        if self._cond is None:
            A, last = self._action()
            if self.fmt == "v13" and not self.share:
                assert self.weight_shape is not None  # _action needed it too
                A = A[:self.weight_shape[0] // self.block]
            blocks = torch.linalg.cond(A).max().item() if A.numel() and A.shape[0] else 1.0
            cut = torch.linalg.cond(last).item() if last is not None else 1.0
            self._cond = (blocks, cut)
        return self._cond

    def why_not_invertible(self) -> str | None:
        if self.scale is not None and bool((self.scale == 0).any()):
            zeros = int((self.scale == 0).sum())
            return (f"oft_s has {zeros} zero entr{'y' if zeros == 1 else 'ies'}, so those output rows were "
                    "zeroed by the merge and are lost; only the base checkpoint has them")
        if self.weight_shape is None and (self.fmt == "v13" or self._needs_shape()):
            return None  # decided once the base shape is known (check() runs before any unmerge)
        blocks, cut = self._conditions()
        for cond, what in ((blocks, "a rotation block"), (cut, "the cut last block of this peft<=0.13 rotation")):
            if not math.isfinite(cond) or cond > _SINGULAR:
                return (f"{what} is singular (condition number {cond:.3g}), so the merge lost information; "
                        "only the base checkpoint has it")
        return None

    def revert(self, tensors: Tensors) -> Tensors:
        W = tensors["weight"].contiguous()
        if self.weight_shape is None:
            self.check({"weight": tuple(W.shape)})
        reason = self.why_not_invertible()
        if reason:
            raise NotInvertibleError(f"{self.module}: {reason}")
        W2 = W.view(W.shape[0], -1)
        if self.scale is not None:
            W2.div_(self.scale.to(W.dtype)[:, None])
        A, last = self._action()
        if self.fmt == "v13" and not self.share:
            A = A[:W2.shape[0] // self.block]
        blocks, cut = self._conditions()
        if max(blocks, cut) > _ILL_CONDITIONED:
            self.notes.append(f"the inverse rotation has condition number {max(blocks, cut):.3g}; the unmerged "
                              "weight carries the merged file's rounding errors amplified up to that much")
        self._rotate(W2, torch.linalg.inv(A), None if last is None else torch.linalg.inv(last))
        self._note_orthogonality("unmerged")
        return {"weight": W}

    def _note_orthogonality(self, what: str) -> None:
        dev = max_orthogonality_error(self.rotation())
        if dev > ORTHOGONALITY_NOTE and what not in self._noted:
            self._noted.add(what)
            how = ("with the exact inverse of every block (not the transpose)" if what == "unmerged"
                   else "as PEFT does")
            self.notes.append(f"the OFT rotation is not orthogonal (max|R R^T - I| = {dev:.3g}, "
                              f"{self._cayley_text()}); {what} {how}")

    # -- the unmerged forward path, for verify ----------------------------------------------------
    def layer(self, shapes: Shapes) -> Layer:
        return Embedding() if self.kind == "embedding" else default_layer(shapes)

    def forward(self, x: torch.Tensor, base: Tensors, layer: Layer) -> torch.Tensor:
        """PEFT's OFT forward, on activations: peft >= 0.14 rotates every block of b input features,
        ``x_k R_k``, before the base layer, then (0.14-0.15) scales the outputs by ``oft_s``; an
        Embedding's output rows are rotated after the lookup; peft <= 0.13 rotates the base output
        without its bias, ``(x Wᵀ) R`` with R cut to out x out. The blocks come from ``rotation()``, the
        parameterization shared with the merge.

        Conv2d: every unfolded input patch is rotated, i.e. the convolution with ``W Rᵀ`` that PEFT's merge
        (and its 0.14-0.15 forward) computes. PEFT 0.21.2's unmerged forward instead folds the rotated
        patches back into an image (summing where kxk patches overlap) and convolves that, which for
        k > 1 is not what its own merge computes; the merge is what a merged file must match."""
        R = like(self.rotation(), x)
        if self.kind == "embedding":
            return _rotate_features(layer(x, base), R)
        W = {"weight": base["weight"]}
        bias = base.get("bias")
        if self.fmt == "v13":
            # output features to the last axis (a no-op for a Linear), rotated, and back
            y = _rotate_output_blocks(layer(x, W).movedim(1, -1), R, self.share).movedim(-1, 1)
        else:
            y = input_side(layer, x, W, lambda v: _rotate_features(v, R))
            if self.scale is not None:
                y = y * like(self.scale, x).view(-1, *([1] * (y.dim() - 2)))
        return y if bias is None else y + bias.view(-1, *([1] * (y.dim() - 2)))

    # -- reporting --------------------------------------------------------------------------------
    def _cayley_text(self) -> str:
        if self.cayley == "exact":
            return "exact Cayley"
        series = "peft 0.16-0.17 series" if self.cayley == "neumann-legacy" else "peft>=0.18 series"
        return f"Cayley-Neumann, {self.terms} terms, {series}"

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "format": FORMAT_NAMES[self.fmt],
            "kind": self.kind if self.kind == "embedding"
            else "linear or conv2d" if self.weight_shape is None
            else "conv2d" if len(self.weight_shape) == 4 else "linear",
            "side": "output" if self.fmt == "v13" else "input",
            "block_size": self.block,
            "stored_blocks": self.stored_blocks,
            "block_share": self.share,
            "cayley": self._cayley_text(),
            "coft": self.coft,
        }
        if self.coft:
            info["eps"] = self.eps
        if self.scale is not None:
            info["output_scale"] = "oft_s"
        if not (self._needs_shape() and self.weight_shape is None):
            info["max_abs_RRt_minus_I"] = max_orthogonality_error(self.rotation())
        return info


# -- the method ---------------------------------------------------------------------------------------

@register
class Oft(Method):
    peft_types = ("OFT",)
    param_names = frozenset({"oft_R", "oft_embedding_R", "oft_r", "oft_s"})
    support = (Support("OFT (oft_R >=0.16 both Neumann series and exact Cayley; oft_r+oft_s 0.14-0.15; "
                       "output-side <=0.13; block_share, coft)", "Linear, Conv2d, Embedding",
                       "exact, block by block", "exact (inverse of each block; orthogonality deviation reported)",
                       "0.21.2, 0.17.1, 0.15.2, 0.13.2"),)

    def summary(self, config: AdapterConfig) -> dict[str, Any]:
        raw = config.raw
        info: dict[str, Any] = {}
        if "oft_block_size" not in raw:
            info["config_format"] = "peft<=0.13 (exact Cayley, output side)"
        elif "use_cayley_neumann" not in raw:
            info["config_format"] = "peft 0.14-0.15 (exact Cayley, oft_s scale)"
        else:
            neumann = bool(config.get("use_cayley_neumann", True))
            info["cayley"] = "neumann" if neumann else "exact"
            if neumann:
                info["neumann_terms"] = int(config.get("num_cayley_neumann_terms", 5))
                info["neumann_series"] = self._series(config)
        info["block_share"] = bool(config.get("block_share", False))
        info["coft"] = bool(config.get("coft", False))
        return info

    @staticmethod
    def _series(config: AdapterConfig) -> str:
        version = config.peft_version
        return "peft>=0.18" if version is not None and version >= _NEUMANN_CHANGED else "peft 0.16-0.17 (legacy)"

    def patch(self, params: ModuleParams) -> Patch:
        config, t, module = params.config, params.tensors, params.module
        where = f"{config.path.parent}: module {module!r}"
        new = [k for k in ("oft_R.weight", "oft_embedding_R.weight") if k in t]
        old = [k for k in ("oft_r", "oft_s") if k in t]
        if new and old:
            raise InputError(f"{where} holds both {new[0]} (peft>=0.16) and {old[0]} (older PEFT); the adapter "
                             "file mixes two OFT formats")
        if len(new) == 2:
            raise InputError(f"{where} holds both oft_R.weight and oft_embedding_R.weight; a module is either "
                             "a Linear/Conv2d or an Embedding")
        coft = bool(config.get("coft", False))
        eps = float(config.get("eps", 6e-5))
        if new:
            return self._patch_v16(params, new[0], coft, eps)
        if "oft_r" not in t:
            params.require("oft_r")  # only oft_s: raises with the list of what is there
        M = t["oft_r"]
        scale = t.get("oft_s")
        if M.ndim != 3 or M.shape[1] != M.shape[2] or M.shape[0] == 0:
            raise InputError(f"{where}: oft_r is {list(M.shape)}, expected (blocks, b, b)")
        share = M.shape[0] == 1
        if bool(config.get("block_share", False)) and not share:
            raise InputError(f"{where}: block_share is set but oft_r holds {M.shape[0]} blocks")
        if scale is not None:  # peft 0.14-0.15: input side, then per-output scale
            if scale.ndim != 2 or scale.shape[1] != 1:
                raise InputError(f"{where}: oft_s is {list(scale.shape)}, expected (out, 1)")
            return OftPatch(module, fmt="v14", kind="linear", raw=M, block=M.shape[1], share=share,
                            cayley="exact", terms=0, coft=coft, eps=eps, scale=scale, tensor_name="oft_r")
        if "oft_block_size" in config.raw:
            # peft 0.14-0.15 always save oft_s, and peft<=0.13 configs have no oft_block_size.
            params.require("oft_r", "oft_s")
        return OftPatch(module, fmt="v13", kind="linear", raw=M, block=M.shape[1], share=share,
                        cayley="exact", terms=0, coft=coft, eps=eps, scale=None, tensor_name="oft_r")

    def _patch_v16(self, params: ModuleParams, name: str, coft: bool, eps: float) -> Patch:
        config, module = params.config, params.module
        where = f"{config.path.parent}: module {module!r}"
        vec = params.tensors[name]
        if vec.ndim != 2 or vec.shape[0] == 0:
            raise InputError(f"{where}: {name} is {list(vec.shape)}, expected (blocks, b(b-1)/2)")
        b = block_size_from_triangle(vec.shape[1])
        if b is None:
            raise InputError(f"{where}: {name} has {vec.shape[1]} entries per block, which is not b(b-1)/2 for "
                             "any block size b; the adapter file is damaged")
        share = vec.shape[0] == 1
        if bool(config.get("block_share", False)) and not share:
            raise InputError(f"{where}: block_share is set but {name} holds {vec.shape[0]} blocks")
        if bool(config.get("use_cayley_neumann", True)):
            terms = int(config.get("num_cayley_neumann_terms", 5))
            if terms < 1:
                raise InputError(f"{config.path}: num_cayley_neumann_terms is {terms}; it must be at least 1")
            legacy = config.peft_version is None or config.peft_version < _NEUMANN_CHANGED
            cayley = "neumann-legacy" if legacy else "neumann"
        else:
            terms, cayley = 0, "exact"
        kind = "embedding" if name == "oft_embedding_R.weight" else "linear"
        return OftPatch(module, fmt="v16", kind=kind, raw=vec, block=b, share=share, cayley=cayley, terms=terms,
                        coft=coft, eps=eps, scale=None, tensor_name=name)
