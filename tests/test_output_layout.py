"""The output mirrors the base's sharding, and stays loadable when decoding empties a shard."""

from __future__ import annotations

import torch

from wsurgery.checkpoint import TensorSpec, plan_shards


def _spec(name: str) -> TensorSpec:
    return TensorSpec(name, torch.bfloat16, (2, 2))


def test_base_shards_are_kept():
    base = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    shards = plan_shards([_spec("a"), _spec("b")], base, None)
    assert [(n, [s.name for s in g]) for n, g in shards] == [("model-00001-of-00002.safetensors", ["a"]),
                                                            ("model-00002-of-00002.safetensors", ["b"])]


def test_shards_collapsed_into_one_become_the_single_file():
    """A shard that held only scales (dropped when decoded) leaves one shard: written as model.safetensors,
    without an index, not as a lone "-00001-of-00002" file that transformers cannot find."""
    base = {"a": "model-00001-of-00002.safetensors", "a_scale_inv": "model-00002-of-00002.safetensors"}
    shards = plan_shards([_spec("a")], base, None)
    assert [(n, [s.name for s in g]) for n, g in shards] == [("model.safetensors", ["a"])]
