#!/usr/bin/env bash
# llama.cpp for tests/test_gguf_llamacpp.py, built in minutes rather than the better part of an hour.
#
# `pip install llama-cpp-python` compiles all of llama.cpp, optimised, with its multimodal and common
# libraries (more than 40 minutes on 2 cores). The tests need only libllama on the CPU, and a tiny
# model runs fine unoptimised: this builds that from llama-cpp-python's own sdist (its Python
# bindings match its vendored llama.cpp), about 3 CPU-minutes (8 minutes on a busy 2-core machine,
# download included), and writes DIR/env.sh, which
# sets PYTHONPATH and LLAMA_CPP_LIB_PATH for the bindings and LLAMA_CPP_SRC for llama.cpp's
# converter scripts. Usage: scripts/build_llama_cpp.sh [DIR]; then `. DIR/env.sh; pytest tests/test_gguf_llamacpp.py`.
set -euo pipefail
VERSION=0.3.36
DIR=$(realpath -m "${1:-${XDG_CACHE_HOME:-$HOME/.cache}/wsurgery-llama-cpp}")
SRC="$DIR/llama_cpp_python-$VERSION"
mkdir -p "$DIR"
if [ ! -d "$SRC" ]; then
    pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$DIR"
    tar -xzf "$DIR/llama_cpp_python-$VERSION.tar.gz" -C "$DIR"
fi
pip install --quiet diskcache jinja2  # the bindings' own dependencies
cmake -S "$SRC/vendor/llama.cpp" -B "$DIR/build" -DBUILD_SHARED_LIBS=ON -DCMAKE_BUILD_TYPE=None \
    -DCMAKE_C_FLAGS=-O0 -DCMAKE_CXX_FLAGS=-O0 -DGGML_NATIVE=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_COMMON=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF > "$DIR/cmake.log"
cmake --build "$DIR/build" --target llama -j "$(nproc)" > "$DIR/build.log"
cat > "$DIR/env.sh" <<EOF
export PYTHONPATH="$SRC\${PYTHONPATH:+:\$PYTHONPATH}"
export LLAMA_CPP_LIB_PATH="$DIR/build/bin"
export LLAMA_CPP_SRC="$SRC/vendor/llama.cpp"
EOF
echo ". $DIR/env.sh"
