"""``wsurgery resize LORA OUT``: a kohya / diffusers-style LoRA file at another rank, per module, as kohya
sd-scripts' ``networks/resize_lora.py`` does it (the same rank rules, alphas and report numbers).

Each plain LoRA module's product ``up·down`` (unscaled) is decomposed (``factored_svd``: the SVD kohya takes of
the product, without forming it); the new rank is fixed (``rank``; ``conv_rank`` for Conv2d modules) or chosen
per module from the singular values S:

- ``ratio``: kohya's ``sv_ratio``, keep the S above ``S[0] / ratio``;
- ``fro``: ``sv_fro``, the fewest S whose squares reach ``fro²`` of ``‖S‖²`` (Frobenius norm kept);
- ``energy``: ``sv_cumulative``, the fewest S whose sum reaches ``energy`` of ``ΣS``;

capped at ``rank`` (``conv_rank``), or at the module's own rank when none is given; a zero change gets rank 1.
``up = U·diag(S)``, ``down = Vh`` (Conv2d: ``down`` (r, in, k, k), ``up`` (out, r, 1, 1)) and ``alpha = s·r'``
where ``s`` is the module's scale (kohya: ``alpha / r``), so the change is the truncated SVD of the old one. In a
diffusers-style file ``s`` is folded into ``up`` instead and no alpha written (its ``lora_adapter_metadata``
alphas, which would no longer fit, are dropped): diffusers loads such a file at α = r.
Modules that are not plain LoRA (LoHa, LoKr, Tucker ``lora_mid``, DoRA...) are written unchanged and listed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from ..adapters.formats import read_adapter_file
from ..adapters.formats.writer import output_metadata, write_adapter_file
from ..errors import InputError
from ..methods.lora import LoraPatch
from ..model_card import provenance

#: kohya's threshold below which the largest singular value counts as a zero change.
MIN_SV = 1e-6
#: The (down, up) tensor name suffixes of a LoRA module in the formats read (kohya, PEFT, older diffusers).
_DOWN_UP = ((".lora_down.weight", ".lora_up.weight"), (".lora_A.weight", ".lora_B.weight"),
            (".lora.down.weight", ".lora.up.weight"),
            (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"))
_DTYPES = {"float": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class ResizedModule:
    """One module's resize, with kohya's verbose numbers."""

    module: str
    old_rank: int
    new_rank: int
    alpha: float
    sum_retained: float  # ΣS kept / ΣS
    fro_retained: float  # ‖S kept‖ / ‖S‖
    max_ratio: float  # S[0] / S[r'-1]

    def line(self, dynamic: bool) -> str:
        """kohya's ``--verbose`` line for this module."""
        text = (f"{self.module:75} | sum(S) retained: {self.sum_retained:.1%}, fro retained: "
                f"{self.fro_retained:.1%}, max(S) ratio: {self.max_ratio:0.1f}")
        return text + (f", dynamic | dim: {self.new_rank}, alpha: {self.alpha}" if dynamic else "")


@dataclass
class Resize:
    out: Path
    method: str  # fixed, sv_ratio, sv_fro, sv_cumulative
    modules: list[ResizedModule]
    kept: list[str] = field(default_factory=list)  # modules written unchanged (not plain LoRA)

    @property
    def fro_mean(self) -> float:
        vals = [m.fro_retained for m in self.modules if not math.isnan(m.fro_retained)]
        return sum(vals) / len(vals) if vals else float("nan")

    @property
    def fro_std(self) -> float:
        vals = [m.fro_retained for m in self.modules if not math.isnan(m.fro_retained)]
        mean = self.fro_mean
        return math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals)) if vals else float("nan")


def _index(S: torch.Tensor, method: str, param: float) -> int:
    """kohya's ``index_sv_*``: the index of the last singular value kept."""
    if method == "sv_cumulative":
        cumulative = torch.cumsum(S, dim=0) / float(torch.sum(S))
        index = int(torch.searchsorted(cumulative, param))
    elif method == "sv_fro":
        squared = S.pow(2)
        cumulative = torch.cumsum(squared, dim=0) / float(torch.sum(squared))
        index = int(torch.searchsorted(cumulative, param ** 2))
    else:  # sv_ratio
        index = int(torch.sum(S > S[0] / param).item()) - 1
    return max(0, min(index, len(S) - 1))


def new_rank(S: torch.Tensor, cap: int, method: str, param: float | None) -> int:
    """The rank kohya's ``rank_resize`` keeps of singular values ``S`` (descending)."""
    rank = cap if method == "fixed" else _index(S, method, float(param or 0.0)) + 1
    if S[0] <= MIN_SV:
        return 1
    return min(rank, cap)


