"""kohya sd-scripts and LyCORIS files: ``<module>.<param>`` with one flat module name per changed layer
(``lora_unet_…``, ``lora_te_…``, ``lora_te1_/te2_/te3_…``, ``lycoris_…``, OneTrainer's ``lora_transformer_…``) and
the parameters of one algorithm per module:

=========  =======================================================================  ==============================
algo       tensors (``<module>.`` omitted; ``[...]`` optional)                        change
=========  =======================================================================  ==============================
lora       lora_down.weight, lora_up.weight, [lora_mid.weight], [alpha], [dora_scale]  α/r·up·down (Tucker: mid)
loha       hada_w1_a/b, hada_w2_a/b, [hada_t1, hada_t2], [alpha], [dora_scale]        α/r·(w1a·w1b)⊙(w2a·w2b)
lokr       lokr_w1 | lokr_w1_a/b, lokr_w2 | lokr_w2_a/b [lokr_t2], [alpha], [dora_scale]  γ·kron(w1, w2)
full       diff, [diff_b]                                                             W + diff
norm       w_norm, [b_norm]                                                           W + w_norm
glora      a1/a2/b1/b2.weight, [alpha]                                               α/r·(W·a1·a2 + b1·b2)
diag-oft   oft_blocks (n, b, b), [rescale], [alpha]                                   Cayley blocks on the rows
boft       oft_blocks (m, n, b, b), [rescale], [alpha]                                butterfly of Cayley blocks
ia3        weight, on_input                                                           W ⊙ (1 + w)
=========  =======================================================================  ==============================

α missing or 0 means α = r (kohya and LyCORIS alike). LoHa and LoKr are scaled once by α/r, as LyCORIS trains
and infers them (its ``merge_to`` of 4.1.3 applies α/r twice; that is a bug there, not the adapter's meaning).
The multiplier (``--scale``) is the Patch's ``merge`` scale, with LyCORIS' rules for DoRA and OFT.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
import re
from pathlib import Path

import torch

from ...errors import InputError, UnsupportedError
from ...methods.lora import LoraPatch
from ...methods.loha import LohaPatch
from ...methods.lycoris_common import LycorisDoraPatch
from ...methods.lycoris_full import LycorisDiffPatch
from ...methods.lycoris_glora import LycorisGloraPatch
from ...methods.lycoris_ia3 import LycorisIa3Patch
from ...methods.lycoris_lokr import LycorisLokrPatch
from ...methods.lycoris_oft import LycorisOftPatch
from ...methods.lycoris_tucker import LycorisTuckerPatch
from .base import AdapterFile, AdapterFormat, AdapterModule, describe_keys, register_format, scalar

# algo -> (the parameter that identifies it, required parameters, optional parameters)
_ALGOS: dict[str, tuple[str, frozenset[str], frozenset[str]]] = {
    "lora": ("lora_up.weight", frozenset({"lora_up.weight", "lora_down.weight"}),
             frozenset({"lora_mid.weight", "alpha", "dora_scale"})),
    "loha": ("hada_w1_a", frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}),
             frozenset({"hada_t1", "hada_t2", "alpha", "dora_scale"})),
    "lokr": ("lokr_w2", frozenset(), frozenset({"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a",
                                                "lokr_w2_b", "lokr_t2", "alpha", "dora_scale"})),
    "full": ("diff", frozenset({"diff"}), frozenset({"diff_b"})),
    "norm": ("w_norm", frozenset({"w_norm"}), frozenset({"b_norm"})),
    "glora": ("a1.weight", frozenset({"a1.weight", "a2.weight", "b1.weight", "b2.weight"}),
              frozenset({"alpha"})),
    "oft": ("oft_blocks", frozenset({"oft_blocks"}), frozenset({"rescale", "alpha"})),
    "ia3": ("on_input", frozenset({"weight", "on_input"}), frozenset()),
}
_PARAMS = frozenset().union(*(req | opt | {det} for det, req, opt in _ALGOS.values()))
_NAME = re.compile(r"^[A-Za-z0-9_]+$")
# ss_network_module values of kohya's own LoRA networks (sd-scripts networks/lora*.py).
_KOHYA_LORA = re.compile(r"^networks\.(lora|lora_fa|lora_flux|lora_sd3|lora_lumina|lora_hunyuan_image|dylora)$")
# LyCORIS' algo names (ss_network_args "algo") -> the algo its modules show here.
_LYCORIS_ALGO = {"lora": "lora", "locon": "lora", "loha": "loha", "lokr": "lokr", "full": "full", "ia3": "ia3",
                 "diag-oft": "diag-oft", "oft": "diag-oft", "boft": "boft", "glora": "glora"}


def _identify(path: Path, name: str, params: dict[str, torch.Tensor]) -> str:
    own = set(params) - {"alpha", "dora_scale"}  # parameters several algorithms share say nothing
    found = [a for a, (det, req, opt) in _ALGOS.items() if own & (req | opt | {det})]
    keys = [f"{name}.{p}" for p in params]
    if len(found) != 1:
        raise InputError(f"{path}: module {name!r} has tensors {describe_keys(keys)}, which are "
                         f"{'no known' if not found else 'several'} kohya/LyCORIS algorithm's "
                         f"({', '.join(found) if found else 'known: ' + ', '.join(_ALGOS)})")
    algo = found[0]
    _, required, optional = _ALGOS[algo]
    unknown = set(params) - required - optional - {_ALGOS[algo][0]}
    missing = set(required - set(params))
    if algo == "lokr":
        pairs = [("lokr_w1", "lokr_w1_a", "lokr_w1_b"), ("lokr_w2", "lokr_w2_a", "lokr_w2_b")]
        for full, a, b in pairs:
            if (full in params) == ((a in params) or (b in params)) or ((a in params) != (b in params)):
                missing.add(f"{full} or {a}+{b} (exactly one)")
        if "lokr_t2" in params and "lokr_w2_a" not in params:
            unknown.add("lokr_t2 (a Tucker core needs lokr_w2_a/b)")
    if algo == "loha" and ("hada_t1" in params) != ("hada_t2" in params):
        missing.add("hada_t1 and hada_t2 together")
    if unknown or missing:
        parts = [f"unknown {sorted(unknown)}"] if unknown else []
        parts += [f"missing {sorted(missing)}"] if missing else []
        raise InputError(f"{path}: module {name!r} ({algo}) has tensors {describe_keys(keys)}: {'; '.join(parts)}")
    return algo


def _alpha(path: Path, name: str, params: dict[str, torch.Tensor]) -> float | None:
    return scalar(path, f"{name}.alpha", params["alpha"]) if "alpha" in params else None


def lycoris_module(path: Path, name: str, params: dict[str, torch.Tensor], keys: tuple[str, ...]) -> AdapterModule:
    """One kohya/LyCORIS module's tensors (``param -> tensor``) as an ``AdapterModule``."""
    algo = _identify(path, name, params)
    alpha = _alpha(path, name, params)
    rank: int | None = None
    patch: LycorisDoraPatch | LoraPatch | LohaPatch | LycorisLokrPatch | LycorisTuckerPatch | LycorisDiffPatch | \
        LycorisGloraPatch | LycorisOftPatch | LycorisIa3Patch
    if algo == "lora":
        down, up = params["lora_down.weight"], params["lora_up.weight"]
        rank = int(down.shape[0])
        a = alpha if alpha else float(rank)
        if "lora_mid.weight" in params:
            algo = "lora/tucker"
            patch = LycorisTuckerPatch(name, down, params["lora_mid.weight"], up, a)
        else:
            if up.dim() != down.dim() or up.shape[1] != rank:
                raise InputError(f"{path}: module {name!r}: lora_up {list(up.shape)} and lora_down "
                                 f"{list(down.shape)} do not form a rank-{rank} LoRA")
            patch = LoraPatch(name, "conv" if down.dim() > 2 else "linear", down, up, a, a / rank)
    elif algo == "loha":
        rank = int(params["hada_w1_b"].shape[0])
        a = alpha if alpha else float(rank)
        hada = {k: v for k, v in params.items() if k.startswith("hada_")}
        patch = LohaPatch(name, str(path), hada, rank, a, effective_conv="hada_t1" in params)
    elif algo == "lokr":
        lokr = {k: v for k, v in params.items() if k.startswith("lokr_")}
        patch = LycorisLokrPatch(name, lokr, alpha)
        rank = patch.rank
    elif algo in ("full", "norm"):
        w, b = ("diff", "diff_b") if algo == "full" else ("w_norm", "b_norm")
        patch = LycorisDiffPatch(name, algo, params[w], params.get(b))
    elif algo == "glora":
        rank = int(params["a2.weight"].shape[0])
        patch = LycorisGloraPatch(name, params["a1.weight"], params["a2.weight"], params["b1.weight"],
                                  params["b2.weight"], alpha)
    elif algo == "oft":
        blocks = params["oft_blocks"]
        if blocks.dim() not in (3, 4) or blocks.shape[-1] != blocks.shape[-2]:
            raise InputError(f"{path}: {name}.oft_blocks is {list(blocks.shape)}; LyCORIS saves (n, b, b) "
                             "(diag-OFT) or (m, n, b, b) (BOFT)")
        algo = "boft" if blocks.dim() == 4 else "diag-oft"
        patch = LycorisOftPatch(name, blocks, params.get("rescale"), alpha or 0.0)
    else:  # ia3
        patch = LycorisIa3Patch(name, params["weight"], bool(scalar(path, f"{name}.on_input", params["on_input"])))
    dora = "dora_scale" in params
    if dora:
        assert isinstance(patch, (LoraPatch, LohaPatch, LycorisLokrPatch, LycorisTuckerPatch))
        patch = LycorisDoraPatch(patch, params["dora_scale"])
    return AdapterModule(name, algo, patch, rank, alpha, keys, dora)


