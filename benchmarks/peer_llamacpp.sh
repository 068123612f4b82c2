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
cmake_args="-DGGML_NATIVE=ON"
if [ "${LLAMACPP_FALLBACK_WHEEL:-0}" = 1 ]; then kind=avx2wheel; fi
# LLAMACPP_NO_AMX=1: every ISA extension of this CPU but AMX. On the Sapphire Rapids KVM guest of
# 2026-12-01 the native build's AMX path (weights repacked into its AMX buffer) dies with SIGSEGV
# in the first decode, so the peer there is built without it (and says so in its system info).
if [ "${LLAMACPP_NO_AMX:-0}" = 1 ]; then
    kind=native-noamx
    cmake_args="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
    for f in avx512f:AVX512 avx512vbmi:AVX512_VBMI avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16 avx_vnni:AVX_VNNI; do
        case " $flags " in *" ${f%%:*} "*) cmake_args="$cmake_args -DGGML_${f##*:}=ON";; esac
    done
    cmake_args="$cmake_args -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
fi
dir="${QWENRUN_CACHE:-$HOME/.cache/qwenrun}/llamacpp-$VER-$kind-$key"
if [ ! -x "$dir/.ready" ]; then
    python3 -m venv "$dir"
    "$dir/bin/python" -m pip install --quiet --upgrade pip
    # numpy etc. only; torch is not needed by the peer. starlette/pydantic-settings for its server.
    if [ "$kind" = avx2wheel ]; then
        whl=$(ls "$(dirname "$0")"/../../shared/wheels/llama_cpp_python-$VER-*.whl)
        "$dir/bin/python" -m pip install --quiet "$whl"
    else
        CMAKE_ARGS="$cmake_args" "$dir/bin/python" -m pip install --quiet --no-cache-dir \
            "llama-cpp-python==$VER" >&2
    fi
    "$dir/bin/python" -m pip install --quiet gguf numpy "starlette-context" "pydantic-settings" "uvicorn" "fastapi" "sse-starlette" >&2
    printf '%s\n' "$flags" > "$dir/cpu-flags.txt"
    printf '#!/bin/sh\nexit 0\n' > "$dir/.ready"; chmod +x "$dir/.ready"
fi
echo "$dir/bin/python"
