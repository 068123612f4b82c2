"""lm-eval against ``qwenrun serve``: ``local-completions`` with ``tokenizer_backend=remote`` (the
tokenizer comes from /tokenizer_info, /tokenize and /detokenize; nothing from the Hugging Face hub)
runs a multiple-choice task written here, and its per-choice loglikelihoods must equal the ones
qwenrun's Python API computes for the same (context, continuation) pairs."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import pytest

from test_server import serving

from qwenrun import SamplingParams

pytestmark = pytest.mark.slow

CAPITALS = [
    {"country": "France", "choices": ["Paris", "Berlin", "Madrid"], "answer": 0},
    {"country": "Japan", "choices": ["Seoul", "Tokyo", "Beijing"], "answer": 1},
    {"country": "Italy", "choices": ["Milan", "Naples", "Rome"], "answer": 2},
]
TASK = """\
task: qwenrun_capitals
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: What is the capital of {{{{country}}}}?\\nAnswer:"
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
"""
# Runs in a child process: lm-eval's imports (datasets, pandas …) and the offline switches stay
# out of the test process.
DRIVER = """\
import json, sys
import lm_eval
from lm_eval.tasks import TaskManager

url, tasks_dir, out = sys.argv[1:4]
r = lm_eval.simple_evaluate(
    model="local-completions",
    model_args={"base_url": url + "/v1/completions", "model": "demo", "tokenizer_backend": "remote",
                "max_retries": 1},
    tasks=["qwenrun_capitals"], task_manager=TaskManager(include_path=tasks_dir), log_samples=True,
    bootstrap_iters=0)
samples = [{"arguments": s["arguments"], "resps": s["resps"]} for s in r["samples"]["qwenrun_capitals"]]
json.dump({"acc": r["results"]["qwenrun_capitals"]["acc,none"], "samples": samples}, open(out, "w"))
"""


@pytest.fixture(scope="module")
def demo_fp32(tmp_path_factory):
    """Dense float32, as the Python API's demo_llm: the same numbers on both sides."""
    with serving(["demo", "--quantization", "none", "--max-model-len", "2048", "--kv-cache-memory", "0.5"],
                 tmp_path_factory.mktemp("log") / "demo_lm_eval.log", 300) as srv:
        yield srv


def test_tokenizer_info_matches_the_served_tokenizer(demo_fp32, demo_llm):
    info = httpx.get(demo_fp32.url + "/tokenizer_info").json()
    tok = demo_llm.get_tokenizer()
    assert info["eos_token"] == "<|im_end|>" == tok.eos_token
    assert info["bos_token"] == tok.bos_token and info["pad_token"] == tok.pad_token
    assert info["chat_template"] == tok.chat_template and "<|im_start|>" in info["chat_template"]
    assert info["model_max_length"] == 2048  # what this server accepts (--max-model-len)
    assert info["tokenizer_class"] == "Qwen2TokenizerFast" and info["add_bos_token"] is False
    assert info["added_tokens_decoder"]["151645"] == "<|im_end|>"
    assert info["added_tokens_decoder"]["151643"] == "<|endoftext|>"
    # lm-eval's remote tokenizer finds the eos id by tokenizing the eos string: one special id.
    ids = httpx.post(demo_fp32.url + "/tokenize", json={"prompt": info["eos_token"], "add_special_tokens": False})
    assert ids.json()["tokens"] == [151645]


def test_lm_eval_loglikelihoods_equal_the_python_api(demo_fp32, demo_llm, tmp_path):
    data = tmp_path / "capitals.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in CAPITALS))
    (tmp_path / "capitals.yaml").write_text(TASK.format(data=data))
    (tmp_path / "driver.py").write_text(DRIVER)
    out = tmp_path / "out.json"
    # Offline and with an empty HF home: a hub download of a tokenizer would fail, not pass quietly.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run([sys.executable, str(tmp_path / "driver.py"), demo_fp32.url, str(tmp_path), str(out)],
                       capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-4000:]
    got = json.loads(out.read_text())
    log = demo_fp32.log_path.read_text()
    assert '"GET /tokenizer_info HTTP/1.1" 200' in log and '"POST /tokenize HTTP/1.1" 200' in log
    assert '"POST /v1/completions HTTP/1.1" 200' in log

    tok = demo_llm.get_tokenizer()
    pairs, lm_eval_lls = [], []
    for sample in got["samples"]:
        for (context, continuation), [[ll, greedy]] in zip(sample["arguments"], sample["resps"]):
            pairs.append((context, continuation))
            lm_eval_lls.append((ll, greedy))
    assert len(pairs) == sum(len(d["choices"]) for d in CAPITALS)
    # The Python API on the same tokens: context ids, then the continuation as the whole text's tail.
    prompts, ctx_lens = [], []
    for context, continuation in pairs:
        ctx, whole = tok.encode(context), tok.encode(context + continuation)
        assert whole[:len(ctx)] == ctx and len(whole) > len(ctx)
        prompts.append(whole)
        ctx_lens.append(len(ctx))
    outs = demo_llm.generate(prompt_token_ids=prompts,
                             sampling_params=SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1))
    diffs = {}
    for (context, continuation), ids, n_ctx, out, (ll, greedy) in zip(pairs, prompts, ctx_lens, outs, lm_eval_lls):
        steps = out.prompt_logprobs[n_ctx:]  # position i: {actual token: logprob, top-1: logprob}
        want = sum(step[t] for step, t in zip(steps, ids[n_ctx:]))
        want_greedy = all(step[t] >= max(step.values()) for step, t in zip(steps, ids[n_ctx:]))
        diffs[continuation] = (ll, want, abs(ll - want))
        assert greedy == want_greedy, (context, continuation)
    # Same weights, same float32 kernels; only the batching differs (lm-eval sends one pair per
    # request, the Python API all at once). Measured here: equal to the last bit; 1e-4 leaves room
    # for a CPU whose GEMM blocking depends on the batch shape.
    assert max(d for _, _, d in diffs.values()) <= 1e-4, diffs
    assert got["acc"] == 1.0  # and the demo model knows its capitals
