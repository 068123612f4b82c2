"""Byte-level BPE tokenizer (Qwen2Tokenizer semantics) on Hugging Face ``tokenizers``.

Built from ``tokenizer.json``, from ``vocab.json`` + ``merges.txt``, or from GGUF metadata; the
three produce the same pipeline: added tokens matched verbatim first (never split), NFC, the Qwen2
pre-tokenizer regex, byte-level mapping, BPE. Decoding goes through a per-id byte table so that
full decodes and streaming decodes are the same bytes run through the same UTF-8 decoder."""
from __future__ import annotations

import codecs
import json
from functools import lru_cache
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer as HFTokenizer, decoders, models, normalizers
from tokenizers import pre_tokenizers, processors

from .errors import ModelLoadError

# transformers' Qwen2Tokenizer PRETOKENIZE_REGEX.
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# GGUF token types (llama.cpp's llama_token_type).
GGUF_NORMAL, GGUF_CONTROL, GGUF_USER_DEFINED, GGUF_UNUSED = 1, 3, 4, 5


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: printable bytes map to themselves, others to U+0100+n."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _qwen2_pipeline(model: models.Model) -> HFTokenizer:
    tk = HFTokenizer(model)
    tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    return tk


_GIL_FREE_CHARS = 16384  # texts longer than this are encoded with the GIL released


