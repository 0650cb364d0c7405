"""Build tiny models and adapters with transformers/PEFT, and the reference (oracle) results.

Every adapter parameter is given non-zero random values (PEFT initialises B to zero, which would
make any merge look right), the adapter is saved, and the oracle is PEFT itself: the base loaded
from disk, the adapter loaded with ``PeftModel.from_pretrained``, ``merge_and_unload()``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

import wsurgery
from wsurgery.checkpoint import open_checkpoint


LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def dtypes_fp32_bf16():
    """The parametrisation most method tests run under: a float32 and a bfloat16 base."""
    import pytest

    return pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])


def with_random_biases(model, seed: int = 3, std: float = 0.5):
    """Non-zero biases (BERT and GPT-2 initialise them to 0, which would hide a wrong bias merge)."""
    dtype = next(model.parameters()).dtype
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_((torch.randn(p.shape, generator=g) * std).to(dtype))
    return model


def tiny_llama(dtype=torch.float32, tie=False, vocab=96, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).to(dtype)


def tiny_gpt2(dtype=torch.float32, seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=80, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    return GPT2LMHeadModel(cfg).to(dtype)


def tiny_bert(dtype=torch.float32, seed=0, head=False):
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=70, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=40, max_position_embeddings=40, num_labels=3)
    return (BertForSequenceClassification(cfg) if head else BertModel(cfg)).to(dtype)


class ConvNet(nn.Module):
    """A small conv net: Conv1d, Conv2d (3x3 and 1x1), Conv3d, Linear and Embedding layers."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 12)
        self.c1 = nn.Conv1d(3, 8, 3)
        self.c2 = nn.Conv2d(4, 10, 3, padding=1)
        self.pw = nn.Conv2d(10, 6, 1)
        self.c3 = nn.Conv3d(2, 5, (2, 3, 3))
        self.fc = nn.Linear(12, 7)


def conv_net(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return ConvNet().to(dtype)


def save_base(model: nn.Module, folder: Path, max_shard_size: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "save_pretrained"):
        kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
        model.save_pretrained(folder, **kwargs)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors",
                  metadata={"format": "pt"})
    return folder


def randomize_adapter(peft_model, seed: int = 1, std: float = 0.2) -> None:
    """Give every trainable adapter parameter a non-zero random value (magnitudes stay positive)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if not p.requires_grad:
                continue
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32) * std
            if "magnitude" in name:
                p.copy_((p.float() * (1 + noise.abs())).to(p.dtype))
            elif "lora_E" in name:
                p.copy_((noise + 0.5).to(p.dtype))
            else:
                p.copy_((p.float() + noise).to(p.dtype))


def make_adapter(base_model: nn.Module, config, folder: Path, seed: int = 1, adapter_dtype=None) -> Path:
    from peft import get_peft_model

    model = get_peft_model(copy.deepcopy(base_model), config)
    if adapter_dtype is not None:
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.to(adapter_dtype)
    randomize_adapter(model, seed)
    model.save_pretrained(folder)
    return folder


def edit_adapter_tensors(adapter_dir: Path, edit) -> None:
    """Change a saved adapter's tensors in place (``edit`` gets and mutates the dict), e.g. to make it bad."""
    path = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    from safetensors.torch import save_file

    save_file(tensors, path, metadata={"format": "pt"})


def edit_adapter_config(adapter_dir: Path, **changes) -> None:
    """Change fields of a saved ``adapter_config.json`` in place."""
    import json

    path = adapter_dir / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def oracle_merge(fresh_base: nn.Module, adapter_dir: Path) -> dict[str, torch.Tensor]:
    """PEFT's merge of the saved adapter into ``fresh_base`` (a model with the saved base weights)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(fresh_base, adapter_dir)
    merged = model.merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def load_all(folder: Path) -> dict[str, torch.Tensor]:
    ckpt = open_checkpoint(folder)
    return {n: ckpt.read(n) for n in ckpt.tensors}


_MANTISSA = {torch.bfloat16: (7, -126), torch.float16: (10, -14)}


def ulp(magnitude: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype``'s grid at ``magnitude`` (elementwise), as float64."""
    bits, min_exp = _MANTISSA[dtype]
    m = magnitude.double().abs()
    e = torch.floor(torch.log2(m.clamp_min(2.0 ** min_exp))).clamp_min(min_exp)
    return torch.pow(2.0, e - bits)


def assert_close_to(ours: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], *, rel: float = 1e-5,
                    ulps: float = 1, base: dict[str, torch.Tensor] | None = None) -> None:
    """Compare every tensor we wrote with the reference.

    float32: max abs error <= ``rel`` x max|expected|. bf16/fp16: every element within ``ulps`` units
    in the last place *of the operands*: PEFT rounds ΔW to the low-precision dtype before adding it,
    we round W + ΔW once, so the two may differ by one grid step at max(|W|, |ΔW|), which is bounded
    by the grid step at |W| + |W'|. Without ``base`` the step at |W'| is used (then exact rounding
    of the same value is required).
    """
    missing = set(ours) - set(expected)
    assert not missing, f"tensors we wrote that the reference does not have: {sorted(missing)}"
    for name, got in ours.items():
        want = expected[name]
        assert got.shape == want.shape, f"{name}: shape {list(got.shape)} != {list(want.shape)}"
        assert got.dtype == want.dtype, f"{name}: dtype {got.dtype} != {want.dtype}"
        if got.dtype in _MANTISSA:
            magnitude = want.double().abs()
            if base is not None and name in base and base[name].shape == want.shape:
                magnitude = magnitude + base[name].double().abs()
            err = (got.double() - want.double()).abs()
            bound = ulps * ulp(magnitude, got.dtype)
            worst = (err / bound).max().item() if err.numel() else 0.0
            assert worst <= 1.0, f"{name}: {worst * ulps:.2f} ulps from the reference (allowed {ulps})"
        elif got.is_floating_point():
            err = (got.double() - want.double()).abs().max().item()
            bound = rel * max(want.double().abs().max().item(), 1e-30)
            assert err <= bound, f"{name}: max abs error {err:.3g} > {bound:.3g}"
        else:
            assert torch.equal(got, want), f"{name}: differs"


