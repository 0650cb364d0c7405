"""FourierFT, WaveFT and TinyLoRA on a GPT-2 whose targets mix Conv1D (c_attn, c_proj, c_fc) and the nn.Linear
lm_head (and PEFT's EmbConv1D test model). PEFT transposes each layer's change by its type but saves the
fan_in_fan_out of the last layer it wrapped (the lm_head's False), so the flag is wrong for the Conv1D layers:
each case is merged equal to PEFT's merge_and_unload, or refused through the CLI in one line rather than
merged wrong.
"""

from __future__ import annotations

import json

import pytest
import torch
from oracle import make_adapter, run_case, run_cli, save_base, with_random_biases
from peft import FourierFTConfig, TinyLoraConfig, WaveFTConfig
from test_method_hra_road_ia3 import _EmbConv1D, _untied_gpt2
from test_method_vector_bank import _one_thread  # noqa: F401  (autouse: tiny tensors, busy cores)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

MIXED = ["c_attn", "c_proj", "c_fc", "lm_head"]


def _refused(tmp_path, capsys, config) -> str:
    """Save the base and adapter, merge through the CLI; return its one-line refusal."""
    model = _untied_gpt2()
    base_dir = save_base(model, tmp_path / "base")
    adapter_dir = make_adapter(model, config, tmp_path / "adapter")
    # PEFT saves the lm_head's False, although it merged the Conv1D layers transposed.
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["fan_in_fan_out"] is False
    code, _, err = run_cli(["merge", "-q", base_dir, adapter_dir, tmp_path / "out"], capsys)
    lines = err.strip().splitlines()
    assert code != 0 and len(lines) == 1, lines
    assert not (tmp_path / "out").exists()
    return lines[0]


SPECTRAL = {
    "fourierft": lambda targets, n=60, scale=1.0: FourierFTConfig(n_frequency=n, scaling=40.0 * scale,
                                                                  target_modules=targets, init_weights=False),
    "waveft": lambda targets, n=60, scale=1.0: WaveFTConfig(n_frequency=n, scaling=3.0 * scale, wavelet_family="db2",
                                                            target_modules=targets, init_weights=False),
}


@pytest.mark.parametrize("method", sorted(SPECTRAL))
@pytest.mark.parametrize("case", ["gpt2-with-lm_head", "emb-conv1d"])
def test_spectral_conv1d_next_to_linear_layer_type_from_the_base(tmp_path, method, case):
    """No saved tensor tells out from in (the positions are drawn for either shape) and the saved flag is the
    last layer's; the base's bias tells each non-square layer's type: merged equal to PEFT (and unmerged)."""
    if case == "gpt2-with-lm_head":
        model, config = _untied_gpt2(), SPECTRAL[method](["c_attn", "c_fc", "mlp.c_proj", "lm_head"])
    else:  # PEFT's test model: Conv1D stored (in=5, out=1), then an nn.Linear; the change kept near |W| (~0.02),
        # else the unmerge's float32 cancellation (|ΔW| ~ 20) alone exceeds 1e-5 of |W|
        torch.manual_seed(0)
        model, config = with_random_biases(_EmbConv1D()), SPECTRAL[method](["conv1d", "lin0"], 4, 1e-3)
    _, adapter_dir, _ = run_case(tmp_path, model, config)
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["fan_in_fan_out"] is False


@pytest.mark.parametrize("method", sorted(SPECTRAL))
def test_spectral_square_weight_next_to_both_types_is_refused(tmp_path, capsys, method):
    """attn.c_proj is (d, d): neither its shape nor its bias tells Conv1D from nn.Linear, and the adapter has
    both types: refused rather than merged by the saved flag (which is the lm_head's False)."""
    line = _refused(tmp_path, capsys, SPECTRAL[method](MIXED))
    assert "transformer.h.0.attn.c_proj" in line and "square" in line and "lm_head" in line


@pytest.mark.parametrize("case", ["gpt2-with-lm_head", "emb-conv1d"])
def test_tinylora_conv1d_next_to_linear_layout_from_the_shapes(tmp_path, case):
    """tinylora_B·tinylora_A is (out, in): each non-square weight's layout follows from its shape, not the flag."""
    if case == "gpt2-with-lm_head":
        model = _untied_gpt2()
        cfg = TinyLoraConfig(r=2, u=3, weight_tying=0.5, target_modules=["c_attn", "c_fc", "mlp.c_proj", "lm_head"])
    else:  # PEFT's test model: Conv1D stored (in=5, out=1), then an nn.Linear
        torch.manual_seed(0)
        model = with_random_biases(_EmbConv1D())
        cfg = TinyLoraConfig(r=1, u=2, target_modules=["conv1d", "lin0"])
    _, adapter_dir, _ = run_case(tmp_path, model, cfg)
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["fan_in_fan_out"] is False


def test_tinylora_square_weight_next_to_both_types_is_refused(tmp_path, capsys):
    """attn.c_proj is (d, d): its shape cannot tell Conv1D from nn.Linear, and the adapter has both types."""
    line = _refused(tmp_path, capsys, TinyLoraConfig(r=2, u=3, target_modules=MIXED))
    assert "transformer.h.0.attn.c_proj: its weight is square" in line and "lm_head" in line
    assert "merge_and_unload" in line
