"""PEFT methods that have no weight-space change to fold into a checkpoint, and why."""

from .base import register_not_mergeable

_PROMPT = "it learns virtual tokens that are fed to the model with every input; no weight changes"
for _peft_type in ("PROMPT_TUNING", "P_TUNING", "CPT", "MULTITASK_PROMPT_TUNING"):
    register_not_mergeable(_peft_type, _PROMPT)
register_not_mergeable("PREFIX_TUNING", "it learns key/value prefixes added to every attention layer at run time; "
                                        "no weight changes")
register_not_mergeable("CARTRIDGE", "it learns a key/value prefix (a cartridge) used at run time; no weight changes")
register_not_mergeable("ADAPTION_PROMPT", "it adds gated prompt attention at run time; no weight changes")
register_not_mergeable("XLORA", "a classifier mixes its LoRAs per token at run time; merge its constituent LoRA "
                                "adapters one by one instead")
register_not_mergeable("LILY", "a data-dependent router mixes shared projections per batch at run time; PEFT cannot "
                              "merge it either")
register_not_mergeable("SHADOW", "it runs a parallel shadow network; PEFT refuses to merge it too")
