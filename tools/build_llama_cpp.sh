#!/usr/bin/env bash
# Builds the llama.cpp that GGUF export and its evaluation use (optipfair/export.py), from the
# llama.cpp vendored in one pinned llama-cpp-python sdist, into .llama.cpp/ (git-ignored):
#   .llama.cpp/src/   the sdist: vendor/llama.cpp/convert_hf_to_gguf.py + gguf-py (the converter)
#   .llama.cpp/bin/   llama-quantize, llama-bench, llama-perplexity and libllama.so
# and installs the sdist's Python bindings without a second native build (they load bin/libllama.so).
# The x86 extensions are chosen one by one from those this CPU lists, not by the native build
# (-march=native), which segfaults on Q8_0/Q4_K on CPUs that advertise AMX they do not run. AVX-512,
# where the CPU has it, makes llama.cpp's perplexity 1.6x faster than AVX2 alone on these machines
# (README, GGUF export); the build then runs on CPUs with the same extensions only, so build where
# you run. The tools find their libraries beside them ($ORIGIN), so the checkout can move.
# About 4 minutes on 2 cores. Usage: tools/build_llama_cpp.sh  (in the activated venv)
set -euo pipefail
VERSION=0.3.36
cd "$(dirname "$0")/.."
DEST=.llama.cpp
JOBS=${JOBS:-$(nproc)}
has() { grep -qw "$1" /proc/cpuinfo 2>/dev/null; }
ISA=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON)
if has avx512f && has avx512cd && has avx512vl && has avx512dq && has avx512bw; then
    ISA+=(-DGGML_AVX512=ON)
    if has avx512vbmi; then ISA+=(-DGGML_AVX512_VBMI=ON); fi
    if has avx512_vnni; then ISA+=(-DGGML_AVX512_VNNI=ON); fi
    if has avx512_bf16; then ISA+=(-DGGML_AVX512_BF16=ON); fi
fi
STAMP="$VERSION ${ISA[*]}"  # another version or other extensions: build again
if [ -x "$DEST/bin/llama-quantize" ] && [ "$(cat "$DEST/VERSION" 2>/dev/null)" = "$STAMP" ]; then
    echo "llama.cpp of llama-cpp-python $VERSION already built in $DEST"; exit 0
fi
rm -rf "$DEST/src" "$DEST/build" "$DEST/bin" "$DEST/VERSION" && mkdir -p "$DEST/dl"
SDIST="$DEST/dl/llama_cpp_python-$VERSION.tar.gz"
[ -f "$SDIST" ] || pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$DEST/dl"
tar xzf "$SDIST" -C "$DEST" && mv "$DEST/llama_cpp_python-$VERSION" "$DEST/src"
cmake -S "$DEST/src/vendor/llama.cpp" -B "$DEST/build" -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=OFF -DCMAKE_BUILD_RPATH_USE_ORIGIN=ON "${ISA[@]}" > "$DEST/cmake.log"
cmake --build "$DEST/build" -j "$JOBS" --target llama-quantize llama-bench llama-perplexity > "$DEST/build.log"
mkdir -p "$DEST/bin" && cp -P "$DEST/build/bin/"* "$DEST/bin/"
# The bindings only (LLAMA_BUILD=OFF): the shared library is the one built above.
CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" pip install -q "$DEST/src"
# The converter's own requirements beyond the core's (torch, transformers, numpy, gguf-py vendored).
pip install -q "sentencepiece>=0.2,<0.3"
echo "$STAMP" > "$DEST/VERSION"
echo "llama.cpp of llama-cpp-python $VERSION built in $DEST (${ISA[*]})"
