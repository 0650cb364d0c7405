"""Trust in convert/extract/combine (issue 15): convert's reported error is measured on the adapter it
wrote; non-finite changes are refused naming the module before anything is written; everything the
headers and configs tell is checked before the first tensor is read.
"""

from __future__ import annotations


import pytest
import torch
from peft import LoHaConfig, LoraConfig

import wsurgery
from oracle import edit_adapter_tensors, make_adapter, save_base, tiny_llama
from test_bad_input import assert_refused, edit_config
from wsurgery.checkpoint.reader import Checkpoint
from wsurgery.convert import combine as combine_module
from wsurgery.convert.to_lora import LoraTarget
from wsurgery.errors import InputError, UnsupportedError

Q0 = "model.layers.0.self_attn.q_proj"


@pytest.fixture
def llama(tmp_path):
    model = tiny_llama()
    return model, save_base(model, tmp_path / "base")


def test_convert_error_is_measured_on_the_written_adapter(tmp_path, llama, monkeypatch):
    """A writer that gets the scaling wrong (lora_alpha = 2r: the written change is 2·ΔW) must show as
    relative error ‖2ΔW − ΔW‖/‖ΔW‖ = 1, not as the exact fit the tensors alone would suggest."""
    model, _ = llama
    source = make_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]), tmp_path / "source")
    config = LoraTarget.config
    monkeypatch.setattr(LoraTarget, "config", lambda self, fits, options: {**config(self, fits, options),
                                                                         "lora_alpha": 2 * config(self, fits,
                                                                                                  options)["r"]})
    with pytest.raises(UnsupportedError, match="LoRA cannot express the change of 2 of 2"):
        wsurgery.api.convert(source, tmp_path / "out", to="lora", progress=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.wsurgery-*"))
    c = wsurgery.api.convert(source, tmp_path / "out", to="lora", force=True, progress=False)
    assert [m.error for m in c.modules] == pytest.approx([1.0, 1.0], abs=1e-6)


def test_convert_refuses_a_change_beyond_float32_naming_the_module(tmp_path, llama, capsys):
    """Every number of the source is a finite float32 (lora_alpha 3e38, B ~1e31, A ~1e9), but its change
    (~1e78) is not even the product of two float32 factors (each would be ~1e39): the written tensors
    would be inf, so nothing is written."""
    model, _ = llama
    source = make_adapter(model, LoraConfig(r=1, lora_alpha=1, target_modules=["q_proj"]), tmp_path / "source")
    edit_config(source, lora_alpha=3e38)
    edit_adapter_tensors(source, lambda t: t.update({k: v * (1e32 if "lora_B" in k else 1e10) for k, v in t.items()}))
    out = tmp_path / "out"
    assert_refused(capsys, ["convert", source, out, "--to", "lora"], out, [source], [Q0])


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_convert_refuses_non_finite_adapter_tensors_naming_the_module(tmp_path, llama, capsys, value):
    model, base = llama
    source = make_adapter(model, LoHaConfig(r=2, alpha=2, target_modules=["q_proj"]), tmp_path / "source")
    edit_adapter_tensors(source, lambda t: t[f"base_model.model.{Q0}.hada_w1_a"].view(-1).__setitem__(0, value))
    out = tmp_path / "out"
    assert_refused(capsys, ["convert", source, out, "--to", "lora", "--base", base], out, [source, base], [Q0])


def _count_reads(monkeypatch) -> list[str]:
    reads: list[str] = []
    read = Checkpoint.read
    monkeypatch.setattr(Checkpoint, "read", lambda self, name, *a, **k: reads.append(name) or read(self, name, *a, **k))
    return reads


def test_extract_refuses_a_late_shape_mismatch_before_reading_any_tensor(tmp_path, llama, capsys, monkeypatch):
    """The last layer's MLP differs in shape: found from the headers, before the first module is read."""
    model, base = llama
    tuned_model = tiny_llama(seed=1)
    layer = tuned_model.model.layers[-1].mlp
    layer.down_proj.weight = torch.nn.Parameter(torch.zeros(32, 40))
    tuned = save_base(tuned_model, tmp_path / "tuned")
    reads = _count_reads(monkeypatch)
    out = tmp_path / "out"
    assert_refused(capsys, ["extract", base, tuned, out, "--rank", "2"], out, [base, tuned],
                   ["model.layers.1.mlp.down_proj.weight"])
    assert reads == []


def test_extract_refuses_a_plot_matplotlib_cannot_write_before_any_work(tmp_path, llama, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    model, base = llama
    tuned = save_base(tiny_llama(seed=1), tmp_path / "tuned")
    reads = _count_reads(monkeypatch)
    out = tmp_path / "out"
    assert_refused(capsys, ["extract", base, tuned, out, "--rank", "2", "--plot", tmp_path / "spectra.xyz"], out,
                   [base, tuned], ["spectra.xyz"])
    assert reads == [] and not (tmp_path / "spectra.xyz").exists()


def test_combine_refuses_what_the_configs_tell_before_combining_any_module(tmp_path, llama, capsys, monkeypatch):
    """A LoHa on the last layer needs --rank: known from the configs, so no LoRA module is combined first."""
    model, base = llama
    lora = make_adapter(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), tmp_path / "lora")
    loha = make_adapter(model, LoHaConfig(r=2, target_modules=["model.layers.1.mlp.up_proj"]), tmp_path / "loha")
    combined: list[str] = []
    concatenate = combine_module._concatenate
    monkeypatch.setattr(combine_module, "_concatenate", lambda parts, kind: combined.append(kind) or
                        concatenate(parts, kind))
    out = tmp_path / "out"
    assert_refused(capsys, ["combine", out, lora, loha, "--base", base], out, [lora, loha, base],
                   ["model.layers.1.mlp.up_proj", "--rank"])
    assert combined == []


@pytest.mark.parametrize("weight", ["abc", None, True, float("nan")])
def test_combine_refuses_a_weight_that_is_not_a_finite_number(tmp_path, llama, weight):
    """Through the API a weight may be anything: only a real, finite number is one (a bool is not)."""
    model, _ = llama
    lora = make_adapter(model, LoraConfig(r=2, target_modules=["q_proj"]), tmp_path / "lora")
    out = tmp_path / "out"
    with pytest.raises(InputError, match=r"weight .* is not a finite number; give ADAPTER:WEIGHT") as refused:
        wsurgery.api.combine(out, [(lora, weight), lora], progress=False)
    assert "\n" not in str(refused.value) and not out.exists()


@pytest.mark.parametrize("args", [["--to", "boft", "--block-size", "0"],
                                  ["--to", "boft", "--butterfly-factors", "0"], ["--to", "loha", "--block-size", "4"]])
def test_convert_refuses_sizes_below_one_or_not_its_own(tmp_path, llama, capsys, args):
    """--block-size 0 and --butterfly-factors 0 used to fall back silently to the defaults."""
    model, base = llama
    lora = make_adapter(model, LoraConfig(r=2, target_modules=["q_proj"]), tmp_path / "lora")
    out = tmp_path / "out"
    assert_refused(capsys, ["convert", lora, out, *args, "--base", base], out, [lora, base], [args[2]])