class Tokenizer:
    """``encode(text) -> list[int]`` and ``decode(ids) -> str`` with Qwen2Tokenizer behaviour."""

    def __init__(self, tk: HFTokenizer, *, eos_token: str | None = None, bos_token: str | None = None,
                 pad_token: str | None = None, chat_template: str | None = None) -> None:
        self._tk = tk
        self.chat_template = chat_template
        vocab = tk.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1 if vocab else 0
        added = tk.get_added_tokens_decoder()  # {id: AddedToken}
        self.special_ids = {i for i, t in added.items() if t.special}
        u2b = _unicode_to_byte()
        table: list[bytes] = [b""] * self.vocab_size
        for tok, i in vocab.items():
            if i in added:
                table[i] = added[i].content.encode("utf-8")
            else:
                try:
                    table[i] = bytes(u2b[c] for c in tok)
                except KeyError:  # not a byte-level token (should not happen for Qwen2)
                    table[i] = tok.encode("utf-8")
        self._bytes = table
        self.eos_token = eos_token
        self.bos_token = bos_token
        self.pad_token = pad_token

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        """From a HF model directory: tokenizer.json, else vocab.json + merges.txt."""
        path = Path(path)
        cfg = _read_json(path / "tokenizer_config.json") or {}
        if (path / "tokenizer.json").is_file():
            try:
                tk = HFTokenizer.from_file(str(path / "tokenizer.json"))
            except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exception
                raise ModelLoadError(f"{path / 'tokenizer.json'} is not a valid tokenizer: {e}") from None
        elif (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            vocab = _read_json(path / "vocab.json")
            merges = [ln for ln in (path / "merges.txt").read_text(encoding="utf-8").splitlines()
                      if ln and not ln.startswith("#version")]
            tk = _qwen2_pipeline(_bpe(vocab, merges))
        else:
            raise ModelLoadError(f"{path}: no tokenizer.json or vocab.json + merges.txt")
        # Added tokens from tokenizer_config (vocab.json route, or ones tokenizer.json lacks).
        extra = []
        for i, t in sorted((cfg.get("added_tokens_decoder") or {}).items(), key=lambda kv: int(kv[0])):
            if tk.token_to_id(t["content"]) is None:
                extra.append(AddedToken(t["content"], special=t.get("special", True), normalized=False,
                                        lstrip=t.get("lstrip", False), rstrip=t.get("rstrip", False)))
        if extra:
            tk.add_tokens(extra)
        template = cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
        if (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        return cls(tk, eos_token=_token_str(cfg.get("eos_token")), bos_token=_token_str(cfg.get("bos_token")),
                   pad_token=_token_str(cfg.get("pad_token")), chat_template=template)

    @classmethod
    def from_gguf(cls, g) -> "Tokenizer":
        """From GGUF metadata (``tokenizer.ggml.*``) as read by loader.gguf.read_gguf."""
        vocab, added = {}, []
        for i, (tok, ty) in enumerate(zip(g.tokens, g.token_types)):
            if ty == GGUF_NORMAL:
                vocab[tok] = i
            elif ty in (GGUF_CONTROL, GGUF_USER_DEFINED):
                added.append((i, AddedToken(tok, special=ty == GGUF_CONTROL, normalized=False)))
            # GGUF_UNUSED: padding rows ([PAD151665] …) are not tokens.
        if not g.merges:
            raise ModelLoadError(f"{g.path}: GGUF tokenizer has no merges (not a byte-level BPE vocabulary)")
        tk = _qwen2_pipeline(_bpe(vocab, g.merges))
        for i, tok in added:  # ids must come out exactly as in the file
            if tk.get_vocab_size(with_added_tokens=True) != i:
                raise ModelLoadError(f"{g.path}: added token {tok.content!r} is not contiguous at id {i}")
            tk.add_tokens([tok])

        def name(key: str) -> str | None:
            i = g.special_ids.get(key)
            return g.tokens[i] if i is not None and i < len(g.tokens) else None

        return cls(tk, eos_token=name("eos"), bos_token=name("bos"), pad_token=name("padding"),
                   chat_template=g.chat_template)

    # -- use ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special-token strings map to their ids; no BOS/EOS is added."""
        if not isinstance(text, str):
            raise ValueError(f"encode() takes a str, got {type(text).__name__}")
        if len(text) > _GIL_FREE_CHARS:
            # tokenizers' encode() holds the GIL for the whole text (seconds for megabytes, which
            # would stall a server's event loop even from a worker thread); encode_batch releases
            # it while it works. Same ids.
            return self._tk.encode_batch([text], add_special_tokens=False)[0].ids
        return self._tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tk.encode_batch(texts, add_special_tokens=False)]

    def token_bytes(self, token_id: int) -> bytes:
        return self._bytes[token_id] if 0 <= token_id < self.vocab_size else b""

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; invalid UTF-8 becomes U+FFFD as in Qwen2Tokenizer (errors="replace")."""
        skip = self.special_ids if skip_special_tokens else ()
        return b"".join(self.token_bytes(i) for i in ids if i not in skip).decode("utf-8", errors="replace")

    def id_to_token(self, token_id: int) -> str | None:
        return self._tk.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self._tk.token_to_id(token)

    def added_tokens(self) -> dict[int, str]:
        """id → content of the tokens matched verbatim before BPE (<|im_end|> and the like)."""
        return {i: t.content for i, t in self._tk.get_added_tokens_decoder().items()}

    def llguidance_tokenizer(self, n_vocab: int, eos_token_ids: list[int]):
        """This tokenizer for llguidance (structured output), from our own tokenizer.json text:
        nothing is downloaded. ``n_vocab``: the model's logits width (padding ids never allowed)."""
        import llguidance

        return llguidance.LLTokenizer(self._tk.to_str(), n_vocab=max(n_vocab, len(self)),
                                      eos_token=list(eos_token_ids) or None)

    def detokenizer(self, skip_special_tokens: bool = True) -> "IncrementalDetokenizer":
        return IncrementalDetokenizer(self, skip_special_tokens)


class IncrementalDetokenizer:
    """Streams text token by token without ever emitting half of a UTF-8 character: bytes of an
    incomplete character are held until the token that completes it arrives. ``"".join`` of every
    ``add()`` plus ``flush()`` equals ``Tokenizer.decode`` of all ids."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tok = tokenizer
        self._skip = tokenizer.special_ids if skip_special_tokens else ()
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_ids) -> str:
        data = b"".join(self._tok.token_bytes(i) for i in token_ids if i not in self._skip)
        return self._dec.decode(data) if data else ""

    def flush(self) -> str:
        return self._dec.decode(b"", final=True)


def _bpe(vocab: dict[str, int], merges: list) -> models.BPE:
    pairs = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]
    return models.BPE(vocab=vocab, merges=pairs, unk_token=None, fuse_unk=False, byte_fallback=False)


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path} is not valid JSON: {e}") from None


def _token_str(t) -> str | None:
    if isinstance(t, dict):
        return t.get("content")
    return t
