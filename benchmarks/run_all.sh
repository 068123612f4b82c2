#!/usr/bin/env bash
# Every benchmark behind BENCHMARKS.md, one after the other (never two at once: 2 cores).
# Usage: benchmarks/run_all.sh [OUTDIR]   (default bench-results/); needs `make setup` first and
# the llama.cpp peer: .venv/bin/pip install ../shared/wheels/llama_cpp_python-0.3.36-*.whl
set -u
cd "$(dirname "$0")/.."
OUT=${1:-bench-results}
mkdir -p "$OUT"
PY=.venv/bin/python
Q=.venv/bin/qwenrun
log() { echo "[$(date +%H:%M:%S)] $*" >&2; }

log "1/6 demo: qwenrun (fp32, int8, int4) vs llama.cpp vs transformers"
$PY benchmarks/bench_cpu.py --quant none,int8,int4 --peers llama.cpp,transformers > "$OUT/cpu_demo.txt" 2>"$OUT/cpu_demo.err"

log "2/6 demo: offline generate of 64 prompts vs one at a time"
for q in none int8; do
  qa=""; [ "$q" != none ] && qa="-q $q"
  $Q bench throughput demo $qa --batch-sizes 1,64 --input-len 64 --output-len 64 --repeats 2 \
     --kv-cache-memory 2 --max-model-len 4096 >> "$OUT/offline64.jsonl" 2>>"$OUT/offline64.err"
done

log "3/6 Qwen1.5-4B shapes, random weights: latency (int8, int4, dense fp32)"
for q in int8 int4 none; do
  qa="--dtype float32"; [ "$q" != none ] && qa="-q $q"   # dense: fp32 (16 GB), the exact path
  $Q bench latency Qwen/Qwen1.5-4B-Chat --random-weights $qa --input-len 512 --output-len 32 --repeats 2 \
     --max-model-len 2048 --kv-cache-memory 2 >> "$OUT/4b_latency.jsonl" 2>>"$OUT/4b_latency.err"
done

log "4/6 Qwen1.5-4B shapes: throughput at batch 1/4/16/64 (int8)"
$Q bench throughput Qwen/Qwen1.5-4B-Chat --random-weights -q int8 --batch-sizes 1,4,16,64 --input-len 64 \
   --output-len 16 --repeats 1 --max-model-len 4096 --kv-cache-memory 4 >> "$OUT/4b_throughput.jsonl" 2>>"$OUT/4b_throughput.err"

log "5/6 Qwen1.5-4B shapes: 1K / 8K / 32K context, int8 weights + int8 KV (one process each: peak RSS)"
for L in 1024 8192 32760; do
  /usr/bin/time -v $Q bench latency Qwen/Qwen1.5-4B-Chat --random-weights -q int8 --kv-cache-dtype int8 \
     --max-model-len 32768 --input-len $L --output-len 8 --warmup 0 --repeats 1 \
     >> "$OUT/4b_long.jsonl" 2>>"$OUT/4b_long.err"
done
log "   and 32K with a bf16 KV cache (does it fit?)"
/usr/bin/time -v $Q bench latency Qwen/Qwen1.5-4B-Chat --random-weights -q int8 --kv-cache-dtype bfloat16 \
   --max-model-len 32768 --input-len 32760 --output-len 8 --warmup 0 --repeats 1 \
   >> "$OUT/4b_long.jsonl" 2>>"$OUT/4b_long.err"

log "6/6 server: qwenrun serve demo vs llama-cpp-python server, 1/4/16 clients"
$PY benchmarks/bench_serve.py --concurrency 1,4,16 --input-len 128 --output-len 32 --qwenrun-args "-q int8" > "$OUT/serve.txt" 2>"$OUT/serve.err"
log "done: $OUT"
