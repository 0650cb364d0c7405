"""The interface every stored weight encoding implements, and the registry that finds them.

A quantized checkpoint stores one weight as several tensors (codes plus scales, zero points,
packed state...). An ``Encoding`` knows which stored tensors, with which ``quantization_config``,
make up one *logical* tensor (the weight the model computes with), how to decode it as its reference
implementation does, and, where the format's quantizer is deterministic, how to encode a logical
tensor back into the same stored tensors. The readers list each encoded weight as one
``EncodedTensorInfo``, so merge, verify, inspect and dequantize see a plain checkpoint; the engine
re-encodes the changed ones where ``--requantize`` asks. Adding an encoding means adding one module
to this package that defines an ``Encoding`` subclass decorated with ``@register``.

An ``Encoding`` instance is a frozen dataclass of one tensor's parameters (block size, scale
layout, transposition...): two tensors with equal instances are stored alike, so an unchanged
tensor whose output encoding equals its input encoding is copied byte for byte.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Protocol

import torch

from ...checkpoint.safetensors_file import TensorInfo, TensorSpec

Rows = tuple[int, int]


class ReadPart(Protocol):
    """Reads one stored tensor as stored: whole, or rows ``[start, stop)`` of its first dimension."""

    def __call__(self, info: TensorInfo, rows: Rows | None = None, /) -> torch.Tensor: ...


@dataclass(frozen=True)
class EncodedTensorInfo:
    """One encoded weight as the logical tensor it stands for; ``parts`` are its stored tensors."""

    name: str
    dtype: torch.dtype  # what ``decode`` returns (the dtype the reference implementation loads)
    shape: tuple[int, ...]
    parts: dict[str, TensorInfo]  # the encoding's role for each stored tensor -> that tensor
    encoding: Encoding

    offset = -1  # not addressable as one byte range

    @property
    def file(self) -> Path:
        return next(iter(self.parts.values())).file

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes stored (what reading it costs), not the logical size."""
        return sum(p.nbytes for p in self.parts.values())


class Encoding(ABC):
    """One way of storing weights; subclasses are frozen dataclasses of a tensor's parameters."""

    #: Short name, shown by ``inspect`` and in messages ("fp8-block", "nf4"...).
    name: ClassVar[str]
    #: ``quantization_config.quant_method`` values this encoding's files record (empty: none needed).
    quant_methods: ClassVar[tuple[str, ...]] = ()
    #: Why a logical tensor cannot be encoded again (None where ``encode`` reproduces the format's own
    #: quantizer byte for byte): ``--requantize`` is refused with this reason.
    cannot_encode: ClassVar[str | None] = None

    @classmethod
    def recognizes(cls, quantization_config: dict) -> bool:
        """Whether a checkpoint with this ``quantization_config`` is stored (only) in this encoding."""
        return quantization_config.get("quant_method") in cls.quant_methods

    @classmethod
    @abstractmethod
    def group(cls, stored: dict[str, TensorInfo], context: GroupContext) -> dict[str, EncodedTensorInfo]:
        """The logical tensors this encoding finds among ``stored`` (keyed by logical name), each part
        checked against the others and the config now, so that a broken file fails before any work.
        Tensors it does not recognise are left alone; a part it claims must not be claimed twice."""

    @abstractmethod
    def decode(self, info: EncodedTensorInfo, read: ReadPart, rows: Rows | None = None) -> torch.Tensor:
        """The logical tensor in ``info.dtype``, exactly as the reference implementation decodes it; with
        ``rows``, only rows ``[start, stop)`` of its first dimension (bounds multiples of ``row_chunk``,
        or the end), reading only the stored rows they need."""

    def row_chunk(self, info: EncodedTensorInfo) -> int | None:
        """The logical first-dimension rows that decode independently of the others (a block row of
        FP8's 128x128 blocks, one expert...); None where only the whole tensor decodes."""
        return None

    def encode_row_chunk(self, shape: tuple[int, ...]) -> int | None:
        """The logical first-dimension rows that encode independently (None where the encoding needs the
        whole tensor, e.g. one scale for all of it)."""
        return None

    def describe(self) -> str:
        """How the tensor is stored, in a few words (``inspect``)."""
        return self.name

    def stored_specs(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> list[TensorSpec]:
        """The stored tensors the logical ``name`` becomes, known before any data."""
        raise NotImplementedError(self.cannot_encode or f"{self.name} has no encoder")

    def encode(self, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        """Stored tensors (by stored name) for the logical ``tensor``, already in the logical dtype."""
        raise NotImplementedError(self.cannot_encode or f"{self.name} has no encoder")

    def encode_rows(self, name: str, tensor: torch.Tensor, rows: Rows,
                    shape: tuple[int, ...]) -> dict[str, tuple[torch.Tensor, int]]:
        """``encode`` for logical rows ``[start, stop)`` (bounds multiples of ``encode_row_chunk``, or the
        end) of a tensor of ``shape``: each stored part with the first row of its stored tensor it
        starts at. Together the chunks give exactly the bytes ``encode`` gives for the whole tensor."""
        raise NotImplementedError(f"{self.name} encodes whole tensors only")


@dataclass(frozen=True)
class GroupContext:
    """What an encoding may consult while grouping: the configs, and small tensors' bytes."""

    config: dict | None  # the model's config.json
    quantization_config: dict | None
    read: ReadPart  # reads one stored tensor (only small side tensors should be read while grouping)
    where: str  # the checkpoint, for messages


_REGISTRY: list[type[Encoding]] = []


def register(cls: type[Encoding]) -> type[Encoding]:
    """Class decorator: make an encoding known to the readers."""
    _REGISTRY.append(cls)
    return cls


def registered() -> list[type[Encoding]]:
    return list(_REGISTRY)
