#!/usr/bin/env bash
# Builds llama.cpp's own `llama-quantize` (CPU only, portable: no -march=native) from the source tree that
# scripts/fetch_llama_cpp_src.sh fetches (llama.cpp vendored in llama-cpp-python 0.3.36). It is the oracle of the
# GGUF type mixes (q4_k_m, q5_k_m...): scripts/make_gguf_mix_fixtures.py runs it, and tests/test_gguf_mixes.py
# compares against it live when LLAMA_QUANTIZE is set. Takes several minutes on 2 cores.
# Usage: scripts/build_llama_quantize.sh [BUILD_DIR]; then `export LLAMA_QUANTIZE=...` as printed.
set -euo pipefail
HERE=$(dirname "$(realpath "$0")")
eval "$("$HERE/fetch_llama_cpp_src.sh" 2>/dev/null | grep '^export LLAMA_CPP_SRC=')"
BUILD=$(realpath -m "${1:-${XDG_CACHE_HOME:-$HOME/.cache}/wsurgery-llama-cpp/build-quantize}")
if [ ! -x "$BUILD/bin/llama-quantize" ]; then
    cmake -S "$LLAMA_CPP_SRC" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DLLAMA_CURL=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DGGML_OPENMP=OFF >/dev/null
    cmake --build "$BUILD" --target llama-quantize -j"${JOBS:-2}" >/dev/null
fi
echo "export LLAMA_QUANTIZE=$BUILD/bin/llama-quantize"
