#!/usr/bin/env bash
# Build (once) llama-cpp-python for THIS CPU in a benchmark-only venv and print its python path.
# The venv is cached under ~/.cache/qwenrun/ keyed by the llama-cpp-python version and the CPU's
# feature flags, so a session on another CPU kind builds its own (never reuses an AVX2-only build on
# an AVX-512 machine). qwenrun never depends on it.
#   benchmarks/peer_llamacpp.sh            -> prints e.g. ~/.cache/qwenrun/llamacpp-0.3.36-<key>/bin/python
#   LLAMACPP_FALLBACK_WHEEL=1 ...          -> installs ../shared/wheels' AVX2 wheel instead (quick, understates AVX-512 CPUs)
set -euo pipefail
VER=0.3.36
TORCH=torch==2.13.0
flags=$(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2 | tr ' ' '\n' | sort | tr '\n' ' ')
key=$(printf '%s %s' "$VER" "$flags" | sha256sum | cut -c1-12)
kind=native
if [ "${LLAMACPP_FALLBACK_WHEEL:-0}" = 1 ]; then kind=avx2wheel; fi
dir="${QWENRUN_CACHE:-$HOME/.cache/qwenrun}/llamacpp-$VER-$kind-$key"
if [ ! -x "$dir/.ready" ]; then
    python3 -m venv "$dir"
    "$dir/bin/python" -m pip install --quiet --upgrade pip
    # numpy etc. only; torch is not needed by the peer. starlette/pydantic-settings for its server.
    if [ "$kind" = avx2wheel ]; then
        whl=$(ls "$(dirname "$0")"/../../shared/wheels/llama_cpp_python-$VER-*.whl)
        "$dir/bin/python" -m pip install --quiet "$whl"
    else
        CMAKE_ARGS="-DGGML_NATIVE=ON" "$dir/bin/python" -m pip install --quiet --no-cache-dir \
            "llama-cpp-python==$VER" >&2
    fi
    "$dir/bin/python" -m pip install --quiet gguf numpy "starlette-context" "pydantic-settings" "uvicorn" "fastapi" "sse-starlette" >&2
    printf '%s\n' "$flags" > "$dir/cpu-flags.txt"
    printf '#!/bin/sh\nexit 0\n' > "$dir/.ready"; chmod +x "$dir/.ready"
fi
echo "$dir/bin/python"
