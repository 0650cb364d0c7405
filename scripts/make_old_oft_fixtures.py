"""Write the OFT fixtures of old PEFT storage formats, with those PEFT versions' own merge results.

    python scripts/make_old_oft_fixtures.py        # rewrites fixtures/old-oft/peft-*/

For every PEFT version below, a throwaway virtual environment ``/tmp/venv-peft-<version>`` is created
(``--system-site-packages``, so torch comes from this machine) with that peft and a transformers it
imports with, and this script runs itself inside it (``--inner``). There it builds a small plain-torch
model (two Linear layers with awkward sizes and a 3x3 Conv2d), saves it with safetensors, wraps it with
that PEFT's OFT, gives every adapter parameter non-zero random values, saves the adapter, then loads
base + adapter again with that PEFT and saves ``merge_and_unload()``'s state dict as
``expected.safetensors``: the reference our tests compare against, produced by the old PEFT itself.
Deterministic: the same files every time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

# peft version -> a transformers release that it imports with
VERSIONS = {"0.13.2": "4.46.3", "0.15.2": "4.51.3", "0.17.1": "4.56.2"}
ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "fixtures" / "old-oft"
TARGETS = ["fc1", "fc2", "conv"]


def cases(version: str) -> dict[str, dict]:
    """Fixture name -> OFTConfig kwargs (plus ``_std``: per-module std of the random adapter values)."""
    if version.startswith("0.13."):  # r = number of blocks; b = ceil(out/r) on the output side
        return {
            "plain": {"r": 4, "target_modules": TARGETS},
            # coft radius eps*b^2/sqrt(p); conv gets small values so that it stays inside the ball
            "coft-share": {"r": 4, "coft": True, "eps": 0.02, "block_share": True,
                           "target_modules": TARGETS, "_std": {"conv": 0.01}},
        }
    if version.startswith("0.15."):
        return {
            "plain": {"oft_block_size": 4, "r": 0, "target_modules": TARGETS},
            "coft-share": {"oft_block_size": 4, "r": 0, "coft": True, "eps": 0.02, "block_share": True,
                           "target_modules": TARGETS, "_std": {"conv": 0.005}},
        }
    if version.startswith("0.17."):
        return {
            "neumann": {"oft_block_size": 4, "r": 0, "target_modules": TARGETS},  # default: 5 terms, legacy series
            "neumann7-coft": {"oft_block_size": 4, "r": 0, "num_cayley_neumann_terms": 7, "coft": True,
                              "eps": 0.5, "target_modules": TARGETS, "_std": {"fc2": 0.02}},
            "exact-share": {"oft_block_size": 4, "r": 0, "use_cayley_neumann": False, "block_share": True,
                            "target_modules": TARGETS},
        }
    raise SystemExit(f"no cases for peft {version}")


# -- inside the old PEFT's virtual environment -------------------------------------------------------

def inner(out: Path) -> None:
    import peft
    import torch
    from peft import OFTConfig, PeftModel, get_peft_model
    from safetensors.torch import load_file, save_file
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(24, 20)
            self.fc2 = nn.Linear(20, 13)
            self.conv = nn.Conv2d(4, 10, 3)

    def fresh_base(folder: Path) -> nn.Module:
        model = Net()
        model.load_state_dict(load_file(folder / "model.safetensors"))
        return model

    version = peft.__version__
    shutil.rmtree(out, ignore_errors=True)
    summary = {}
    for name, kwargs in cases(version).items():
        kwargs = dict(kwargs)
        stds = kwargs.pop("_std", {})
        folder = out / name
        torch.manual_seed(0)
        model = Net()
        (folder / "base").mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "base" / "model.safetensors")

        peft_model = get_peft_model(model, OFTConfig(**kwargs))
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for pname, p in peft_model.named_parameters():
                if not p.requires_grad:
                    continue
                noise = torch.randn(p.shape, generator=g)
                if ".oft_s." in pname:  # 0.14-0.15 output scale: around 1
                    p.copy_(1 + 0.1 * noise)
                else:
                    std = next((s for m, s in stds.items() if f".{m}." in pname), 0.1)
                    p.copy_(std * noise)
        peft_model.save_pretrained(folder / "adapter")
        (folder / "adapter" / "README.md").unlink(missing_ok=True)  # PEFT's empty model card

        merged = PeftModel.from_pretrained(fresh_base(folder / "base"), folder / "adapter").merge_and_unload()
        save_file({k: v.detach().contiguous() for k, v in merged.state_dict().items()},
                  folder / "expected.safetensors")
        summary[name] = {"config": kwargs, "coft_blocks": coft_report(folder, kwargs, version)}
    (out / "cases.json").write_text(json.dumps({"peft": version, "cases": summary}, indent=1) + "\n")


def coft_report(folder: Path, kwargs: dict, version: str) -> dict | None:
    """How many saved blocks lie outside the COFT ball (and get projected), so a fixture shows it tests both."""
    if not kwargs.get("coft"):
        return None
    from safetensors.torch import load_file

    tensors = load_file(folder / "adapter" / "adapter_model.safetensors")
    base = load_file(folder / "base" / "model.safetensors")
    report = {"projected": 0, "inside": 0}
    for key, t in tensors.items():
        if key.endswith(".oft_s"):
            continue
        module = key.split(".")[2]
        w = base[f"{module}.weight"]
        out, n_in = w.shape[0], math.prod(w.shape[1:])
        p = t.shape[0]
        if key.endswith("oft_R.weight"):  # norm of the full skew matrix: sqrt(2) x the triangle's
            norms = t.double().norm(dim=1) * math.sqrt(2)
            radius = kwargs["eps"] / math.sqrt(p)
        else:
            norms = t.double().flatten(1).norm(dim=1)
            b = t.shape[1]
            if version.startswith("0.13."):
                radius = kwargs["eps"] * b * b / math.sqrt(p)
            else:
                r = n_in // b
                radius = kwargs["eps"] * math.ceil(out / r) ** 2 / math.sqrt(p)
        report["projected"] += int((norms > radius).sum())
        report["inside"] += int((norms <= radius).sum())
    return report


# -- outside: venvs ------------------------------------------------------------------------------------

def outer(versions: list[str]) -> None:
    for version in versions:
        venv = Path(f"/tmp/venv-peft-{version}")
        python = venv / "bin" / "python"
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", f"peft=={version}",
                        f"transformers=={VERSIONS[version]}"], check=True)
        # a fixed hash seed keeps the order of target_modules (a set) in adapter_config.json stable
        subprocess.run([str(python), __file__, "--inner", "--out", str(OUT / f"peft-{version}")], check=True,
                       cwd="/tmp", env={**os.environ, "PYTHONHASHSEED": "0"})
        print(f"peft {version}: wrote {OUT / f'peft-{version}'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inner", action="store_true", help="(internal) run inside an old PEFT's venv")
    parser.add_argument("--out", type=Path)
    parser.add_argument("versions", nargs="*", default=list(VERSIONS))
    args = parser.parse_args()
    if args.inner:
        inner(args.out)
    else:
        outer(args.versions)


if __name__ == "__main__":
    main()
