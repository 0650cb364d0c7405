"""Methods with no weight-space merge: ``wsurgery merge`` refuses them with one line naming the method and
the reason, and writes nothing.

Every adapter here is a real one, built by PEFT on a tiny Llama (all of them are cheap to build) and
saved with ``save_pretrained``; the refusal must come from the saved ``peft_type``.
"""

from __future__ import annotations

import json

import pytest
from peft import (AdaptionPromptConfig, CartridgeConfig, CPTConfig, LilyConfig, LoraConfig,
                  MultitaskPromptTuningConfig, PrefixTuningConfig, PromptEncoderConfig,
                  PromptTuningConfig, ShadowConfig, XLoraConfig, get_peft_model)
from peft.utils.peft_types import PeftType

from oracle import make_adapter, save_base, tiny_llama
from wsurgery.cli import main
from wsurgery.methods import not_mergeable, registered

# peft_type -> (PEFT config factory, words the one-line reason must contain)
CASES = {
    "PROMPT_TUNING": (lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4), "virtual tokens"),
    "PREFIX_TUNING": (lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4), "prefixes"),
    "P_TUNING": (lambda: PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=16),
                 "virtual tokens"),
    "ADAPTION_PROMPT": (lambda: AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=4, adapter_layers=1),
                        "gated prompt attention"),
    "MULTITASK_PROMPT_TUNING": (lambda: MultitaskPromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4,
                                                                    num_tasks=2), "virtual tokens"),
    "CPT": (lambda: CPTConfig(task_type="CAUSAL_LM", cpt_token_ids=[0, 1, 2], cpt_mask=[1, 1, 1],
                              cpt_tokens_type_mask=[1, 2, 3]), "virtual tokens"),
    "CARTRIDGE": (lambda: CartridgeConfig(task_type="CAUSAL_LM", num_virtual_tokens=4), "prefix"),
    "LILY": (lambda: LilyConfig(target_modules=["q_proj", "v_proj"], r=2), "router"),
    "SHADOW": (lambda: ShadowConfig(task_type="CAUSAL_LM", r=2), "shadow network"),
    "XLORA": (None, "constituent LoRA adapters one by one"),  # built from a saved LoRA below
}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_base(tiny_llama(), tmp_path_factory.mktemp("nm") / "base")


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Each adapter built once, for both commands."""
    root = tmp_path_factory.mktemp("adapters")
    built = {}

    def get(peft_type):
        if peft_type not in built:
            (root / peft_type).mkdir()
            built[peft_type] = _make(peft_type, root / peft_type / "adapter")
        return built[peft_type]
    return get


def _make(peft_type: str, folder):
    factory, _ = CASES[peft_type]
    if factory is not None:
        return make_adapter(tiny_llama(), factory(), folder)
    lora = make_adapter(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]), folder.parent / "lora")
    model = tiny_llama()
    model.config.use_cache = False
    xlora = get_peft_model(model, XLoraConfig(task_type="CAUSAL_LM", hidden_size=32, adapters={"0": str(lora)},
                                              xlora_depth=1))
    xlora.save_pretrained(folder)
    return folder


def test_cases_cover_every_registered_refusal():
    assert set(CASES) == set(not_mergeable())


def test_refused_types_are_peft_types_and_not_also_mergeable():
    peft_types = {t.value for t in PeftType}
    assert set(not_mergeable()) <= peft_types, set(not_mergeable()) - peft_types
    assert not set(not_mergeable()) & set(registered())


@pytest.mark.parametrize("command", ["merge", "unmerge"])
@pytest.mark.parametrize("peft_type", sorted(CASES))
def test_cli_refuses_with_one_line(tmp_path, capsys, base_dir, adapters, peft_type, command):
    adapter = adapters(peft_type)
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == peft_type
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        main([command, "-q", str(base_dir), str(adapter), str(out)])
    assert e.value.code != 0
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert f"{peft_type} cannot be merged into weights" in lines[0]
    assert CASES[peft_type][1] in lines[0]
    assert not out.exists()
    assert not list(tmp_path.iterdir())  # no temporary output left behind either
