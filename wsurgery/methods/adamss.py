"""AdaMSS (``peft_type: ADAMSS``) on Linear layers: weight and bias change together.

PEFT appends the bias as a last column, ``[W | b] (out, in[+1])``, and adds to it the rows

    ΔW_aug[scatter_index] = concat_i(B_i @ A_i @ newB)

with ``adamss_A.{i} (r_i, r)``, ``adamss_B.{i} (seg_i, r_i)`` and ``adamss_newB (r, in[+1])`` saved.
``scatter_index`` is not saved. PEFT derives it when it wraps the layer:

1. ``U, _, V = torch.svd_lowrank([W | b] in fp32, q=min(r, out, in[+1]), niter=2)`` right after
   ``torch.manual_seed(random_seed)`` in a forked CPU RNG (newB is ``V^T``, so the saved newB checks
   that we reproduced this step);
2. ``sklearn.cluster.KMeans(n_clusters=min(num_subspaces, out), init="random", n_init=1, max_iter=10,
   random_state=123456789).fit_predict(U)`` on the float32 rows of U;
3. ``scatter_index = concat_i(where(labels == i))``, clusters in label order.

We reproduce step 2 without scikit-learn: its Lloyd algorithm (scikit-learn >= 1.1, where ``lloyd`` is
the default) step by step in float32 numpy (the same initial centres from numpy's
``RandomState.choice``, the same chunk-free E-step, empty-cluster relocation, centre averaging,
tolerance and final relabelling). The result is verified where the files allow it: the cluster sizes
must equal the saved ``adamss_B.{i}`` row counts, or the adapter is refused; sample-to-centre distance
margins close to float32 rounding (where scikit-learn's multi-threaded sums could decide differently)
are reported in a note.

Unmerge would subtract the same change, but the clustering needs the *original* [W | b]: the merged
weight clusters differently, and even a change of a few percent of W moves the clustering of its
singular vectors (a fixed-point search from the merged weight does not find it back), so unmerge is
refused.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..errors import InputError, UnsupportedError
from .base import Method, ModuleParams, Patch, Shapes, Support, Tensors, like, register
from .layers import Layer

if TYPE_CHECKING:  # adapters import methods; the config is only needed for type hints here
    from ..adapters.config import AdapterConfig

KMEANS_SEED = 123456789  # PEFT's clustering_Z
KMEANS_ITERATIONS = 10
KMEANS_TOL = 1e-4  # scikit-learn's default
TIGHT_MARGIN = 1e-7  # relative distance margin of about one float32 rounding step: a genuine near-tie


# -- scikit-learn's KMeans(init="random", algorithm="lloyd"), dense float32 --------------------------

def _e_step(X: np.ndarray, centers: np.ndarray, x_sq: np.ndarray) -> tuple[np.ndarray, float]:
    """Labels (int32, first minimum wins) and the smallest relative gap to the runner-up centre."""
    c_sq = np.einsum("ij,ij->i", centers, centers)
    dist = c_sq[None, :] - np.float32(2.0) * (X @ centers.T)  # argmin-equivalent to the squared distance
    labels = np.argmin(dist, axis=1).astype(np.int32)
    if centers.shape[0] < 2:
        return labels, float("inf")
    two = np.partition(dist, 1, axis=1)[:, :2].astype(np.float64)
    scale = x_sq.astype(np.float64) + c_sq[labels].astype(np.float64)
    margin = float(np.min((two[:, 1] - two[:, 0]) / np.maximum(scale, 1e-30)))
    return labels, margin


def _center_shift(old: np.ndarray, new: np.ndarray) -> np.ndarray:
    """``_euclidean_dense_dense``: float32 sums of four squares at a time, then the remainder."""
    d = new - old
    sq = d * d
    n4 = (sq.shape[1] // 4) * 4
    result = np.zeros(sq.shape[0], dtype=np.float32)
    for k in range(0, n4, 4):
        result += ((sq[:, k] + sq[:, k + 1]) + sq[:, k + 2]) + sq[:, k + 3]
    for k in range(n4, sq.shape[1]):
        result += sq[:, k]
    return np.sqrt(result.astype(np.float64)).astype(np.float32)


def kmeans_random_lloyd(data: np.ndarray, n_clusters: int, *, max_iter: int = KMEANS_ITERATIONS,
                        seed: int = KMEANS_SEED, tol: float = KMEANS_TOL) -> tuple[np.ndarray, float]:
    """Labels of ``KMeans(n_clusters, init="random", n_init=1, max_iter, random_state=seed).fit_predict``
    on float32 data, and the smallest relative assignment margin seen (how close any point came to a tie)."""
    X = np.array(data, dtype=np.float32, order="C", copy=True)
    n = X.shape[0]
    sample_weight = np.ones(n, dtype=X.dtype)
    tol_ = np.mean(np.var(X, axis=0)) * tol
    X -= X.mean(axis=0)
    x_sq = np.einsum("ij,ij->i", X, X)
    rng = np.random.RandomState(seed)
    seeds = rng.choice(n, size=n_clusters, replace=False, p=sample_weight / sample_weight.sum())
    centers = X[seeds]
    labels_old = np.full(n, -1, dtype=np.int32)
    min_margin = float("inf")
    strict = False
    for _ in range(max_iter):
        labels, margin = _e_step(X, centers, x_sq)
        min_margin = min(min_margin, margin)
        weight = np.zeros(n_clusters, dtype=X.dtype)
        new = np.zeros_like(centers)
        np.add.at(weight, labels, sample_weight)
        np.add.at(new, labels, X * sample_weight[:, None])
        empty = np.where(np.equal(weight, 0))[0].astype(np.int32)
        if empty.size:  # _relocate_empty_clusters_dense
            distances = ((X - centers[labels]) ** 2).sum(axis=1)
            far = np.argpartition(distances, -empty.size)[:-empty.size - 1:-1].astype(np.int32)
            if np.max(distances) != 0:
                for new_id, far_idx in zip(empty, far):
                    w = sample_weight[far_idx]
                    old_id = labels[far_idx]
                    new[old_id] -= X[far_idx] * w
                    new[new_id] = X[far_idx] * w
                    weight[new_id] = w
                    weight[old_id] -= w
        biggest = np.argmax(weight)  # _average_centers
        for j in range(n_clusters):
            if weight[j] > 0:
                new[j] *= np.float32(1.0 / np.float64(weight[j]))
            else:
                new[j] = new[biggest]
        shift = _center_shift(centers, new)
        centers = new
        if np.array_equal(labels, labels_old):
            strict = True
            break
        if (shift ** 2).sum() <= tol_:
            break
        labels_old[:] = labels
    if not strict:
        labels, margin = _e_step(X, centers, x_sq)
        min_margin = min(min_margin, margin)
    return labels, min_margin


# -- PEFT's update_layer steps -------------------------------------------------------------------------

def left_factors(aug: torch.Tensor, r: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's ``slice_pca`` on one (out, in[+1]) matrix: (U, V^T) of ``svd_lowrank(q=min(r, out, in), niter=2)``."""
    q = min(r, *aug.shape)
    # svd_lowrank's rounding depends on the input's memory alignment (MKL's SIMD paths); PEFT runs it on
    # freshly allocated (64-byte aligned) memory, so we do too: near-tied rows then cluster the same way.
    aligned = aug.to(torch.float32).clone(memory_format=torch.contiguous_format)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        U, _, V = torch.svd_lowrank(aligned, q=q, niter=2, M=None)
    return U[:, :q], V[:, :q].T


