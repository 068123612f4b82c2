"""Speculative decoding at batch 1: decode tokens/s with and without it, and what it costs.

Part 1 (the demo model, real weights): code-editing prompts (rename a function, add type hints,
fix a bug in a given file) and open-ended prompts, greedy, each run plain then with ngram prompt
lookup, alternating, on the same loaded engine; decode tokens/s = (tokens - 1) / (time from the
first token to the last); the speculative output is checked token for token against the plain one.
The per-step trace (proposals, tokens emitted) of every speculative run is kept.

Part 2 (Qwen1.5-4B shapes, random weights): acceptance means nothing on random weights, so the
measurable parts are reported: (a) the step time of verifying k proposals (k+1 rows) against a
plain 1-row step, proposals forced and never accepted; (b) the 4B speedup that the demo's measured
per-step trace would give at those measured costs: sum over the demo trace of plain steps' time
vs the trace's steps' measured 4B times; (c) ngram on 4B random weights end to end (whatever it
accepts; back-off on); (d) the draft model (the demo model drafting for 4B shapes): measured time
of one speculative step (k draft forwards + verification), and the speedup it would give per
acceptance rate (tokens per step (1 - a^(k+1)) / (1 - a), over the measured step-time ratio).

    python benchmarks/bench_spec.py [--quantization int8] [--part 1|2|all] [--out results/spec.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

from qwenrun import LLM, SamplingParams
from qwenrun.engine.spec_config import SpeculativeConfig
from qwenrun.engine.spec_decode import SpecDecoder, make_spec_decoder
from qwenrun.outputs import OutputKind

INVENTORY = '''import json
from dataclasses import dataclass


@dataclass
class Item:
    name: str
    price: float
    quantity: int


def load_items(path):
    with open(path) as f:
        rows = json.load(f)
    return [Item(r["name"], r["price"], r["quantity"]) for r in rows]


def compute_total(items):
    total = 0
    for item in items:
        total += item.price * item.quantity
    return total


def most_expensive(items):
    best = None
    for item in items:
        if best is None or item.price > best.price:
            best = item
    return best


def report(items):
    lines = [f"{i.name}: {i.quantity} x {i.price:.2f}" for i in items]
    lines.append(f"total: {compute_total(items):.2f}")
    return "\\n".join(lines)
'''

BUGGY = '''def moving_average(values, window):
    """The mean of each run of `window` consecutive values."""
    if window <= 0:
        raise ValueError("window must be positive")
    out = []
    total = 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        if i >= window:
            out.append(total / window)
    return out


def normalise(values):
    lo, hi = min(values), max(values)
    span = hi - lo
    return [(v - lo) / span for v in values]
'''

PROMPTS = {
    "edit_rename": ("edit", "Rename the function `compute_total` to `order_total` everywhere in this file. Reply with "
                    "the complete updated file in one Python code block and nothing else.\n\n```python\n"
                    + INVENTORY + "```"),
    "edit_type_hints": ("edit", "Add type hints to every function in this file (parameters and return types). Reply "
                        "with the complete updated file in one Python code block and nothing else.\n\n```python\n"
                        + INVENTORY + "```"),
    "edit_fix_bug": ("edit", "`moving_average` skips the first full window (for window=2 and [1, 2, 3] it returns "
                     "[2.5] instead of [1.5, 2.5]). Fix the bug. Reply with the complete corrected file in one "
                     "Python code block and nothing else.\n\n```python\n" + BUGGY + "```"),
    "open_story": ("open", "Write a short story about a lighthouse keeper who finds a message in a bottle."),
    "open_explain": ("open", "Explain to a curious twelve-year-old how a refrigerator keeps food cold."),
}


def chat_ids(llm, text):
    return llm.get_tokenizer().encode(llm.apply_chat_template([{"role": "user", "content": text}]))


def set_spec(eng, spec):
    eng.spec = spec
    eng.scheduler.on_finish = spec.release if spec is not None else None


def timed_run(eng, ids, max_tokens, rid):
    """One greedy request alone: per step (seconds, tokens emitted, tokens proposed), and the tokens."""
    sp = SamplingParams(temperature=0, max_tokens=max_tokens, repetition_penalty=1.0)
    sch = eng.scheduler
    req = eng.add_request(rid, None, sp, prompt_token_ids=ids, output_kind=OutputKind.DELTA)
    trace = []
    while eng.has_unfinished_requests():
        g0, d0 = eng.stats["generation_tokens"], sch.num_draft_tokens
        t = time.perf_counter()
        eng.step()
        trace.append((time.perf_counter() - t, eng.stats["generation_tokens"] - g0, sch.num_draft_tokens - d0))
    toks = req.seqs[0].output_token_ids
    first = next(i for i, s in enumerate(trace) if s[1])  # prefill ends with the first token
    dec = trace[first + 1:]
    n = sum(s[1] for s in dec)
    return {"tokens": toks, "decode_tps": n / sum(s[0] for s in dec) if dec else float("nan"),
            "decode_steps": [(round(s[0], 5), s[1], s[2]) for s in dec]}


def part1(args, out):
    llm = LLM("demo", quantization=args.quantization, kv_cache_memory=1.0, max_model_len=4096)
    eng = llm.engine
    cfg = SpeculativeConfig.parse({"method": "ngram", "num_speculative_tokens": args.k,
                                   "prompt_lookup_max": 3, "prompt_lookup_min": 1})
    rows = []
    for name, (kind, text) in PROMPTS.items():
        ids = chat_ids(llm, text)
        max_tokens = args.edit_tokens if kind == "edit" else args.open_tokens
        plain, spec, same, acc = [], [], True, None
        ref = None
        for r in range(args.repeats):
            set_spec(eng, None)
            eng.block_manager.reset_prefix_cache()
            p = timed_run(eng, ids, max_tokens, f"{name}-p{r}")
            set_spec(eng, make_spec_decoder(cfg, eng))
            eng.block_manager.reset_prefix_cache()
            s0 = (eng.scheduler.num_drafts, eng.scheduler.num_draft_tokens, eng.scheduler.num_accepted_tokens)
            s = timed_run(eng, ids, max_tokens, f"{name}-s{r}")
            d, t, a = (x - y for x, y in zip((eng.scheduler.num_drafts, eng.scheduler.num_draft_tokens,
                                               eng.scheduler.num_accepted_tokens), s0))
            acc = {"drafts": d, "draft_tokens": t, "accepted": a, "acceptance_rate": round(a / t, 3) if t else 0.0,
                   "mean_acceptance_length": round(1 + a / d, 3) if d else 0.0}
            ref = ref or p["tokens"]
            same &= p["tokens"] == ref and s["tokens"] == ref
            plain.append(p["decode_tps"])
            spec.append(s["decode_tps"])
            trace = s["decode_steps"]
        set_spec(eng, None)
        row = {"prompt": name, "kind": kind, "output_tokens": len(ref), "plain_tps": round(statistics.median(plain), 2),
               "ngram_tps": round(statistics.median(spec), 2),
               "speedup": round(statistics.median(spec) / statistics.median(plain), 3),
               "identical_tokens": same, **acc, "trace": trace}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "trace"}), flush=True)
    ids = chat_ids(llm, PROMPTS["edit_rename"][1])
    costs = verify_costs(eng, ids, args)
    print(json.dumps({"demo_verify_cost_ratio_by_k": costs["ratio"], "plain_step_s": costs["seconds"][0]}), flush=True)
    out["demo"] = {"quantization": args.quantization or "none (bf16)", "k": args.k, "rows": rows,
                   "context": len(ids), "verify_costs": costs}
    del llm, eng


def verify_costs(eng, ids, args):
    """Seconds per decode step with k forced proposals (k+1 rows verified) vs plain 1-row steps,
    measured in one run per k with the two kinds of step interleaved (a shared machine's load
    drifts; neighbouring steps see the same load): ratio = median(spec steps) / median(plain steps)."""
    ks = sorted({int(x) for x in args.cost_ks.split(",")} | {args.k})
    sec, ratio, plain_all = {}, {}, []
    for k in ks:
        spec = _NoBackoff(SpeculativeConfig.parse({"method": "ngram", "num_speculative_tokens": k}), _Forced(k))
        _, r = step_cost(eng, ids, spec, 2 * args.cost_steps)
        sp = [s[0] for s in r["decode_steps"] if s[2] == k]
        pl = [s[0] for s in r["decode_steps"] if s[2] == 0]
        sec[k], ratio[k] = statistics.median(sp), statistics.median(sp) / statistics.median(pl)
        plain_all += pl
    sec[0], ratio[0] = statistics.median(plain_all), 1.0
    return {"seconds": {k: round(v, 4) for k, v in sorted(sec.items())},
            "ratio": {k: round(v, 3) for k, v in sorted(ratio.items())}}


class _Forced:
    """Every other step, proposes k copies of a token unlikely to be right (costs are measured,
    not acceptance); the steps between are plain."""

    def __init__(self, k):
        self.k, self.calls = k, 0

    def propose(self, seqs, ks):
        self.calls += 1
        return [[3] * k if self.calls % 2 else [] for s, k in zip(seqs, ks)]

    def release(self, seq):
        pass


class _EveryOther:
    """Wraps a proposer: proposals every other step, plain steps between (interleaved timing)."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def propose(self, seqs, ks):
        self.calls += 1
        return self.inner.propose(seqs, ks) if self.calls % 2 else [[] for _ in seqs]

    def release(self, seq):
        self.inner.release(seq)


