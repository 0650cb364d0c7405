"""Write LoRA ``target_parameters`` fixtures from old PEFT releases, with those releases' own merge results.

    python scripts/make_lora_variant_fixtures.py          # rewrites fixtures/lora-variants/peft-*/

PEFT changed how it lays out the LoRA change of a fused 3-D expert stack (E, ·, ·): up to 0.18 it read
every stack as (E, in, out); 0.19.0 swapped to (E, out, in) when the module had ``is_transposed=True``;
0.19.1 and later use (E, out, in) unless ``is_transposed``. The keys are the same in all three, only the
factor shapes differ (and for square stacks not even those), so the tests need adapters written by each.

For every PEFT version below, a throwaway virtual environment ``/tmp/venv-lora-peft-<version>`` is
created (``--system-site-packages``: torch, and where no transformers is pinned also transformers, come
from this machine) and this script runs itself inside it (``--inner``). There it builds small
plain-torch models, saves each with safetensors, wraps it with that PEFT's LoRA on
``target_parameters``, gives every adapter parameter non-zero random values, saves the adapter, then
loads base + adapter again with that PEFT and saves ``merge_and_unload()``'s state dict as
``expected.safetensors``: the reference our tests compare against, produced by the old PEFT itself.

Models: ``Net`` has ``moe.experts`` with (E, out, in) stacks, ``tmoe.experts`` with ``is_transposed =
True`` and (E, in, out) stacks (like GPT-OSS), and ``router`` with a raw 2-D parameter; ``SquareNet``
and ``SquareTransposedNet`` have one experts module with a square (3, 8, 8) stack, without and with
``is_transposed``. Deterministic: the same files every time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

# peft version -> a transformers release that it imports with (None: this machine's transformers 5.x)
VERSIONS = {"0.17.1": "4.56.2", "0.18.1": None, "0.19.0": None}
ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "fixtures" / "lora-variants"

CASES = {  # name -> (model, LoraConfig kwargs)
    # nested wrappers on both experts modules, a raw 2-D parameter, an alpha pattern on one parameter
    "experts": ("Net", {"r": 2, "lora_alpha": 4, "target_parameters": ["experts.gate_up_proj", "experts.down_proj",
                                                                       "router.weight"],
                        "alpha_pattern": {"tmoe.experts.down_proj": 5}}),
    # one parameter per module, rsLoRA, a rank pattern
    "single-rslora": ("Net", {"r": 2, "lora_alpha": 3, "use_rslora": True, "target_parameters": ["experts.down_proj"],
                              "rank_pattern": {"moe.experts.down_proj": 3}}),
    # square (E, 8, 8) stacks: only the release and the module's is_transposed tell the layout
    "square": ("SquareNet", {"r": 2, "lora_alpha": 4, "target_parameters": ["experts.down_proj"]}),
    "square-transposed": ("SquareTransposedNet", {"r": 2, "lora_alpha": 4, "target_parameters": ["experts.down_proj"]}),
}


# -- inside the old PEFT's virtual environment -------------------------------------------------------

def inner(out: Path) -> None:
    import shutil

    import peft
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.torch import load_file, save_file
    from torch import nn

    class Experts(nn.Module):  # transformers' default fused layout: (E, out, in)
        def __init__(self):
            super().__init__()
            self.gate_up_proj = nn.Parameter(torch.randn(3, 10, 6))
            self.down_proj = nn.Parameter(torch.randn(3, 6, 5))

    class TransposedExperts(nn.Module):  # GPT-OSS style: (E, in, out)
        is_transposed = True

        def __init__(self):
            super().__init__()
            self.gate_up_proj = nn.Parameter(torch.randn(3, 6, 10))
            self.down_proj = nn.Parameter(torch.randn(3, 5, 6))

    class Router(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 6))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.moe = nn.Module()
            self.moe.experts = Experts()
            self.tmoe = nn.Module()
            self.tmoe.experts = TransposedExperts()
            self.router = Router()

    class SquareExperts(nn.Module):
        def __init__(self):
            super().__init__()
            self.down_proj = nn.Parameter(torch.randn(3, 8, 8))

    class SquareTransposedExperts(SquareExperts):
        is_transposed = True

    class SquareNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.moe = nn.Module()
            self.moe.experts = SquareExperts()

    class SquareTransposedNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.moe = nn.Module()
            self.moe.experts = SquareTransposedExperts()

    models = {"Net": Net, "SquareNet": SquareNet, "SquareTransposedNet": SquareTransposedNet}

    def fresh_base(folder: Path, Net) -> nn.Module:
        model = Net()
        model.load_state_dict(load_file(folder / "model.safetensors"))
        return model

    version = peft.__version__
    shutil.rmtree(out, ignore_errors=True)
    summary = {}
    for name, (model_name, kwargs) in CASES.items():
        folder = out / name
        torch.manual_seed(0)
        model = models[model_name]()
        (folder / "base").mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "base" / "model.safetensors")

        peft_model = get_peft_model(model, LoraConfig(**kwargs))
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in peft_model.parameters():
                if p.requires_grad:
                    p.copy_(0.2 * torch.randn(p.shape, generator=g))
        peft_model.save_pretrained(folder / "adapter")
        (folder / "adapter" / "README.md").unlink(missing_ok=True)  # PEFT's empty model card

        fresh = fresh_base(folder / "base", models[model_name])
        merged = PeftModel.from_pretrained(fresh, folder / "adapter").merge_and_unload()
        save_file({k: v.detach().contiguous() for k, v in merged.state_dict().items()},
                  folder / "expected.safetensors")
        shapes = {k: list(v.shape) for k, v in load_file(folder / "adapter" / "adapter_model.safetensors").items()}
        summary[name] = {"model": model_name, "config": kwargs, "adapter_shapes": shapes}
    (out / "cases.json").write_text(json.dumps({"peft": version, "cases": summary}, indent=1) + "\n")


# -- outside: venvs ------------------------------------------------------------------------------------

def outer(versions: list[str]) -> None:
    for version in versions:
        venv = Path(f"/tmp/venv-lora-peft-{version}")
        python = venv / "bin" / "python"
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
        pins = [f"peft=={version}"] + ([f"transformers=={VERSIONS[version]}"] if VERSIONS[version] else [])
        subprocess.run([str(python), "-m", "pip", "install", "-q", *pins], check=True)
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
