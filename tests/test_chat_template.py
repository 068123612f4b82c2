"""Chat templates render exactly as transformers' apply_chat_template renders them."""
from __future__ import annotations

import pytest

from qwenrun.chat_template import CHATML_FALLBACK, render_chat, validate_messages
from qwenrun.loader.gguf import read_gguf
from tiny import QWEN15_TEMPLATE, build_tokenizer

CONVERSATIONS = {
    "single-user": [{"role": "user", "content": "What is the capital of France?"}],
    "with-system": [{"role": "system", "content": "You are a pirate."},
                    {"role": "user", "content": "Hi"}],
    "multi-turn": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
                   {"role": "user", "content": "Tell me a joke about 猫."}],
    "system-multi-turn": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"},
                          {"role": "assistant", "content": "2"}, {"role": "user", "content": "2+2?"}],
    "ends-with-assistant": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"}],
}


@pytest.fixture(scope="module")
def hf_tok():
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=build_tokenizer(), eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")


@pytest.fixture(scope="module")
def demo_template(demo_path):
    return read_gguf(demo_path).chat_template


def _hf_render(hf_tok, template, msgs, add_generation_prompt):
    return hf_tok.apply_chat_template(msgs, chat_template=template, tokenize=False,
                                      add_generation_prompt=add_generation_prompt)


@pytest.mark.parametrize("conv", sorted(CONVERSATIONS))
@pytest.mark.parametrize("agp", [True, False])
def test_qwen15_template_matches_transformers(hf_tok, conv, agp):
    msgs = CONVERSATIONS[conv]
    ours = render_chat(QWEN15_TEMPLATE, msgs, add_generation_prompt=agp)
    assert ours == _hf_render(hf_tok, QWEN15_TEMPLATE, msgs, agp)


@pytest.mark.parametrize("conv", sorted(CONVERSATIONS))
@pytest.mark.parametrize("agp", [True, False])
def test_demo_template_matches_transformers(hf_tok, demo_template, conv, agp):
    msgs = CONVERSATIONS[conv]
    assert render_chat(demo_template, msgs, add_generation_prompt=agp) == _hf_render(hf_tok, demo_template, msgs, agp)


def test_qwen15_default_system_prompt():
    out = render_chat(QWEN15_TEMPLATE, [{"role": "user", "content": "Hi"}])
    assert out == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                   "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_fallback_is_the_qwen15_template():
    msgs = CONVERSATIONS["multi-turn"]
    assert render_chat(None, msgs) == render_chat(QWEN15_TEMPLATE, msgs) == render_chat(CHATML_FALLBACK, msgs)


def test_text_parts_are_joined():
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]}]
    assert validate_messages(parts)[0]["content"] == "Hello there"
    assert render_chat(None, parts) == render_chat(None, [{"role": "user", "content": "Hello there"}])


@pytest.mark.parametrize("bad", [[], None, "hi", [{"content": "x"}], [{"role": "wizard", "content": "x"}],
                                 [{"role": "user"}], [{"role": "user", "content": 5}],
                                 [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]])
def test_bad_messages_raise_value_error(bad):
    with pytest.raises(ValueError):
        render_chat(None, bad)


def test_template_is_sandboxed():
    evil = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(Exception) as e:
        render_chat(evil, [{"role": "user", "content": "x"}])
    assert "unsafe" in str(e.value).lower() or "security" in type(e.value).__name__.lower()


def test_raise_exception_in_template_is_a_value_error():
    tpl = "{{ raise_exception('only user roles') }}"
    with pytest.raises(ValueError, match="only user roles"):
        render_chat(tpl, [{"role": "user", "content": "x"}])


def test_continue_final_message():
    msgs = CONVERSATIONS["ends-with-assistant"]
    out = render_chat(QWEN15_TEMPLATE, msgs, add_generation_prompt=False, continue_final_message=True)
    assert out.endswith("<|im_start|>assistant\nHey")