def scatter_index(aug: torch.Tensor, r: int, seed: int, num_subspaces: int) -> tuple[torch.Tensor, list[int], float,
                                                                                      torch.Tensor]:
    """The row order PEFT scatters the subspace outputs to; also the cluster sizes, the smallest
    assignment margin and the V^T it saved as newB."""
    U, Vt = left_factors(aug, r, seed)
    k = min(num_subspaces, U.shape[0])
    labels, margin = kmeans_random_lloyd(U.numpy(), k)
    labels_t = torch.from_numpy(labels).long()
    groups = [torch.where(labels_t == i)[0] for i in range(int(labels_t.max()) + 1)]
    return torch.cat(groups), [len(g) for g in groups], margin, Vt


class AdamssPatch(Patch):
    """[W | b] += scatter(concat_i(B_i A_i newB)) with the scatter index recomputed from [W | b]."""

    def __init__(self, module: str, A: list[torch.Tensor], B: list[torch.Tensor], newB: torch.Tensor, r: int,
                 num_subspaces: int, seed: int):
        super().__init__(module, ("weight",), ("bias",))
        self.A, self.B, self.newB = A, B, newB
        self.r, self.num_subspaces, self.seed = r, num_subspaces, seed
        self.sizes = [b.shape[0] for b in B]
        self.has_bias_column = False
        self.margin: float | None = None

    def check(self, shapes: Shapes) -> None:
        w = shapes["weight"]
        if len(w) != 2:
            raise InputError(f"{self.module}: AdaMSS changes Linear weights, but the base weight is {list(w)}")
        out, inp = w
        self.has_bias_column = "bias" in shapes
        cols = inp + self.has_bias_column
        if self.newB.shape[1] != cols:
            hint = (" (PEFT appends the bias as a column: the base has a bias the adapter did not see, or lacks one "
                    "it saw)") if self.newB.shape[1] in (inp, inp + 1) else ""
            raise InputError(f"{self.module}: adamss_newB is {list(self.newB.shape)} but the base weight {list(w)}"
                             f"{' with' if self.has_bias_column else ' without'} a bias needs {cols} columns{hint}")
        if sum(self.sizes) != out:
            raise InputError(f"{self.module}: the adamss_B.* blocks have {sum(self.sizes)} rows in all, but the base "
                             f"weight has {out} outputs; was the adapter trained on another model?")
        if len(self.sizes) != min(self.num_subspaces, out):
            raise InputError(f"{self.module}: {len(self.sizes)} adamss_B blocks, but num_subspaces="
                             f"{self.num_subspaces} gives {min(self.num_subspaces, out)} for {out} outputs")
        if self.newB.shape[0] != min(self.r, out, cols):
            raise InputError(f"{self.module}: adamss_newB has {self.newB.shape[0]} rows, but r={self.r} gives "
                             f"{min(self.r, out, cols)} for this base weight")

    # -- the change --------------------------------------------------------------------------------
    def _augmented(self, tensors: Tensors) -> torch.Tensor:
        W = tensors["weight"]
        return torch.cat((W, tensors["bias"][:, None]), dim=1) if self.has_bias_column else W

    def _index(self, aug: torch.Tensor) -> tuple[torch.Tensor, list[int], float, torch.Tensor]:
        return scatter_index(aug, self.r, self.seed, self.num_subspaces)

    def _delta(self, index: torch.Tensor, rows: int) -> torch.Tensor:
        newB = self.newB.to(torch.float32)
        chunks = [B.to(torch.float32) @ A.to(torch.float32) @ newB for A, B in zip(self.A, self.B)]
        delta = torch.zeros(rows, newB.shape[1], dtype=torch.float32)
        delta[index] = torch.cat(chunks, dim=0)
        return delta

    def _add(self, tensors: Tensors, delta: torch.Tensor, sign: float) -> Tensors:
        inp = tensors["weight"].shape[1]
        tensors["weight"].add_(delta[:, :inp], alpha=sign)
        if self.has_bias_column:
            tensors["bias"].add_(delta[:, inp], alpha=sign)
        return tensors

    def apply(self, tensors: Tensors) -> Tensors:
        aug = self._augmented(tensors)
        index, sizes, margin, Vt = self._index(aug)
        if sizes != self.sizes:
            raise UnsupportedError(
                f"{self.module}: AdaMSS's row clustering (not saved; PEFT recomputes it with scikit-learn's KMeans) "
                f"gives clusters of {sizes} rows here, but the adapter's adamss_B blocks have {self.sizes}: the "
                "clustering cannot be reproduced for this base (another base model, or a clustering scikit-learn "
                "computed differently), so the change cannot be placed")
        self._check_newb(Vt)
        self.margin = margin
        if margin < TIGHT_MARGIN:
            self.notes.append(
                f"{self.module}: a row of the base weight lies within float32 rounding of two AdaMSS clusters "
                f"(relative margin {margin:.1e}); the cluster sizes match the adapter's, but scikit-learn's "
                "summation order could have placed that row differently")
        return self._add(tensors, self._delta(index, aug.shape[0]), 1.0)

    def _check_newb(self, Vt: torch.Tensor) -> None:
        newB = self.newB.to(torch.float32)
        err = (Vt - newB).abs().max().item() if Vt.shape == newB.shape else float("inf")
        # newB was rounded to the base dtype (bf16: 2^-9 relative) before it was saved, whatever dtype it was
        # saved in; svd_lowrank itself varies by ~1e-6 with memory alignment. A different base differs by O(1).
        tol = 2.0 ** -7 * max(newB.abs().max().item(), 1e-30)
        if err > tol:
            raise UnsupportedError(
                f"{self.module}: the low-rank SVD of the base weight does not reproduce the adapter's adamss_newB (max "
                f"difference {err:.2g}): the base is not the one the adapter was made for, so AdaMSS's clustering "
                "cannot be recomputed")

    def forward(self, x: torch.Tensor, base: Tensors, layer: Layer) -> torch.Tensor:
        """PEFT's forward: ``base_layer(x)`` plus ``concat_i(B_i A_i newB [x | 1])`` scattered to the output
        features by the clustering of [W | b]. The clustering (``scatter_index``: svd_lowrank + KMeans) is
        the parameterisation, shared with the merge; the product runs on activations."""
        W = base["weight"]
        aug = torch.cat((W, base["bias"][:, None]), dim=1) if "bias" in base else W
        index, sizes, _, _ = scatter_index(aug.cpu(), self.r, self.seed, self.num_subspaces)
        if sizes != self.sizes:
            raise UnsupportedError(f"{self.module}: AdaMSS's row clustering gives clusters of {sizes} rows here, but "
                                   f"the adapter's adamss_B blocks have {self.sizes}: no forward path to verify with")
        inputs = torch.cat((x, torch.ones_like(x[:, :1])), dim=1) if "bias" in base else x
        projected = inputs @ like(self.newB, x).T
        chunks = torch.cat([(projected @ like(A, x).T) @ like(B, x).T for A, B in zip(self.A, self.B)], dim=1)
        change = torch.zeros(x.shape[0], W.shape[0], device=x.device).index_copy_(1, index.to(x.device), chunks)
        return layer(x, base) + change

    def why_not_invertible(self) -> str | None:
        return ("AdaMSS places its change by a KMeans clustering of the original [W | b], which is not saved, and the "
                "merged weight clusters differently (the clustering of singular vectors is far too sensitive for a "
                "search from the merged weight to find it back), so the change cannot be located. Keep the base "
                "checkpoint and merge from it again instead")

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {"kind": "linear", "r": self.r, "subspaces": len(self.B),
                                "rows_per_subspace": self.sizes, "ranks": [a.shape[0] for a in self.A],
                                "newB_columns": self.newB.shape[1],
                                "scatter_index": "recomputed (svd_lowrank + KMeans reproduction)"}
        if self.margin is not None:
            info["min_assignment_margin"] = self.margin
        return info


