"""The real demo model at long context and with an int8 KV cache."""
from __future__ import annotations

import random

import pytest

from qwenrun import LLM, SamplingParams

TEST_PROMPTS = ["What is the capital of France?", "Write a python function that returns the square of x.",
                "Name three primary colors."]


@pytest.fixture(scope="module")
def demo_int8kv():
    return LLM("demo", kv_cache_memory=1.0, kv_cache_dtype="int8", max_model_len=16384, quantization="none")


@pytest.mark.slow
def test_int8_kv_keeps_demo_greedy_answers(demo_llm, demo_int8kv):
    """Same greedy answers, or a divergence that starts where the dense model itself was at a
    near-tie (< 0.1 nats between its top two tokens): int8 KV moves logprobs by ~1% of |q||k|."""
    sp = SamplingParams(temperature=0, max_tokens=48, logprobs=2)
    same = 0
    for q in TEST_PROMPTS:
        msgs = [{"role": "user", "content": q}]
        a = demo_llm.chat(msgs, sp)[0].outputs[0]
        b = demo_int8kv.chat(msgs, sp)[0].outputs[0]
        if a.token_ids == b.token_ids:
            same += 1
            continue
        i = next(k for k, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y)
        top = sorted(a.logprobs[i].values(), reverse=True)
        assert top[0] - top[1] < 0.1, (q, i, top)
    assert same >= 2


def haystack(n_sentences: int, needle: str, depth: float, seed: int = 0) -> str:
    rng = random.Random(seed)
    subjects = ["The river", "A merchant", "The old library", "Every winter", "The committee", "A small boat",
                "The mountain road", "Our neighbour", "The orchestra", "A quiet village"]
    verbs = ["remembered", "described", "carried", "ignored", "painted", "measured", "followed", "repaired"]
    objects = ["the northern gate", "a bundle of letters", "the harvest", "seven lanterns", "the tide tables",
               "a forgotten song", "the stone bridge", "the morning market"]
    sents = [f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}." for _ in range(n_sentences)]
    sents.insert(int(depth * n_sentences), needle)
    return " ".join(sents)


@pytest.mark.slow
def test_needle_in_an_8k_haystack(demo_int8kv):
    needle = "The secret passphrase for the vault is PURPLE-OTTER-42."
    text = haystack(1100, needle, depth=0.35)
    msgs = [{"role": "user", "content": text + "\n\nWhat is the secret passphrase for the vault? "
                                              "Answer with the passphrase only."}]
    n = len(demo_int8kv.get_tokenizer().encode(demo_int8kv.apply_chat_template(msgs)))
    assert 7500 <= n <= 9500, n
    out = demo_int8kv.chat(msgs, SamplingParams(temperature=0, max_tokens=24))[0].outputs[0].text
    assert "PURPLE-OTTER-42" in out, out
