"""Poly / Multi-Head Routing (``peft_type: POLY``), merged for one fixed task (``--task-id N``).

PEFT has no merge for Poly: each layer's router mixes ``n_skills`` LoRA modules per input, by the
input's task id. For a fixed task the mixture is static, so its change can be folded into W. At
inference (eval mode) PEFT's ``PolyRouter`` gives, for task ``t``,

* ``w = sigmoid(module_logits[t]).view(S, K)``, then ``w = w / (w.sum(-1, keepdim=True) + 1e-12)``
  (S = ``n_splits``, K = ``n_skills``; in training it samples a relaxed Bernoulli instead);
* ``A_t[q] = Σ_k w[q,k] · poly_lora_A[q,k]`` (``in/S × r``), stacked over the splits to ``(in, r)``;
* ``B_t[q] = Σ_k w[q,k] · poly_lora_B[q,k]`` (``r × out/S``), laid side by side to ``(r, out)``;
* the layer adds ``x · A_t · B_t / r`` (no alpha), i.e. ``ΔW_t = (A_t B_t)ᵀ / r`` for an ``(out, in)`` Linear.

Every layer has its own router (``poly_router.module_logits``, ``(n_tasks, S·K)``). Without a task
id there is nothing static to merge, so the merge is refused with a hint. Additive: unmerging with
the same task id is exact.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..errors import InputError, UnsupportedError
from .base import AdditivePatch, Method, ModuleParams, Option, Patch, Shapes, Support, Tensors, like, register
from .layers import Layer

if TYPE_CHECKING:  # adapters import methods; the config is only needed for type hints here
    from ..adapters.config import AdapterConfig

_EPS = 1e-12  # PEFT's router: normalisation guard


def mixing_weights(logits: torch.Tensor, task: int, splits: int, skills: int) -> torch.Tensor:
    """PEFT's eval-mode router output for one task: ``(S, K)``, each row summing to 1."""
    w = torch.sigmoid(logits[task].to(torch.float32).view(splits, skills))
    return w / (w.sum(dim=-1, keepdim=True) + _EPS)


class PolyPatch(AdditivePatch):
    """ΔW_t = (A_t B_t)ᵀ / r for the chosen task."""

    def __init__(self, module: str, A: torch.Tensor, B: torch.Tensor, logits: torch.Tensor, task: int | None):
        super().__init__(module, ("weight",))
        self.A, self.B, self.logits, self.task = A, B, logits, task
        self.splits, self.skills, self.in_split, self.rank = A.shape
        self.out_split = B.shape[3]

    def _require_task(self) -> int:
        # Refused here rather than at load, so that ``inspect`` can still show a Poly adapter.
        if self.task is None:
            tasks = self.logits.shape[0]
            raise UnsupportedError(f"Poly routes by task; pass --task-id N (API: "
                                   f"options={{'task_id': N}}) to merge one task's mixture, 0 <= N < {tasks}")
        return self.task

    def check(self, shapes: Shapes) -> None:
        self._require_task()
        want = (self.splits * self.out_split, self.splits * self.in_split)
        if shapes["weight"] != want:
            raise InputError(
                f"{self.module}: poly_lora_A {list(self.A.shape)} and poly_lora_B {list(self.B.shape)} make a "
                f"{list(want)} change but the base weight is {list(shapes['weight'])}; Poly applies to Linear "
                "layers whose in/out features divide by n_splits. Was the adapter trained on another model?")

    def weights(self) -> torch.Tensor:
        return mixing_weights(self.logits, self._require_task(), self.splits, self.skills)

    def delta(self) -> Tensors:
        w = self.weights()
        A = torch.einsum("qs,qsdr->qdr", w, self.A.to(torch.float32)).reshape(-1, self.rank)  # (in, r)
        B = torch.einsum("qs,qsrd->qrd", w, self.B.to(torch.float32)).transpose(0, 1).reshape(self.rank, -1)
        return {"weight": (B.T @ A.T).div_(self.rank)}  # (out, in) = ((in, r)(r, out))ᵀ / r

    def forward(self, x: torch.Tensor, base: Tensors, layer: Layer) -> torch.Tensor:
        """PEFT's ``PolyLayer.forward`` in eval mode for this task: the router's mixture (``mixing_weights``, the
        parameterisation shared with the merge) mixes the skills' A and B per split, and the layer adds
        ``x·A_t·B_t / r`` on activations."""
        w = like(self.weights(), x)
        A = torch.einsum("qs,qsdr->qdr", w, like(self.A, x)).reshape(-1, self.rank)  # (in, r), splits stacked
        B = torch.einsum("qs,qsrd->rqd", w, like(self.B, x)).reshape(self.rank, -1)  # (r, out), splits side by side
        return layer(x, base) + (x @ A) @ B / self.rank

    def describe(self) -> dict[str, Any]:
        task = self.task if self.task is not None else "none (pass --task-id)"
        info: dict[str, Any] = {"kind": "linear", "task_id": task, "rank": self.rank, "n_splits": self.splits,
                                "n_skills": self.skills, "n_tasks": self.logits.shape[0]}
        if self.task is not None:
            info["mixing_weights"] = [[round(v, 6) for v in row] for row in self.weights().tolist()]
        return info


