import sys, json
sys.path.insert(0, "benchmarks")
from bench_spec import PROMPTS, chat_ids, set_spec
from qwenrun import LLM, SamplingParams
from qwenrun.engine.spec_config import SpeculativeConfig
from qwenrun.engine.spec_decode import make_spec_decoder
llm = LLM("demo", quantization="int8", kv_cache_memory=1.0, max_model_len=4096)
eng = llm.engine
print("dtype", eng.loaded.dtype, flush=True)
ids = chat_ids(llm, PROMPTS["open_story"][1])
other = chat_ids(llm, PROMPTS["open_explain"][1])
sp = SamplingParams(temperature=0, max_tokens=64, repetition_penalty=1.0, logprobs=2)
def run(batch, spec):
    set_spec(eng, make_spec_decoder(SpeculativeConfig.parse({"method": "ngram", "num_speculative_tokens": 5}), eng) if spec else None)
    eng.block_manager.reset_prefix_cache()
    outs = llm.generate(prompt_token_ids=[ids] + ([other] if batch else []), sampling_params=sp)
    return outs[0].outputs[0]
a = run(False, False); b = run(True, False); c = run(False, True)
def first_diff(x, y):
    for i, (s, t) in enumerate(zip(x.token_ids, y.token_ids)):
        if s != t:
            lp = sorted(x.logprobs[i].values(), reverse=True)
            return i, round(lp[0] - lp[1], 5), max(abs(x.logprobs[j][k] - y.logprobs[j].get(k, 0)) for j in range(i) for k in x.logprobs[j])
    return None
print("plain alone vs plain batched:", first_diff(a, b))
print("plain alone vs spec:", first_diff(a, c))
