"""Large tensors go through the engine in row chunks: the result must not depend on the chunking.

The engine chunks tensors above ``CHUNK_ELEMENTS``; lowering it makes tiny models take the chunked
path (a few rows per chunk), whose output must equal PEFT's merge as closely as the whole-tensor
path's does (a matrix product over fewer rows may sum in another order: equal within rounding, not
byte for byte)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig

import wsurgery.engine as engine
from oracle import assert_close_to, load_all, make_adapter, oracle_merge, run_cli, save_base, tiny_llama


@pytest.mark.parametrize("targets", [["q_proj", "v_proj", "embed_tokens"], ["gate_proj", "down_proj", "lm_head"]])
def test_chunked_merge_equals_whole_and_peft(tmp_path, capsys, monkeypatch, targets):
    model = tiny_llama(torch.bfloat16, seed=3)
    base = save_base(model, tmp_path / "base")
    adapter = make_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False),
                           tmp_path / "adapter", seed=4)
    assert run_cli(["merge", base, adapter, tmp_path / "whole", "-q"], capsys)[0] == 0
    chunked = []
    real = engine._run_job_in_rows

    def spy(job, *args, **kwargs):
        chunked.append(job.module)
        return real(job, *args, **kwargs)

    monkeypatch.setattr(engine, "CHUNK_ELEMENTS", 100)
    monkeypatch.setattr(engine, "_run_job_in_rows", spy)
    assert run_cli(["merge", base, adapter, tmp_path / "chunked", "-q"], capsys)[0] == 0
    assert chunked, "no job took the chunked path"
    whole, parts = load_all(tmp_path / "whole"), load_all(tmp_path / "chunked")
    assert whole.keys() == parts.keys()
    assert_close_to(parts, whole)
    expected = oracle_merge(tiny_llama(torch.bfloat16, seed=3), adapter)
    assert_close_to(parts, {k: v for k, v in expected.items() if k in parts}, base=load_all(base))