class _NoBackoff(SpecDecoder):
    """Always k proposals: we are measuring cost, not policy."""

    def best_k(self, p):
        return self.cfg.num_speculative_tokens

    def observe(self, seq, proposed, accepted):
        pass


def step_cost(eng, ids, spec, steps):
    """Median seconds per decode step, alone, with the given speculation (None = plain)."""
    set_spec(eng, spec)
    eng.block_manager.reset_prefix_cache()
    r = timed_run(eng, ids, steps + 1, f"cost{time.monotonic_ns()}")
    set_spec(eng, None)
    return statistics.median(s[0] for s in r["decode_steps"]), r


def part2(args, out):
    llm = LLM("Qwen/Qwen1.5-4B-Chat", random_weights=True, quantization=args.quantization, kv_cache_memory=1.0,
              max_model_len=1024)
    eng = llm.engine
    tok = eng.tokenizer
    if tok is None:
        from qwenrun.loader import demo_gguf_path, read_gguf
        from qwenrun.tokenizer import Tokenizer

        tok = Tokenizer.from_gguf(read_gguf(demo_gguf_path()))
    ids = tok.encode(PROMPTS["edit_rename"][1])[:400]
    res = {"quantization": args.quantization or "none (bf16)", "context": len(ids)}
    vc = verify_costs(eng, ids, args)
    costs = vc["seconds"]
    base = costs[0]
    res["step_seconds_by_k"] = vc["seconds"]
    res["verify_cost_ratio_by_k"] = vc["ratio"]
    print(json.dumps({"4b_verify_cost_ratio_by_k": res["verify_cost_ratio_by_k"], "plain_step_s": base}), flush=True)
    # (b) the demo's measured traces replayed at the 4B step costs
    if "demo" in out:
        pred = {}
        for row in out["demo"]["rows"]:
            n = sum(s[1] for s in row["trace"])
            t_spec = sum(costs.get(s[2], costs[max(costs)]) for s in row["trace"])
            pred[row["prompt"]] = round(n * base / t_spec, 3)
        res["predicted_ngram_speedup_from_demo_traces"] = pred
        print(json.dumps({"4b_predicted_ngram_speedup": pred}), flush=True)
    # (c) ngram end to end on random weights (back-off on)
    cfg = SpeculativeConfig.parse({"method": "ngram", "num_speculative_tokens": args.k})
    e2e = []
    for r in range(args.repeats_4b):
        set_spec(eng, None)
        eng.block_manager.reset_prefix_cache()
        p = timed_run(eng, ids, args.tokens_4b, f"4bp{r}")
        set_spec(eng, make_spec_decoder(cfg, eng))
        eng.block_manager.reset_prefix_cache()
        s = timed_run(eng, ids, args.tokens_4b, f"4bs{r}")
        set_spec(eng, None)
        e2e.append((p["decode_tps"], s["decode_tps"], p["tokens"] == s["tokens"]))
    res["ngram_random_weights"] = {"plain_tps": round(statistics.median(x[0] for x in e2e), 3),
                                   "ngram_tps": round(statistics.median(x[1] for x in e2e), 3),
                                   "speedup": round(statistics.median(x[1] for x in e2e) /
                                                    statistics.median(x[0] for x in e2e), 3),
                                   "identical_tokens": all(x[2] for x in e2e)}
    print(json.dumps({"4b_ngram_random_weights": res["ngram_random_weights"]}), flush=True)
    # (d) the demo model drafting for 4B shapes
    dcfg = SpeculativeConfig.parse({"method": "draft_model", "model": "demo", "num_speculative_tokens": args.k,
                                    "quantization": args.quantization})
    drafter = make_spec_decoder(dcfg, eng)
    _, r = step_cost(eng, ids, _NoBackoff(dcfg, _EveryOther(drafter.proposer)), 2 * args.cost_steps)
    k = args.k
    sp = [s[0] for s in r["decode_steps"] if s[2] == k]
    pl = [s[0] for s in r["decode_steps"] if s[2] == 0]
    t_draft = statistics.median(sp)
    ratio = t_draft / statistics.median(pl)
    res["draft_model"] = {"k": k, "step_seconds": round(t_draft, 4), "plain_step_seconds": round(statistics.median(pl), 4),
                          "step_cost_ratio": round(ratio, 3),
                          "verify_only_cost_ratio": res["verify_cost_ratio_by_k"].get(k),
                          "speedup_by_acceptance": {a: round(((1 - a ** (k + 1)) / (1 - a)) / ratio, 3)
                                                    for a in (0.5, 0.6, 0.7, 0.8, 0.9)},
                          "break_even_tokens_per_step": round(ratio, 3)}
    print(json.dumps({"4b_draft_model": res["draft_model"]}), flush=True)
    out["4b"] = res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quantization", default="int8", choices=["int8", "none"])
    ap.add_argument("--part", default="all", choices=["1", "2", "all", "cost"])
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--edit-tokens", type=int, default=200)
    ap.add_argument("--open-tokens", type=int, default=128)
    ap.add_argument("--cost-steps", type=int, default=8)
    ap.add_argument("--cost-ks", default="1,2,3,5,8", help="proposal lengths whose verification cost is measured")
    ap.add_argument("--tokens-4b", type=int, default=48, help="output tokens of the 4B end-to-end runs")
    ap.add_argument("--repeats-4b", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.quantization == "none":
        args.quantization = None
    torch.set_num_threads(os.cpu_count() or 1)
    out = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
           "loadavg_start": os.getloadavg()}
    try:
        out["cpu_model"] = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if args.part == "cost":  # the demo's verification cost alone
        llm = LLM("demo", quantization=args.quantization, kv_cache_memory=1.0, max_model_len=4096)
        c = verify_costs(llm.engine, chat_ids(llm, PROMPTS["edit_rename"][1]), args)
        print(json.dumps({"demo_verify_cost_ratio_by_k": c["ratio"], "seconds": c["seconds"]}), flush=True)
    if args.part in ("1", "all"):
        part1(args, out)
    if args.part in ("2", "all"):
        part2(args, out)
    out["loadavg_end"] = os.getloadavg()
    print(json.dumps({"cpu_model": out.get("cpu_model"), "loadavg_start": out["loadavg_start"],
                      "loadavg_end": out["loadavg_end"]}), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
