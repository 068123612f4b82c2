"""GGUF files (llama.cpp's format): config, tokenizer and chat template from the metadata, tensors
dequantized through the ``gguf`` package and renamed to Hugging Face names."""
from __future__ import annotations

import dataclasses
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import ModelConfig
from ..errors import ModelLoadError

# llama.cpp tensor names → HF Qwen2 names (per-layer part after "blk.N.").
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLK = re.compile(r"^blk\.(\d+)\.(.+)$")
# Tensor types we read: what official Qwen GGUFs and the demo file use.
SUPPORTED_TYPES = {"F32", "F16", "BF16", "Q8_0", "Q5_0", "Q4_0", "Q4_1", "Q5_1", "Q4_K", "Q5_K", "Q6_K"}


def hf_name(gguf_name: str) -> str:
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    m = _BLK.match(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    raise ModelLoadError(f"unexpected tensor {gguf_name!r} in GGUF file (not a Qwen2 tensor)")


@dataclass
class GGUFModel:
    """Everything one GGUF file provides, read once."""

    path: Path
    config: ModelConfig
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    special_ids: dict[str, int]
    chat_template: str | None
    metadata: dict[str, Any] = field(default_factory=dict)
    tensors: list = field(default_factory=list)
    mm: Any = None  # the file's read-only mmap (tensor data are views of it)

    def iter_tensors(self, dtype: torch.dtype = torch.float32, native: bool = False,
                     stack: bool = True) -> Iterator[tuple[str, Any]]:
        """Yield (hf_name, tensor): dense tensors in ``dtype``, block formats dequantized; with
        ``native``, 2-D block-quantized tensors come as ``quant.gguf_linear.BlockWeight`` (the
        file's values, repacked without loss) instead. Each tensor's file pages are dropped from
        this process once read, so loading never holds the mapped file and its copy at once.

        With ``native`` and ``stack``, a layer's q/k/v weights (and its gate/up weights) of one
        block format are packed together, as one [sum O, K] weight whose rows are the parts' rows
        in fusing order, and yielded as row views of it: the model's fuse_qkv then stacks them
        without a copy (``_QuantLinear.concat``). Rows are independent in every format, so each
        view holds exactly the values ``pack`` gives the part alone."""
        from gguf import quants

        if native:
            from ..quant.gguf_linear import NATIVE_TYPES, pack
            groups = _stack_groups(self.tensors, NATIVE_TYPES) if stack else {}
            scratch = _Scratch()
        done: set[str] = set()
        for t in self.tensors:
            if t.name in done:
                continue
            name = hf_name(t.name)
            qtype = t.type_name
            if qtype not in SUPPORTED_TYPES:
                raise ModelLoadError(f"{self.path}: tensor {t.name} has unsupported type {qtype}")
            if native and t.name in groups:
                members = groups[t.name]
                try:
                    parts = _pack_rows(pack, qtype, members, scratch, self.mm)
                except (ValueError, IndexError, TypeError) as e:
                    raise ModelLoadError(f"{self.path}: cannot read tensors {', '.join(m.name for m in members)} "
                                         f"({qtype}): {e}") from None
                finally:
                    for m in members:
                        self._drop_pages(m)
                for m, part in zip(members, parts):
                    done.add(m.name)
                    yield hf_name(m.name), part
                continue
            try:
                if native and qtype in NATIVE_TYPES and len(t.shape) == 2:
                    tensor = pack(qtype, t.data, t.shape)
                elif qtype == "F32":
                    tensor = torch.from_numpy(t.data.view(np.float32).reshape(t.shape).copy())
                elif qtype == "F16":
                    tensor = torch.from_numpy(t.data.view(np.float16).reshape(t.shape).copy())
                elif qtype == "BF16":
                    tensor = torch.from_numpy(t.data.view(np.int16).reshape(t.shape).copy()).view(torch.bfloat16)
                else:
                    arr = quants.dequantize(t.data.reshape(t.shape[:-1] + [-1]), t.qtype)
                    tensor = torch.from_numpy(arr.reshape(t.shape))
            except (ValueError, IndexError, TypeError) as e:
                raise ModelLoadError(f"{self.path}: cannot read tensor {t.name} ({qtype}): {e}") from None
            finally:
                self._drop_pages(t)
            yield name, tensor if not isinstance(tensor, torch.Tensor) else tensor.to(dtype)

    def _drop_pages(self, t: "GGUFTensorInfo") -> None:
        """MADV_DONTNEED the tensor's mapped pages: they stay in the page cache, not in our RSS."""
        import mmap

        mm = self.mm
        if mm is None or not hasattr(mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = t.offset // mmap.PAGESIZE * mmap.PAGESIZE
        end = t.offset + t.data.nbytes
        try:
            mm.madvise(mmap.MADV_DONTNEED, start, end - start)
        except (OSError, ValueError):
            pass


# -- q/k/v and gate/up packed as one weight ---------------------------------------------------------
# The model fuses these (Qwen2ForCausalLM.fuse_qkv) in this row order.
_STACKS = (("attn_q.weight", "attn_k.weight", "attn_v.weight"), ("ffn_gate.weight", "ffn_up.weight"))


def _stack_groups(tensors: list["GGUFTensorInfo"], native_types) -> dict[str, list["GGUFTensorInfo"]]:
    """GGUF name → the members (in fusing order) of the stack it belongs to, for every stack whose
    members are all present, 2-D, of one native block format and of one row length."""
    by_name = {t.name: t for t in tensors}
    groups: dict[str, list[GGUFTensorInfo]] = {}
    for t in tensors:
        m = _BLK.match(t.name)
        if not m:
            continue
        for stack in _STACKS:
            if m.group(2) != stack[0]:
                continue
            members = [by_name.get(f"blk.{m.group(1)}.{leaf}") for leaf in stack]
            if any(x is None or len(x.shape) != 2 for x in members):
                continue
            if len({x.type_name for x in members}) != 1 or members[0].type_name not in native_types:
                continue
            if len({x.shape[1] for x in members}) != 1:
                continue
            for x in members:
                groups[x.name] = members
    return groups


class _Scratch:
    """One reusable byte buffer for the raw bytes of a stack whose parts are not adjacent in the
    file (its pages are touched once, not once per layer)."""

    def __init__(self) -> None:
        self.buf = np.empty(0, dtype=np.uint8)

    def get(self, n: int) -> np.ndarray:
        if self.buf.nbytes < n:
            self.buf = np.empty(n, dtype=np.uint8)
        return self.buf[:n]


def _pack_rows(pack, qtype: str, members: list["GGUFTensorInfo"], scratch: _Scratch, mm) -> list:
    """Pack the members' raw bytes as one [sum O, K] weight; return one row-view BlockWeight per
    member."""
    K = members[0].shape[1]
    rows = [x.shape[0] for x in members]
    if mm is not None and all(b.offset == a.offset + a.data.nbytes for a, b in zip(members, members[1:])):
        # adjacent in the file: one view of the mapping, no copy
        raw = np.frombuffer(mm, dtype=np.uint8, count=sum(x.data.nbytes for x in members), offset=members[0].offset)
        lo = hi = None
    else:
        raw = scratch.get(sum(x.data.nbytes for x in members))
        pos = 0
        for x in members:
            raw[pos:pos + x.data.nbytes] = x.data
            pos += x.data.nbytes
        lo = raw.ctypes.data
        hi = lo + raw.nbytes
    w = pack(qtype, raw, (sum(rows), K))
    # every tensor field of a BlockWeight is laid out per output row ([O, ...]): slice them all
    fields = {f.name: getattr(w, f.name) for f in dataclasses.fields(w) if isinstance(getattr(w, f.name), torch.Tensor)}
    if lo is not None:  # never leave a view of the scratch buffer (pack copies; make sure)
        for k, v in fields.items():
            if lo <= v.untyped_storage().data_ptr() < hi:
                fields[k] = v.clone()
    parts, r0 = [], 0
    for n in rows:
        parts.append(dataclasses.replace(w, shape=(n, K), **{k: v[r0:r0 + n] for k, v in fields.items()}))
        r0 += n
    return parts


# -- a fast GGUF header parser -------------------------------------------------------------------
# gguf.GGUFReader builds a numpy view per string and takes ~7 s on a Qwen vocabulary (300k strings);
# this reads the same header in a fraction of a second. Dequantization still uses the gguf package.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NP = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
       7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}


@dataclass
class GGUFTensorInfo:
    name: str
    shape: list[int]  # row-major (PyTorch) order: reversed GGUF dims
    qtype: Any  # gguf.GGMLQuantizationType
    data: np.ndarray  # raw bytes (uint8) or elements, memory-mapped
    offset: int = 0  # of the data in the file

    @property
    def type_name(self) -> str:
        return self.qtype.name


class _Cursor:
    def __init__(self, buf) -> None:
        self.buf, self.pos = buf, 0

    def scalar(self, t: int):
        fmt = _SCALARS[t]
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return v

    def string(self) -> str:
        (n,) = struct.unpack_from("<Q", self.buf, self.pos)
        s = bytes(self.buf[self.pos + 8:self.pos + 8 + n]).decode("utf-8", errors="replace")
        self.pos += 8 + n
        return s

    def strings(self, n: int) -> list[str]:
        """``n`` strings in a row (a vocabulary: 150k+), the loop kept to locals."""
        buf, pos, out = self.buf, self.pos, []
        length = struct.Struct("<Q").unpack_from
        append = out.append
        for _ in range(n):
            (m,) = length(buf, pos)
            pos += 8
            append(buf[pos:pos + m].decode("utf-8", errors="replace"))
            pos += m
        if pos > len(buf):
            raise IndexError("string runs past the end of the file")
        self.pos = pos
        return out

    def value(self, t: int):
        if t == 8:
            return self.string()
        if t == 9:
            et, n = struct.unpack_from("<IQ", self.buf, self.pos)
            self.pos += 12
            if et == 8:
                return self.strings(n)
            if et in _NP:
                arr = np.frombuffer(self.buf, dtype=_NP[et], count=n, offset=self.pos)
                self.pos += arr.nbytes
                return arr.tolist()
            return [self.value(et) for _ in range(n)]
        return self.scalar(t)


def _parse(path: Path) -> tuple[dict[str, Any], list[GGUFTensorInfo], Any]:
    import mmap

    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    size = len(buf)
    try:
        c = _Cursor(buf)
        if bytes(buf[:4]) != b"GGUF":
            raise ValueError("bad magic (not a GGUF file)")
        c.pos = 4
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        c.pos = 24
        if version not in (2, 3):
            raise ValueError(f"unsupported GGUF version {version}")
        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key = c.string()
            t = c.scalar(4)
            meta[key] = c.value(t)
        infos = []
        for _ in range(n_tensors):
            name = c.string()
            nd = c.scalar(4)
            dims = list(struct.unpack_from(f"<{nd}Q", buf, c.pos))
            c.pos += 8 * nd
            qt, off = struct.unpack_from("<IQ", buf, c.pos)
            c.pos += 12
            infos.append((name, dims, qt, off))
    except (struct.error, IndexError, UnicodeDecodeError, KeyError, OverflowError, MemoryError) as e:
        raise ValueError(f"truncated or malformed header ({type(e).__name__})") from None
    align = int(meta.get("general.alignment", 32))
    start = (c.pos + align - 1) // align * align
    tensors = []
    for name, dims, qt, off in infos:
        try:
            qtype = GGMLQuantizationType(qt)
        except ValueError:
            raise ValueError(f"tensor {name} has unknown type id {qt}") from None
        block, tsize = GGML_QUANT_SIZES[qtype]
        n = int(np.prod(dims)) if dims else 1
        nbytes = n // block * tsize
        if start + off + nbytes > size:
            raise ValueError(f"tensor {name} runs past the end of the file (truncated download?)")
        shape = [int(d) for d in reversed(dims)]
        raw = np.frombuffer(buf, dtype=np.uint8, count=nbytes, offset=start + off)
        tensors.append(GGUFTensorInfo(name, shape, qtype, raw, start + off))
    return meta, tensors, buf


def read_gguf(path: str | Path) -> GGUFModel:
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"no such GGUF file: {path}")
    try:
        meta, tensors, mm = _parse(path)
    except (ValueError, OSError) as e:
        raise ModelLoadError(f"{path} is not a readable GGUF file (corrupt or truncated?): {e}") from None
    arch = meta.get("general.architecture")
    if arch != "qwen2":
        raise ModelLoadError(f"{path}: GGUF architecture is {arch!r}; qwenrun runs 'qwen2' models")

    def a(key: str, default: Any = None) -> Any:
        return meta.get(f"qwen2.{key}", default)

    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ModelLoadError(f"{path}: GGUF has no tokenizer (tokenizer.ggml.tokens)")
    token_types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = meta.get("tokenizer.ggml.merges") or []
    by_name = {t.name: t for t in tensors}
    if "token_embd.weight" not in by_name:
        raise ModelLoadError(f"{path}: GGUF has no token_embd.weight tensor")
    vocab_size = by_name["token_embd.weight"].shape[0]
    special = {}
    for key in ("bos", "eos", "padding", "eot", "unknown"):
        v = meta.get(f"tokenizer.ggml.{key}_token_id")
        if v is not None:
            special[key] = int(v)
    eos = [special["eos"]] if "eos" in special else []
    # Chat models end turns with <|im_end|>; documents end with <|endoftext|>: stop on both, as
    # generation_config.json does for every Qwen chat model and llama.cpp's end-of-generation set.
    for tok in ("<|im_end|>", "<|endoftext|>"):
        if tok in tokens:
            i = tokens.index(tok)
            if i not in eos:
                eos.append(i)
    try:
        n_head = int(a("attention.head_count"))
        hidden = int(a("embedding_length"))
        config = ModelConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=int(a("feed_forward_length")),
            num_hidden_layers=int(a("block_count")),
            num_attention_heads=n_head,
            num_key_value_heads=int(a("attention.head_count_kv", n_head)),
            head_dim=int(a("attention.key_length", hidden // n_head)),
            max_position_embeddings=int(a("context_length", 32768)),
            rope_theta=float(a("rope.freq_base", 10000.0)),
            rms_norm_eps=float(a("attention.layer_norm_rms_epsilon", 1e-6)),
            tie_word_embeddings="output.weight" not in by_name,
            bos_token_id=special.get("bos"),
            eos_token_id=eos,
            torch_dtype="bfloat16",
        )
    except (TypeError, ValueError) as e:
        raise ModelLoadError(f"{path}: incomplete qwen2 metadata: {e}") from None
    return GGUFModel(
        path=path, config=config, tokens=list(tokens), token_types=[int(t) for t in token_types],
        merges=list(merges), special_ids=special, chat_template=meta.get("tokenizer.chat_template"),
        metadata=meta, tensors=tensors, mm=mm,
    )