def factored_svd(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The SVD of ``up·down`` (out, r)·(r, in) without forming it: ``U`` (out, r), ``S`` (min(out, in),
    descending, zero past r, float32 as kohya selects ranks on), ``Vh`` (r, in), float32.

    Thin QRs of ``up`` and ``downᵀ`` and the SVD of the small r x r core (float64): the same singular values as
    kohya's ``torch.linalg.svd`` of the product to ~1e-7 and the same components up to sign, at O((out + in)·r²)
    instead of seconds to minutes per module on a CPU (kohya's own shortcut past 2048, ``svd_lowrank``, is random).
    """
    Qu, Ru = torch.linalg.qr(up.double())
    Qd, Rd = torch.linalg.qr(down.double().T)
    u, s, vh = torch.linalg.svd(Ru @ Rd.T)
    n = min(up.shape[0], down.shape[1])
    S = torch.zeros(n, dtype=torch.float64)
    S[: min(n, len(s))] = s[:n]
    return (Qu @ u).float(), S.float(), (vh @ Qd.T).float()


def _method(rank: int | None, energy: float | None, fro: float | None, ratio: float | None) -> tuple[str, float | None]:
    chosen = [(m, v) for m, v in (("sv_cumulative", energy), ("sv_fro", fro), ("sv_ratio", ratio)) if v is not None]
    if len(chosen) > 1:
        raise InputError("give one of --energy, --fro, --ratio (with --rank as the cap), not several")
    if not chosen:
        if rank is None:
            raise InputError("give --rank, or one of --energy, --fro, --ratio")
        return "fixed", None
    method, value = chosen[0]
    if method == "sv_ratio" and not value > 1:
        raise InputError(f"--ratio {value}: the largest singular value over the smallest kept must be > 1")
    if method != "sv_ratio" and not 0 < value <= 1:
        raise InputError(f"--{'energy' if method == 'sv_cumulative' else 'fro'} {value}: a share in (0, 1]")
    return method, value


def _readable(path: Path) -> None:
    read_adapter_file(path)


def resize(adapter: str | Path, out: str | Path, *, rank: int | None = None, conv_rank: int | None = None,
           energy: float | None = None, fro: float | None = None, ratio: float | None = None,
           dtype: str | None = None, overwrite: bool = False, command: str | None = None) -> Resize:
    """Resize every plain LoRA module of a kohya / diffusers-style file; the other modules are copied."""
    adapter, out = Path(adapter), Path(out)
    method, param = _method(rank, energy, fro, ratio)
    for label, value in (("--rank", rank), ("--conv-rank", conv_rank)):
        if value is not None and value < 1:
            raise InputError(f"{label} {value}: a rank is at least 1")
    save_dtype = _DTYPES.get(dtype or "") if dtype else None
    if dtype and save_dtype is None:
        raise InputError(f"--dtype {dtype}: one of {', '.join(_DTYPES)}")
    if out.suffix != ".safetensors":
        raise InputError(f"{out}: the resized adapter is one .safetensors file; name it so")
    contents = read_adapter_file(adapter)
    with safe_open(str(adapter), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    written = dict(tensors)
    modules, kept = [], []
    for m in contents.modules.values():
        patch = m.patch
        if m.algo != "lora" or m.dora or not isinstance(patch, LoraPatch):
            kept.append(m.name)
            continue
        down_key = next(k for k in m.keys if k in {m.name + d for d, _ in _DOWN_UP})
        up_key = next(k for k in m.keys if k in {m.name + u for _, u in _DOWN_UP})
        conv = patch.A.dim() == 4
        cap = (conv_rank or rank) if conv else rank
        cap = cap or patch.rank
        down, up = patch.A.float(), patch.B.float()
        U, S, Vh = factored_svd(up.reshape(up.shape[0], -1), down.reshape(down.shape[0], -1))
        r = min(new_rank(S, cap, method, param), len(S))  # kohya fails past min(out, in)
        alpha = float(patch.scaling * r)
        s_fro = torch.sqrt(torch.sum(S.pow(2)))
        modules.append(ResizedModule(m.name, patch.rank, r, alpha, float(torch.sum(S[:r].abs()) / torch.sum(S.abs())),
                                     float(torch.sqrt(torch.sum(S.pow(2)[:r])) / s_fro), float(S[0] / S[r - 1])))
        q = min(r, U.shape[1])  # past the old rank: zero components (kohya's are rounding noise)
        new_up = torch.cat([U[:, :q] * S[:q], U.new_zeros(U.shape[0], r - q)], 1)
        new_down = torch.cat([Vh[:q], Vh.new_zeros(r - q, Vh.shape[1])])
        target = save_dtype or patch.A.dtype
        if conv:
            new_down = new_down.reshape(r, *down.shape[1:])
            new_up = new_up.reshape(up.shape[0], r, 1, 1)
        if contents.format == "diffusers":  # no alpha: the scale folded into up, which every loader takes alike
            new_up = new_up * patch.scaling
            written.pop(f"{m.name}.alpha", None)
        else:
            written[f"{m.name}.alpha"] = torch.tensor(alpha).to(target)
        written[down_key] = new_down.to(target).contiguous()
        written[up_key] = new_up.to(target).contiguous()
    if not modules:
        algos = sorted(set(contents.algos.values()))
        raise InputError(f"{adapter}: no plain LoRA module to resize (its modules are {', '.join(algos)})")
    if save_dtype is not None:
        written = {k: v.to(save_dtype) if v.is_floating_point() else v for k, v in written.items()}
    old = max(m.old_rank for m in modules)
    comment = contents.metadata.get("ss_training_comment", "")
    if method == "fixed":
        conv_desc = "" if conv_rank in (None, rank) else f" (conv: {conv_rank})"
        updates = {"ss_training_comment": f"dimension is resized from {old} to {rank}{conv_desc}; {comment}",
                   "ss_network_dim": str(rank), "ss_network_alpha": str(modules[-1].alpha)}
    else:
        updates = {"ss_training_comment": f"Dynamic resize with {method}: {param} from {old}; {comment}",
                   "ss_network_dim": "Dynamic", "ss_network_alpha": "Dynamic"}
    if "ss_network_module" not in contents.metadata:
        updates = {}  # not a kohya-trained file: no kohya training metadata to keep in step
    drop: dict[str, str | None] = {"lora_adapter_metadata": None} if contents.format == "diffusers" else {}
    record = provenance("resize", command, adapters=[(str(adapter), 1.0)])
    record["resize"] = {"method": method, "param": param, "rank": rank, "conv_rank": conv_rank}
    metadata = output_metadata(contents.metadata, record, {**updates, **drop})
    write_adapter_file(out, written, metadata, overwrite=overwrite, inputs=[adapter], check=_readable)
    return Resize(out, method, modules, kept)
