"""`qwenrun bench` runs end to end and reports every figure against measured limits."""
from __future__ import annotations

import json
import subprocess
import sys


def _bench(*args):
    r = subprocess.run([sys.executable, "-m", "qwenrun.cli", "bench", *args], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    return [json.loads(ln) for ln in r.stdout.splitlines() if ln.startswith("{")]


def test_bench_latency_reports_limits_and_fractions(tiny_dir):
    recs = _bench("latency", str(tiny_dir), "--input-len", "16", "--output-len", "4", "--repeats", "1",
                  "--warmup", "0", "--max-model-len", "128", "--kv-cache-memory", "0.01")
    kinds = {r["bench"]: r for r in recs}
    assert set(kinds) == {"prefill", "decode"}
    d, p = kinds["decode"], kinds["prefill"]
    assert d["mem_read_gbps"] > 0 and d["fp32_gflops"] > 0
    assert d["tokens_per_s"] > 0 and 0 < d["pct_of_mem_ceiling"] and d["peak_rss_gib"] > 0
    assert p["tokens_per_s"] > 0 and p["pct_of_compute_peak"] > 0
    assert d["threads"] >= 1 and d["commit"]


def test_bench_throughput_batches(tiny_dir):
    recs = _bench("throughput", str(tiny_dir), "--batch-sizes", "1,4", "--input-len", "8", "--output-len", "4",
                  "--repeats", "1", "--max-model-len", "128", "--kv-cache-memory", "0.01")
    assert [r["batch"] for r in recs] == [1, 4]
    assert all(r["output_tokens_per_s"] > 0 for r in recs)


def test_sig_keeps_small_fractions_visible():
    from qwenrun.bench import sig

    # A tiny model on a fast CPU reaches a sliver of the compute peak: it must not print as 0.0.
    assert sig(0.0123) == 0.0123 and sig(0.04) > 0
    assert sig(123456.7) == 123000 and sig(12.345) == 12.3 and sig(0) == 0