@register
class Poly(Method):
    peft_types = ("POLY",)
    param_names = frozenset({"poly_lora_A", "poly_lora_B", "poly_router"})
    options = (Option("task_id", "Poly: merge the routed change for this task.", int),)
    support = (Support("Poly / MHR (n_splits >= 1), for one task chosen with --task-id",
                       "Linear", "exact (the router's eval-mode mixture for that task, folded in)",
                       "exact (with the same --task-id)", "0.21.2 (checked against its forward)"),)

    def check_config(self, config: AdapterConfig) -> None:
        poly_type = config.get("poly_type", "poly")
        if poly_type != "poly":
            raise UnsupportedError(f"{config.path}: Poly with poly_type={poly_type!r} is not supported (PEFT only "
                                   "implements 'poly')")

    def summary(self, config: AdapterConfig) -> dict[str, Any]:
        return {"n_tasks": config.get("n_tasks"), "n_skills": config.get("n_skills"),
                "n_splits": config.get("n_splits"), "r": config.get("r"),
                "rule": "dW_t = (A_t B_t)^T / r, A_t/B_t mixed by sigmoid(module_logits[t]) normalised per split"}

    def patch(self, params: ModuleParams) -> Patch:
        config = params.config
        A, B, logits = params.require("poly_lora_A", "poly_lora_B", "poly_router.module_logits")
        where = f"{config.path.parent}: module {params.module!r}"
        if A.ndim != 4 or B.ndim != 4 or logits.ndim != 2:
            raise InputError(f"{where}: poly_lora_A {list(A.shape)}, poly_lora_B {list(B.shape)} and "
                             f"poly_router.module_logits {list(logits.shape)} must be 4-D, 4-D and 2-D")
        splits, skills, _, rank = A.shape
        if B.shape[:3] != (splits, skills, rank) or logits.shape[1] != splits * skills or rank == 0:
            raise InputError(f"{where}: poly_lora_A {list(A.shape)} (n_splits, n_skills, in/n_splits, r), poly_lora_B "
                             f"{list(B.shape)} (n_splits, n_skills, r, out/n_splits) and poly_router.module_logits "
                             f"{list(logits.shape)} (n_tasks, n_splits*n_skills) do not fit together")
        for field, value in (("n_splits", splits), ("n_skills", skills), ("r", rank), ("n_tasks", logits.shape[0])):
            if config.raw.get(field) is not None and config.raw[field] != value:
                raise InputError(f"{where}: the tensors have {field}={value} but adapter_config.json says "
                                 f"{config.raw[field]}; the adapter file and its config disagree")
        tasks = logits.shape[0]
        task = params.context.options.get("task_id")
        if task is not None and (isinstance(task, bool) or not isinstance(task, int) or not 0 <= task < tasks):
            raise InputError(f"{config.path.parent}: --task-id {task!r} is out of range: this Poly adapter has "
                             f"{tasks} task(s), 0 <= N < {tasks}")
        return PolyPatch(params.module, A, B, logits, task)
