#!/usr/bin/env bash
# llama.cpp's source tree, for the one test that runs llama.cpp's own convert_lora_to_gguf.py
# (tests/test_gguf_llamacpp.py::test_our_gguf_lora_equals_llama_cpps_converter). Nothing is compiled:
# the converter is Python. The tree comes from llama-cpp-python's sdist on PyPI, which vendors llama.cpp.
# Usage: scripts/fetch_llama_cpp_src.sh [DIR]; then `export LLAMA_CPP_SRC=...` as printed.
set -euo pipefail
VERSION=0.3.36
DIR=$(realpath -m "${1:-${XDG_CACHE_HOME:-$HOME/.cache}/wsurgery-llama-cpp}")
SRC="$DIR/llama_cpp_python-$VERSION/vendor/llama.cpp"
mkdir -p "$DIR"
if [ ! -f "$SRC/convert_lora_to_gguf.py" ]; then
    pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$DIR"
    tar -xzf "$DIR/llama_cpp_python-$VERSION.tar.gz" -C "$DIR"
fi
echo "export LLAMA_CPP_SRC=$SRC"
