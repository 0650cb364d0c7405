"""Write the AdaMSS fixtures: adapters made by PEFT 0.21.2 with scikit-learn, and PEFT's own merge results.

    python scripts/make_adamss_fixtures.py        # rewrites fixtures/adamss/

PEFT's AdaMSS needs scikit-learn (its KMeans picks the rows each subspace changes), which the test
environment does not install. So this script creates a throwaway virtual environment
``/tmp/venv-adamss-sklearn`` (``--system-site-packages``: torch, peft 0.21.2 and transformers come from
this machine) with scikit-learn, and runs itself there (``--inner``). There it builds a small
plain-torch model (Linear layers with and without bias), saves it with safetensors, wraps it with
AdaMSS, gives every adapter parameter non-zero random values, saves the adapter, loads base + adapter
again with PEFT and saves ``merge_and_unload()``'s state dict as ``expected.safetensors``: the
reference the tests compare against, produced by PEFT with scikit-learn, not by us. It also saves
scikit-learn's own labels for PEFT's KMeans call on assorted data sets (``kmeans.safetensors``), which
the tests compare our numpy reproduction of that KMeans with. Deterministic.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

SKLEARN = "1.9.1"
ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "fixtures" / "adamss"
TARGETS = ["fc1", "fc2", "fc3"]

# Fixture name -> (dtype, AdamssConfig kwargs)
CASES = {
    "fp32": ("float32", {"r": 8, "num_subspaces": 4, "subspace_rank": 3, "target_modules": TARGETS}),
    "bf16": ("bfloat16", {"r": 8, "num_subspaces": 4, "subspace_rank": 3, "target_modules": TARGETS}),
    "dynamic-rank-seed": ("float32", {"r": 10, "num_subspaces": 5, "subspace_rank": 4, "use_dynamic_rank": True,
                                      "svd_threshold": 0.2, "random_seed": 5, "target_modules": TARGETS}),
    # many clusters, and repeated rows in the base (duplicate points): KMeans starts some clusters on
    # copies of one point, leaves them empty and relocates them (scikit-learn's _relocate_empty_clusters)
    "many-subspaces-repeated-rows": ("float32", {"r": 6, "num_subspaces": 14, "subspace_rank": 2,
                                                 "target_modules": TARGETS}),
}
REPEATED_ROWS = {"many-subspaces-repeated-rows"}


def inner(out: Path) -> None:
    import peft
    import sklearn
    import torch
    from peft import AdamssConfig, PeftModel, get_peft_model
    from safetensors.torch import load_file, save_file
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(24, 40)
            self.fc2 = nn.Linear(40, 24, bias=False)
            self.fc3 = nn.Linear(40, 40)

    def fresh_base(folder: Path, dtype) -> nn.Module:
        model = Net().to(dtype)
        model.load_state_dict(load_file(folder / "model.safetensors"))
        return model

    shutil.rmtree(out, ignore_errors=True)
    summary = {}
    for name, (dtype_name, kwargs) in CASES.items():
        dtype = getattr(torch, dtype_name)
        folder = out / name
        torch.manual_seed(0)
        model = Net().to(dtype)
        if name in REPEATED_ROWS:
            with torch.no_grad():
                for layer in (model.fc1, model.fc2, model.fc3):
                    rows = layer.weight.shape[0]
                    layer.weight[rows // 2:] = layer.weight[:rows - rows // 2]
                    if layer.bias is not None:
                        layer.bias[rows // 2:] = layer.bias[:rows - rows // 2]
        (folder / "base").mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "base" / "model.safetensors")

        peft_model = get_peft_model(model, AdamssConfig(**kwargs))
        sizes = {m: [len(peft_model.base_model.model.get_submodule(m).seg_result["default"][i])
                     for i in range(peft_model.base_model.model.get_submodule(m).num_subspaces["default"])]
                 for m in TARGETS}
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for _, p in peft_model.named_parameters():
                if p.requires_grad:
                    p.add_((0.1 * torch.randn(p.shape, generator=g)).to(p.dtype))
        peft_model.save_pretrained(folder / "adapter")
        (folder / "adapter" / "README.md").unlink(missing_ok=True)  # PEFT's empty model card

        merged = PeftModel.from_pretrained(fresh_base(folder / "base", dtype), folder / "adapter").merge_and_unload()
        save_file({k: v.detach().contiguous() for k, v in merged.state_dict().items()},
                  folder / "expected.safetensors")
        summary[name] = {"dtype": dtype_name, "config": kwargs, "cluster_sizes": sizes}
    (out / "cases.json").write_text(json.dumps({"peft": peft.__version__, "scikit-learn": sklearn.__version__,
                                                "cases": summary, "kmeans": kmeans_cases(out)}, indent=1) + "\n")


def kmeans_cases(out: Path) -> dict:
    """scikit-learn's labels for PEFT's KMeans call on assorted float32 data (``kmeans.safetensors``: ``X.<i>``,
    ``k.<i>``, ``labels.<i>``), so the tests check our reproduction of it without scikit-learn."""
    import numpy as np
    import torch
    from safetensors.torch import save_file
    from sklearn.cluster import KMeans

    rng = np.random.default_rng(0)
    tensors, kinds = {}, {"normal": 0, "orthonormal": 0, "repeated": 0}
    i = 0
    for n in (12, 64, 300):  # 300 > 256: two chunks in scikit-learn's threaded E/M step
        for d in (3, 8):
            for k in (2, 5, 10):
                for kind in kinds:
                    if kind == "normal":
                        X = rng.standard_normal((n, d))
                    elif kind == "orthonormal":  # like the singular vectors PEFT clusters
                        X = np.linalg.qr(rng.standard_normal((n, d)))[0]
                    else:  # exact repeats: ties and empty clusters (relocation)
                        points = rng.standard_normal((max(2, n // 4), d))
                        X = points[rng.integers(0, points.shape[0], n)]
                    X = X.astype(np.float32)
                    labels = KMeans(n_clusters=k, init="random", n_init=1, max_iter=10,
                                    random_state=123456789).fit_predict(X)
                    tensors[f"X.{i}"] = torch.from_numpy(X)
                    tensors[f"k.{i}"] = torch.tensor([k])
                    tensors[f"labels.{i}"] = torch.from_numpy(labels.astype(np.int32))
                    kinds[kind] += 1
                    i += 1
    save_file(tensors, out / "kmeans.safetensors")
    return {"datasets": i, **kinds}


def outer() -> None:
    venv = Path("/tmp/venv-adamss-sklearn")
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", f"scikit-learn=={SKLEARN}"], check=True)
    # a fixed hash seed keeps the order of target_modules (a set) in adapter_config.json stable
    subprocess.run([str(python), __file__, "--inner", "--out", str(OUT)], check=True, cwd="/tmp",
                   env={**os.environ, "PYTHONHASHSEED": "0"})
    print(f"wrote {OUT}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inner", action="store_true", help="(internal) run inside the scikit-learn venv")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.inner:
        inner(args.out)
    else:
        outer()


if __name__ == "__main__":
    main()