def reload(model, folder, dtype):
    """The base as PEFT's users load it: from the saved files (plain torch modules: same class, state dict)."""
    if not hasattr(model, "from_pretrained"):
        fresh = type(model)().to(dtype)
        fresh.load_state_dict(load_file(folder / "model.safetensors"))
        return fresh
    return type(model).from_pretrained(folder, dtype=dtype)


def run_case(tmp_path, model, config, *, dtype=torch.float32, shard=None, adapter_dtype=None, check_unmerge=True,
             ulps=1, unmerge_rel=1e-5):
    """Save ``model`` and a randomised adapter for ``config``; check our merge against PEFT's, every
    untouched tensor bit for bit, and (``check_unmerge``) that unmerging gives the base back."""
    base_dir = save_base(model, tmp_path / "base", shard)
    adapter_dir = make_adapter(model, config, tmp_path / "adapter", adapter_dtype=adapter_dtype)
    expected = oracle_merge(reload(model, base_dir, dtype), adapter_dir)
    result = wsurgery.merge(base_dir, adapter_dir, tmp_path / "merged", progress=False)
    merged = load_all(tmp_path / "merged")
    base = load_all(base_dir)
    assert_close_to(merged, expected, ulps=ulps, base=base)
    # Untouched tensors are copied bit for bit; the changed ones really changed.
    changed = {n for n in merged if not torch.equal(merged[n], base[n])}
    assert changed, "the merge changed nothing"
    assert len(changed) == result.changed_tensors
    if check_unmerge:
        wsurgery.unmerge(tmp_path / "merged", adapter_dir, tmp_path / "unmerged", progress=False)
        unmerged = load_all(tmp_path / "unmerged")
        # W' = round(W + ΔW), then round(W' - ΔW): one rounding each way, at the operands' magnitude.
        assert_close_to(unmerged, base, base=merged, ulps=2, rel=unmerge_rel)
    return base_dir, adapter_dir, merged


def _rewrite_merged(src: Path, dst: Path, edit) -> Path:
    """A copy of the merged folder ``src`` whose tensors went through ``edit(dict) -> None``."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    for f in dst.glob("*.safetensors"):
        tensors = load_file(f)
        edit(tensors)
        save_file(tensors, f, metadata={"format": "pt"})
    return dst


def check_verify(tmp_path: Path, base_dir: Path, adapter_dir: Path, merged_dir: Path, *, options=None,
                 transposable: bool = True, tokens: int = 16) -> None:
    """The verify contract for one adapter: the correct merge passes (also with every merge code path
    of every patch disabled: the forward paths must not be circular); one perturbed element, a wrong
    scaling and (``transposable``: where a changed weight is square) a transposed change each fail
    and name the module."""
    from wsurgery.methods.base import Patch

    def run(merged):
        return wsurgery.api.verify(base_dir, adapter_dir, merged, tokens=tokens, progress=False, options=options,
                                   device="cpu")

    good = run(merged_dir)
    assert good.passed, [(c.module, c.detail, c.max_rel) for c in good.failures]
    assert any(c.kind == "forward" for c in good.checks)

    merge_code = ("apply", "revert", "delta", "add_scaled", "merge", "unmerge", "weight_delta")
    saved = []
    def refuse(*a, **k):
        raise AssertionError("verify called merge code")
    for cls in [Patch, *_subclasses(Patch)]:
        for name in merge_code:
            if name in vars(cls):
                saved.append((cls, name, vars(cls)[name]))
                setattr(cls, name, refuse)
    try:
        assert run(merged_dir).passed
    finally:
        for cls, name, fn in saved:
            setattr(cls, name, fn)

    base = load_all(base_dir)
    merged = load_all(merged_dir)
    changed = [n for n in merged if n in base and merged[n].is_floating_point() and merged[n].shape == base[n].shape
               and not torch.equal(merged[n], base[n])]
    assert changed
    target = max(changed, key=lambda n: merged[n].numel())
    module = target.rpartition(".")[0]

    def perturb(tensors):
        t = tensors[target].clone()
        flat = t.view(-1)
        flat[flat.numel() // 3] += t.abs().max() * 0.5
        tensors[target] = t
    bad = run(_rewrite_merged(merged_dir, tmp_path / "verify-perturbed", perturb))
    assert not bad.passed and module in [c.module for c in bad.failures], module

    wsurgery.merge(base_dir, adapter_dir, tmp_path / "verify-scaled", scale=1.5, progress=False, options=options)
    bad = run(tmp_path / "verify-scaled")
    assert not bad.passed

    square = [n for n in changed if merged[n].dim() == 2 and merged[n].shape[0] == merged[n].shape[1]
              and n.endswith("weight")]
    if transposable:
        assert square, "no square changed weight to transpose"
        name = square[0]

        def transpose(tensors):
            W = base[name].to(torch.float32)
            tensors[name] = (W + (merged[name].to(torch.float32) - W).T).to(merged[name].dtype)
        bad = run(_rewrite_merged(merged_dir, tmp_path / "verify-transposed", transpose))
        assert name.rpartition(".")[0] in [c.module for c in bad.failures]


def _subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def run_cli(args, capsys) -> tuple[int, str, str]:
    """Run the CLI in-process; return (exit status, stdout, stderr)."""
    from wsurgery.cli import main

    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err
