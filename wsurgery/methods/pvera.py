"""PVeRA (``peft_type: PVERA``): probabilistic VeRA, merged along its mean path.

Per layer ``pvera_lambda_b (out)`` and ``pvera_lambda_d (2r)``; shared ``A (2r, max_in)`` and
``B (max_out, r)``, saved as ``base_model.pvera_A`` / ``base_model.pvera_B`` or regenerated from
``projection_prng_key`` (``torch.nn.init.kaiming_uniform_`` with a seeded CPU generator, A first, then
B, float32, max dims over all targeted Linear/Conv1D layers). The first half of λ_d and of A's rows
gives the mean μ, the second the log-variance; like PEFT, the merge keeps only the mean:
``ΔW = Tf((λ_b ⊙ B[:out]) @ (λ_d[:r] ⊙ A[:r, :in]))``. The merged model therefore matches PVeRA's
deterministic inference (``sample_at_inference=false``), not its sampled one. Additive: exact unmerge.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .base import Support, register
from .vera import Generate, _VeraFamily

if TYPE_CHECKING:  # adapters import methods; the config is only needed for type hints here
    from ..adapters.config import AdapterConfig


def pvera_generator(r: int, key: int) -> Generate:
    def generate(max_out: int, max_in: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator(device="cpu").manual_seed(key)
        A = torch.nn.init.kaiming_uniform_(torch.empty(r * 2, max_in), generator=g)
        B = torch.nn.init.kaiming_uniform_(torch.empty(max_out, r), generator=g)
        return A, B
    return generate


@register
class Pvera(_VeraFamily):
    peft_types = ("PVERA",)
    param_names = frozenset({"pvera_lambda_b", "pvera_lambda_d"})
    shared_names = frozenset({"pvera_A", "pvera_B"})
    support = (Support("PVeRA (mean path; saved or PRNG-regenerated projections)", "Linear, Conv1D (fan_in_fan_out)",
                       "exact, mean μ path as PEFT", "exact", "0.21.2"),)

    label = "PVeRA"
    prefix = "pvera"
    a_rows = 2

    def generator(self, r: int, key: int) -> Generate:
        return pvera_generator(r, key)

    def summary(self, config: AdapterConfig) -> dict[str, Any]:
        return {**super().summary(config), "merged_path": "mean (μ)",
                "sample_at_inference": bool(config.get("sample_at_inference", False))}

    def extra_notes(self, config: AdapterConfig) -> list[str]:
        if config.get("sample_at_inference", False):
            return [("PVeRA adapter with sample_at_inference=true: the merged weights carry only the mean (μ) path, "
                     "as PEFT's merge does; the sampled inference has no weight-space equivalent")]
        return []
