"""Generate ``fixtures/old-bone/``: Bone (``peft_type: BONE``) adapters written by PEFT versions that still
had Bone (0.14-0.18), with that PEFT's own ``merge_and_unload()`` output as the reference.

    python scripts/make_old_bone_fixtures.py                 # all versions below, into fixtures/old-bone
    python scripts/make_old_bone_fixtures.py --versions 0.15.2

For each version a throwaway venv ``/tmp/venv-bone-peft-<version>`` is made with
``--system-site-packages`` (torch comes from the system) and the old peft plus a transformers it
works with; the script then re-runs itself inside that venv (``--inside``), where it builds a tiny
plain-torch model of Linear layers, adds a Bone adapter, gives the block non-zero random values, and
saves ``base/model.safetensors``, ``adapter/`` (``save_pretrained``) and ``expected.safetensors``
(the old PEFT's merge of the saved adapter into a model loaded from the saved base). Deterministic.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

VERSIONS = {"0.15.2": "4.51.3", "0.17.1": "4.56.2"}  # peft -> transformers
ROOT = Path(__file__).resolve().parent.parent
# name -> (BoneConfig kwargs, base dtype)
CASES = {
    "default-fp32": ({"r": 6, "init_weights": True}, "float32"),  # 6 does not divide in=20 or 16: partial block
    "default-bf16": ({"r": 6, "init_weights": True}, "bfloat16"),
    "bat-fp32": ({"r": 4, "init_weights": "bat"}, "float32"),
    "bat-bf16": ({"r": 4, "init_weights": "bat"}, "bfloat16"),
}


def build_net():
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin0 = nn.Linear(20, 24)
            self.lin1 = nn.Linear(24, 16)
            self.lin2 = nn.Linear(16, 12)

        def forward(self, x):
            return self.lin2(self.lin1(self.lin0(x)))

    return Net


def inside(out: Path) -> None:
    """Runs in the old-peft venv: write every case under ``out``."""
    import peft
    import torch
    from peft import BoneConfig, PeftModel, get_peft_model
    from safetensors.torch import load_file, save_file

    Net = build_net()
    report = {}
    for name, (kwargs, dtype_name) in CASES.items():
        dtype = getattr(torch, dtype_name)
        case = out / name
        shutil.rmtree(case, ignore_errors=True)
        (case / "base").mkdir(parents=True)
        torch.manual_seed(0)
        model = Net().to(dtype)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, case / "base" / "model.safetensors",
                  metadata={"format": "pt"})
        config = BoneConfig(target_modules=["lin0", "lin1", "lin2"], **kwargs)
        peft_model = get_peft_model(model, config)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in peft_model.parameters():
                if p.requires_grad:
                    p.add_((torch.randn(p.shape, generator=g) * 0.2).to(p.dtype))
        peft_model.save_pretrained(case / "adapter")
        (case / "adapter" / "README.md").unlink(missing_ok=True)  # PEFT's model-card template: noise here
        cfg_path = case / "adapter" / "adapter_config.json"  # target_modules is a set: sort it for stable files
        cfg = json.loads(cfg_path.read_text())
        cfg["target_modules"] = sorted(cfg["target_modules"])
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        fresh = Net().to(dtype)
        fresh.load_state_dict(load_file(case / "base" / "model.safetensors"))
        try:
            merged = PeftModel.from_pretrained(fresh, case / "adapter").merge_and_unload()
        except Exception as e:
            shutil.rmtree(case)
            report[name] = f"PEFT {peft.__version__} cannot merge: {type(e).__name__}: {e}"
            continue
        save_file({k: v.detach().contiguous() for k, v in merged.state_dict().items()}, case / "expected.safetensors",
                  metadata={"peft": peft.__version__})
        report[name] = "ok"
    import transformers

    (out / "versions.json").write_text(json.dumps(
        {"peft": peft.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
         "cases": report}, indent=2) + "\n")
    print(json.dumps(report, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "fixtures" / "old-bone")
    parser.add_argument("--versions", nargs="*", default=list(VERSIONS))
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inside:
        inside(args.out)
        return
    for version in args.versions:
        venv = Path(f"/tmp/venv-bone-peft-{version}")
        py = venv / "bin" / "python"
        if not py.exists():
            subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", f"peft=={version}",
                        f"transformers=={VERSIONS[version]}"], check=True)
        subprocess.run([str(py), __file__, "--inside", "--out", str(args.out / f"peft-{version}")], check=True)


if __name__ == "__main__":
    main()
