"""``GET /tokenizer_info``: the served tokenizer's configuration, in vLLM's shape.

vLLM answers with the Hugging Face tokenizer's ``init_kwargs`` (tokenizer_config.json less the
file paths, each AddedToken flattened to its content), plus ``tokenizer_class`` and the chat
template. Evaluation tools read it to tokenize on the server instead of downloading a tokenizer:
lm-eval's ``local-completions`` with ``tokenizer_backend=remote`` takes eos/bos/pad from here and
then calls /tokenize and /detokenize. qwenrun builds its tokenizer from tokenizer.json or GGUF
metadata, so the fields a Qwen2 tokenizer_config.json carries are filled in from that."""
from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response

from ..tokenizer import Tokenizer
from .protocol import APIError


def tokenizer_info(tok: Tokenizer, max_model_len: int) -> dict[str, Any]:
    """The fields of a Qwen2 tokenizer_config.json, with qwenrun's actual values.

    ``model_max_length`` is the context this server accepts (--max-model-len or the model's),
    not the checkpoint's nominal one: a client that trusts it never sends a prompt we refuse."""
    return {
        "add_bos_token": False,  # Qwen2Tokenizer adds no BOS; /tokenize never adds special tokens
        "add_prefix_space": False,
        "added_tokens_decoder": {str(i): content for i, content in sorted(tok.added_tokens().items())},
        "bos_token": tok.bos_token,
        "chat_template": tok.chat_template,
        "clean_up_tokenization_spaces": False,
        "eos_token": tok.eos_token,
        "errors": "replace",  # invalid UTF-8 decodes to U+FFFD, as Qwen2Tokenizer does
        "model_max_length": max_model_len,
        "pad_token": tok.pad_token,
        "split_special_tokens": False,  # special-token strings in text map to their ids
        "unk_token": None,
        # What `AutoTokenizer.from_pretrained` gives for these checkpoints, whose behaviour ours matches.
        "tokenizer_class": "Qwen2TokenizerFast",
    }


def add_tokenizer_info_route(app: FastAPI, state: Any) -> None:
    """Adds the route; ``state`` is the server's ServerState (503 until the model has loaded).

    The API key guards it like /tokenize (the Guard's prefix "/tokenize" covers it)."""

    @app.get("/tokenizer_info")
    async def get_tokenizer_info() -> Response:
        serving = state.ready()
        if serving.tok is None:
            raise APIError(404, "this model has no tokenizer (token-id prompts only)", code="no_tokenizer")
        return JSONResponse(tokenizer_info(serving.tok, serving.engine.max_model_len))
