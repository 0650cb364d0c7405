"""Generate the small committed fixtures in ``fixtures/`` with transformers and PEFT.

    python scripts/make_fixtures.py            # rewrites fixtures/tiny-llama and fixtures/tiny-llama-lora

The Hub cannot be reached from CI, so the README quick start and some tests run on these: a tiny
Llama-architecture model in bfloat16, saved by ``save_pretrained`` in three shards with an index,
config, generation config and a word-level tokenizer, and a rank-8 LoRA on all its linear layers
with non-zero random weights, saved by PEFT. Deterministic: the same files every time.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch


def build_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(vocab_size - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "fixtures")
    args = parser.parse_args()

    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    base = args.out / "tiny-llama"
    shutil.rmtree(base, ignore_errors=True)
    model.save_pretrained(base, max_shard_size="64KB")
    build_tokenizer(config.vocab_size).save_pretrained(base)

    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                          "up_proj", "down_proj"], task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lora)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_((torch.randn(p.shape, generator=g) * 0.05).to(p.dtype))
    adapter = args.out / "tiny-llama-lora"
    shutil.rmtree(adapter, ignore_errors=True)
    peft_model.save_pretrained(adapter)
    # Point the adapter at its fixture base rather than at a temporary path.
    cfg_path = adapter / "adapter_config.json"
    cfg_path.write_text(cfg_path.read_text().replace('"base_model_name_or_path": null',
                                                     '"base_model_name_or_path": "fixtures/tiny-llama"'))
    for folder in (base, adapter):
        (folder / "README.md").unlink(missing_ok=True)
        size = sum(p.stat().st_size for p in folder.iterdir())
        print(f"{folder}: {len(list(folder.iterdir()))} files, {size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