def _check_metadata(path: Path, modules: dict[str, AdapterModule], metadata: Mapping[str, str]) -> None:
    """Refuse a file whose kohya metadata contradicts its tensors, or names a network whose math is not here."""
    net = metadata.get("ss_network_module")
    if not net:
        return
    algos = {m.algo.split("/")[0] for m in modules.values()}
    if net == "networks.oft":
        raise UnsupportedError(f"{path}: ss_network_module is networks.oft, kohya's own OFT, whose math differs "
                               "from LyCORIS' diag-OFT; it is not supported")
    if _KOHYA_LORA.match(net):
        other = sorted(algos - {"lora"})
        if other:
            bad = [n for n, m in modules.items() if m.algo.split("/")[0] != "lora"][:3]
            raise InputError(f"{path}: metadata says ss_network_module={net} (kohya LoRA) but modules {bad} are "
                             f"{other}; the metadata and the tensors disagree")
        # ss_network_dim is the default rank of Linear modules; block_dims, SD3's emb_dims/in_dims... give some
        # others theirs, so only a file where no Linear module has it contradicts it.
        dim = metadata.get("ss_network_dim", "")
        ranks = {m.rank for m in modules.values() if isinstance(m.patch, LoraPatch) and m.patch.kind == "linear"}
        if dim.isdigit() and ranks and int(dim) not in ranks:
            raise InputError(f"{path}: metadata says ss_network_dim={dim} but the Linear modules have ranks "
                             f"{sorted(r for r in ranks if r is not None)}; the metadata and the tensors disagree")
    elif net == "lycoris.kohya":
        try:
            args = json.loads(metadata.get("ss_network_args") or "{}")
        except json.JSONDecodeError:
            args = {}
        algo = str(args.get("algo", "lora")).lower() if isinstance(args, dict) else "lora"
        want = _LYCORIS_ALGO.get(algo)
        if want is None:
            raise UnsupportedError(f"{path}: LyCORIS algo {algo!r} (ss_network_args) is not supported "
                                   f"(supported: {', '.join(sorted(_LYCORIS_ALGO))})")
        if want not in algos:
            raise InputError(f"{path}: metadata says LyCORIS algo={algo} but no module is {want} (modules are "
                             f"{sorted(algos)}); the metadata and the tensors disagree")
    else:
        raise UnsupportedError(f"{path}: ss_network_module {net!r} is not a network wsurgery knows (kohya "
                               "networks.lora*, lycoris.kohya)")


@register_format
class Kohya(AdapterFormat):
    name = "kohya"

    def foreign_keys(self, keys: list[str]) -> list[str]:
        def fits(key: str) -> bool:
            name, _, param = key.partition(".")
            return bool(_NAME.match(name)) and param in _PARAMS

        return [k for k in keys if not fits(k)]

    def read(self, path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> AdapterFile:
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        for k, t in tensors.items():
            name, _, param = k.partition(".")
            grouped.setdefault(name, {})[param] = t
        modules = {name: lycoris_module(path, name, params, tuple(f"{name}.{p}" for p in params))
                   for name, params in grouped.items()}
        _check_metadata(path, modules, metadata)
        return AdapterFile(path, self.name, modules, metadata)
