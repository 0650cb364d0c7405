"""Quantized weights: the stored encodings (``encodings/``), their arithmetic, and the quantize/dequantize jobs."""

from .bnb4bit import (
    BLOCKSIZES,
    NESTED_BLOCKSIZE,
    QUANT_TYPES,
    SUFFIXES,
    QuantState,
    check_blocksize,
    code_book,
    dequantize_4bit,
    dynamic_map,
    error_summary,
    json_suffix,
    parse_parts,
    quantization_error,
    quantize_4bit,
)

__all__ = ["BLOCKSIZES", "NESTED_BLOCKSIZE", "QUANT_TYPES", "SUFFIXES", "QuantState", "check_blocksize", "code_book",
           "dequantize_4bit", "dynamic_map", "error_summary", "json_suffix", "parse_parts", "quantization_error",
           "quantize_4bit"]
