"""Structured-output overhead: decode tokens/s at batch 1 and 16, with and without a JSON-schema
constraint, on the demo model (int8 by default); grammar compile time; mask time per token.

    .venv/bin/python benchmarks/bench_structured.py [--quantization int8] [--steps 24]

Decode throughput is timed over a window of decode-only steps (every sequence already past its
prefill), so both runs time the same work: one forward pass of B rows plus, with the constraint,
B grammar masks. The schema forces a long answer (an array of at least 64 objects), so no
sequence ends inside the window. Plain and constrained runs alternate (a shared machine's load
hits both), and the time spent in the grammar masks is also measured directly, per step: on a
loaded CPU that is the number to trust (the step times around it swing with the neighbours)."""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import qwenrun.engine.sampler as sampler_mod
from qwenrun import LLM, SamplingParams
from qwenrun.engine.structured import GrammarCompiler
from qwenrun.sampling_params import StructuredOutputsParams

LONG_SCHEMA = {"type": "object", "properties": {"people": {"type": "array", "minItems": 64, "items": {
    "type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0,
                                                                          "maximum": 120},
                                     "city": {"type": "string"}},
    "required": ["name", "age", "city"], "additionalProperties": False}}},
    "required": ["people"], "additionalProperties": False}
# what a client typically sends (the openai SDK's parse with a small pydantic model)
TYPICAL_SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "country": {"type": "string"},
    "population_millions": {"type": "number", "minimum": 0, "maximum": 100},
    "landmarks": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
    "kind": {"enum": ["city", "town", "village"]},
    "address": {"type": "object", "properties": {"street": {"type": "string"}, "zip": {"type": "string"}},
                "required": ["street"], "additionalProperties": False}},
    "required": ["name", "country", "population_millions", "landmarks", "kind"], "additionalProperties": False}
PROMPT = [{"role": "user", "content": "List many people with their name, age and city as JSON."}]


MASK_S: list[float] = []
_apply = sampler_mod.apply_masks


def _timed_apply(*a) -> None:
    t0 = time.perf_counter()
    _apply(*a)
    MASK_S.append(time.perf_counter() - t0)


sampler_mod.apply_masks = _timed_apply


def decode_rate(llm: LLM, batch: int, constrained: bool, steps: int) -> tuple[float, float, float]:
    """(tokens/s over `steps` decode-only steps, mean ms per step, mean mask ms per step)."""
    eng = llm.engine
    so = StructuredOutputsParams(json=LONG_SCHEMA) if constrained else None
    p = SamplingParams(temperature=0, max_tokens=steps + 64, ignore_eos=not constrained, structured_outputs=so)
    prompt = llm.apply_chat_template(PROMPT)
    for i in range(batch):
        eng.add_request(f"b{batch}-{constrained}-{i}", f"{prompt}{' ' * (i % 3)}", p)  # distinct prompts
    while any(s.num_output_tokens == 0 for r in eng.requests.values() for s in r.seqs):
        eng.step()  # prefill
    for _ in range(2):
        eng.step()  # warm-up decode steps
    before = eng.stats["generation_tokens"]
    MASK_S.clear()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        eng.step()
        times.append(time.perf_counter() - t0)
    toks = eng.stats["generation_tokens"] - before
    for rid in list(eng.requests):
        eng.abort_request(rid)
    mask_ms = 1e3 * sum(MASK_S) / steps
    return toks / sum(times), 1e3 * statistics.mean(times), mask_ms


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quantization", default="int8")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(2)
    llm = LLM("demo", quantization=args.quantization or None, kv_cache_memory=1.0, max_model_len=2048)
    tok = llm.engine.tokenizer

    # compile: the tokenizer once per engine, then each distinct schema once (cached)
    comp = GrammarCompiler(tok, llm.engine.model_config.vocab_size, llm.engine._eos)
    t0 = time.perf_counter()
    comp.lltokenizer
    t_tok = time.perf_counter() - t0
    t0 = time.perf_counter()
    comp.compile(StructuredOutputsParams(json=TYPICAL_SCHEMA))
    t_compile = time.perf_counter() - t0
    t0 = time.perf_counter()
    comp.compile(StructuredOutputsParams(json=json.dumps(TYPICAL_SCHEMA)))
    t_cached = time.perf_counter() - t0

    # mask time per token along a real answer
    answer = json.dumps({"name": "Paris", "country": "France", "population_millions": 2.1,
                         "landmarks": ["Eiffel Tower", "Louvre"], "kind": "city",
                         "address": {"street": "Rue de Rivoli", "zip": "75001"}})
    st = comp.new_state(StructuredOutputsParams(json=TYPICAL_SCHEMA))
    V = llm.engine.model_config.vocab_size
    row = torch.empty((V + 31) // 32, dtype=torch.int32)
    mask_ms = []
    for t in tok.encode(answer):
        t0 = time.perf_counter()
        st.fill_mask(row)
        mask_ms.append(1e3 * (time.perf_counter() - t0))
        st.accept(t)
    print(f"llguidance tokenizer build: {t_tok * 1e3:.0f} ms (once per engine); typical schema compile: "
          f"{t_compile * 1e3:.1f} ms, cached: {t_cached * 1e3:.3f} ms; mask per token: mean "
          f"{statistics.mean(mask_ms):.3f} ms, median {statistics.median(mask_ms):.3f} ms, max {max(mask_ms):.2f} ms "
          f"over {len(mask_ms)} tokens (vocab {V})")

    for batch in (1, 16):
        runs: dict[bool, list] = {False: [], True: []}
        for _ in range(args.repeats):  # alternate, so load swings hit both
            for constrained in (False, True):
                runs[constrained].append(decode_rate(llm, batch, constrained, args.steps))
        (r0, ms0, _), (r1, ms1, mask) = max(runs[False]), max(runs[True])  # best of the repeats
        print(f"batch {batch:2d}: plain {r0:6.1f} tok/s ({ms0:.1f} ms/step), json-schema {r1:6.1f} tok/s "
              f"({ms1:.1f} ms/step), overhead {100 * (1 - r1 / r0):+.1f}%; grammar masks {mask:.2f} ms/step "
              f"= {100 * mask / ms0:.1f}% of a plain step")


if __name__ == "__main__":
    main()
