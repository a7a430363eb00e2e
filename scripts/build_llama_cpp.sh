#!/usr/bin/env bash
# Build llama-cpp-python from its sdist with this CPU's native flags and install it into the active
# Python, for `localrun bench --compare llama.cpp`. The sdist stays unpacked in DIR: bench converts
# checkpoints with its vendor/llama.cpp/convert_hf_to_gguf.py (the same llama.cpp as the library).
#
#   scripts/build_llama_cpp.sh [DIR]     DIR defaults to ${XDG_CACHE_HOME:-~/.cache}/localrun/llama.cpp
#
# About 20 minutes on 2 cores. On a CPU with AMX, GCC 12 drops the tile-config stores in llama.cpp's
# AMX kernel (an illegal instruction on every Q4/Q8 model): llama-amx-tilecfg.patch adds a barrier.
set -euo pipefail
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
DIR=${1:-${XDG_CACHE_HOME:-$HOME/.cache}/localrun/llama.cpp}
HERE=$(cd "$(dirname "$0")" && pwd)
SRC="$DIR/llama_cpp_python-$VERSION"
mkdir -p "$DIR"
if [ ! -f "$SRC/vendor/llama.cpp/convert_hf_to_gguf.py" ]; then
    python -m pip download "llama_cpp_python==$VERSION" --no-binary :all: --no-deps -d "$DIR"
    tar xzf "$DIR/llama_cpp_python-$VERSION.tar.gz" -C "$DIR"
fi
MMQ="$SRC/vendor/llama.cpp/ggml/src/ggml-cpu/amx/mmq.cpp"
if grep -qw amx_tile /proc/cpuinfo 2>/dev/null && ! grep -q "Force them" "$MMQ"; then
    patch -p0 -d "$(dirname "$MMQ")" < "$HERE/llama-amx-tilecfg.patch"
fi
# The library only (no llava/mtmd, tools, tests); -march=native through GGML_NATIVE.
CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF ${CMAKE_ARGS:-}" \
CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
    nice -n 10 python -m pip install "$SRC" --config-settings=build-dir="$DIR/build-$VERSION"
echo "llama-cpp-python $VERSION installed; converter: $SRC/vendor/llama.cpp/convert_hf_to_gguf.py"