@register
class Adamss(Method):
    peft_types = ("ADAMSS",)
    param_names = frozenset({"adamss_A", "adamss_B", "adamss_newB"})
    support = (
        Support("AdaMSS (incl. dynamic rank, ASA)", "Linear (weight and bias)",
                "exact given the clustering: scikit-learn's KMeans reproduced in numpy and checked against the saved "
                "subspace sizes and newB; refused where they disagree",
                "refused: the clustering of the original weight is not saved and the merged weight clusters "
                "differently",
                "0.21.2 with scikit-learn 1.9.1"),
    )

    def check_config(self, config: AdapterConfig) -> None:
        for name in ("r", "num_subspaces"):
            value = config.get(name)
            if not isinstance(value, int) or value <= 0:
                raise InputError(f"{config.path}: AdaMSS {name}={value!r} must be a positive integer")

    def summary(self, config: AdapterConfig) -> dict[str, Any]:
        return {"r": config.get("r"), "num_subspaces": config.get("num_subspaces"),
                "subspace_rank": config.get("subspace_rank"), "random_seed": config.get("random_seed", 0),
                "use_dynamic_rank": config.get("use_dynamic_rank", False)}

    def patch(self, params: ModuleParams) -> Patch:
        config, t = params.config, params.tensors
        where = f"{config.path.parent}: module {params.module!r}"
        (newB,) = params.require("adamss_newB")
        indices = sorted({int(m.group(2)) for k in t if (m := re.fullmatch(r"adamss_(A|B)\.(\d+)", k))})
        extra = [k for k in t if k != "adamss_newB" and not re.fullmatch(r"adamss_(A|B)\.\d+", k)]
        if extra:
            raise InputError(f"{where}: unexpected AdaMSS tensor(s) {extra}")
        if indices != list(range(len(indices))) or not indices:
            raise InputError(f"{where}: the adamss_A.*/adamss_B.* blocks are numbered {indices}, expected 0..n-1")
        A = params.require(*(f"adamss_A.{i}" for i in indices))
        B = params.require(*(f"adamss_B.{i}" for i in indices))
        r = int(config.get("r"))
        if newB.ndim != 2:
            raise InputError(f"{where}: adamss_newB is {list(newB.shape)}, expected [r, in(+1)]")
        for i, (a, b) in enumerate(zip(A, B)):
            if a.ndim != 2 or b.ndim != 2 or a.shape[1] != newB.shape[0] or b.shape[1] != a.shape[0]:
                raise InputError(f"{where}: adamss_A.{i} {list(a.shape)}, adamss_B.{i} {list(b.shape)} and adamss_newB "
                                 f"{list(newB.shape)} do not chain (expected [r_i, q], [seg_i, r_i], [q, in(+1)])")
        return AdamssPatch(params.module, A, B, newB, r, int(config.get("num_subspaces")),
                           int(config.get("random_seed", 0)))
