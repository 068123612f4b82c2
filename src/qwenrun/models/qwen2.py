"""Qwen2 (Qwen1.5 / Qwen2 / Qwen2.5 dense) in plain PyTorch.

Module attribute names equal checkpoint keys (``model.layers.3.self_attn.q_proj.weight``), so
weights load by name. The model holds no KV state: each forward gets a flat batch of tokens, their
absolute positions, and attention metadata pointing into an external paged KV cache. Reference
semantics: transformers' modeling_qwen2.py (see ../../shared/qwen15-spec.md §2)."""
from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..errors import ModelLoadError
from ..layers import fused
from ..layers.attention import AttentionMetadata, decode_slot_args, fused_attention, fused_cache, paged_attention
from ..layers.norm import RMSNorm
from ..layers.rotary import apply_rotary, rope_table


@contextmanager
def _no_weight_init():
    """Skip nn.Linear/nn.Embedding random init: weights come from the checkpoint. On the meta
    device the init is pure overhead (2.3 s for the 4B config, 0.07 s without)."""
    saved = nn.Linear.reset_parameters, nn.Embedding.reset_parameters
    nn.Linear.reset_parameters = nn.Embedding.reset_parameters = lambda self: None
    try:
        yield
    finally:
        nn.Linear.reset_parameters, nn.Embedding.reset_parameters = saved


def build_on_meta(cfg: ModelConfig) -> "Qwen2ForCausalLM":
    """The model skeleton with parameters on the meta device (no memory); see load_weights."""
    with _no_weight_init(), torch.device("meta"):
        return Qwen2ForCausalLM(cfg)


class Qwen2Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=False)
        self.qkv_proj: nn.Module | None = None  # q/k/v fused after loading (fuse_qkv), when worth it
        self.window = cfg.sliding_window_for(layer_idx)
        self.scale = self.head_dim ** -0.5

    def fuse_qkv(self, concat: Callable[[list[nn.Module]], nn.Module]) -> None:
        """One projection instead of three: one kernel call, one output buffer per step (kept
        separate when ``concat`` refuses: e.g. GGUF q/k/v stored in different block formats)."""
        try:
            fused = concat([self.q_proj, self.k_proj, self.v_proj])
        except ValueError:
            return
        self.qkv_proj = fused
        del self.q_proj, self.k_proj, self.v_proj

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata,
                cache) -> torch.Tensor:
        n, h, hk, d = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        if self.qkv_proj is not None:
            qkv = self.qkv_proj(x)  # [N, (H + 2 Hkv) d]
            qk = qkv[:, :(h + hk) * d].view(n, h + hk, d)
            v = qkv[:, (h + hk) * d:].view(n, hk, d)  # [N, Hkv, d]
        else:
            qk = torch.cat((self.q_proj(x), self.k_proj(x)), dim=-1).view(n, h + hk, d)
            v = self.v_proj(x).view(n, hk, d)
        qk = apply_rotary(qk, cos, sin)  # q and k rotated together; the cache stores post-RoPE keys
        q, k = qk[:, :h], qk[:, h:]  # [N, H, d], [N, Hkv, d]
        o = paged_attention(q, k, v, meta, cache, self.layer_idx, self.window, self.scale)  # [N, H, d]
        return self.o_proj(o.reshape(n, h * d))


class Qwen2MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.gate_up_proj: nn.Module | None = None  # gate and up stacked after loading (fuse_gate_up)

    def fuse_gate_up(self, concat: Callable[[list[nn.Module]], nn.Module]) -> None:
        """One projection for gate and up (rows [0, F) gate, [F, 2F) up); kept separate when the
        two are of kinds that cannot be stacked."""
        try:
            self.gate_up_proj = concat([self.gate_proj, self.up_proj])
        except ValueError:
            return
        del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gu = self.gate_up_proj(x)
            f = gu.shape[-1] // 2
            return self.down_proj(F.silu(gu[..., :f]) * gu[..., f:])
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen2DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Qwen2Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = Qwen2MLP(cfg)

    def forward(self, h: torch.Tensor, cos, sin, meta: AttentionMetadata, cache) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, meta, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class Qwen2Model(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Qwen2DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Qwen2ForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = Qwen2Model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rope: torch.Tensor | None = None  # [max_pos, 2, d] fp32, built by init_rope()

    def init_rope(self, device: torch.device | str, max_positions: int | None = None) -> None:
        cfg = self.config
        self.rope = rope_table(cfg.head_dim, cfg.rope_theta, max_positions or cfg.max_position_embeddings, device)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.norm.weight.dtype

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                cache) -> torch.Tensor:
        """input_ids, positions: [N] → final hidden states [N, D] (normed)."""
        h = self.model.embed_tokens(input_ids)  # [N, D]
        ops = fused.usable(h)
        if ops is not None and self.model.norm.weight.dtype == h.dtype and self.rope.device.type == "cpu":
            return self._forward_fused(ops, h, positions, meta, cache)
        cs = self.rope.index_select(0, positions).to(h.dtype)  # [N, 2, d]
        cos, sin = cs[:, 0:1], cs[:, 1:2]  # [N, 1, d], broadcast over heads
        for layer in self.model.layers:
            h = layer(h, cos, sin, meta, cache)
        return self.model.norm(h)

    def _forward_fused(self, ops, h: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                       cache) -> torch.Tensor:
        """``forward`` with the fused CPU ops (layers/fused.py): per layer four op calls between
        the linears (norm, attention, residual + norm, SiLU·mul); the residual stream ``h`` is
        updated in place. Same arithmetic as the plain path up to reassociation in reductions.

        Per-layer Python is kept to dict lookups: submodules are read from ``_modules`` (always
        current, no nn.Module.__getattr__ walk), linears are called through ``.forward`` (no
        hook dispatch; an instance-level ``forward``, as benchmarks install, is still seen), and
        the all-decode case resolves its attention arguments once per step."""
        layers = list(self.model.layers._modules.values())
        h = h.contiguous()
        eps = self.config.rms_norm_eps
        step = _decode_step_args(meta, cache, h)
        if step is not None:
            plan = self._decode_plan(ops, h)
            if plan is not None:  # the same ops in one C++ call (bit-identical to the loop below)
                return plan.run(h, self.rope, positions, cache.data, *step)
        x = ops.rms_norm(h, layers[0]._modules["input_layernorm"].weight, eps)
        final = self.model._modules["norm"]
        for i, layer in enumerate(layers):
            mods = layer._modules
            a, mlp = mods["self_attn"], mods["mlp"]
            am, mm = a._modules, mlp._modules
            qkv_proj = am.get("qkv_proj")
            if qkv_proj is not None:
                qkv = qkv_proj.forward(x).contiguous()
            else:
                qkv = torch.cat((am["q_proj"].forward(x), am["k_proj"].forward(x), am["v_proj"].forward(x)), dim=-1)
            if step is not None:
                o = ops.decode_step_attention(qkv, self.rope, positions, cache.data, a.layer_idx, step[0], step[1],
                                              step[2], step[3], a.num_heads, a.num_kv_heads, a.window or 0, a.scale)
            else:
                o = fused_attention(ops, qkv, a.num_heads, a.num_kv_heads, self.rope, positions, meta, cache,
                                    a.layer_idx, a.window, a.scale)
            x = ops.add_rms_norm_(h, am["o_proj"].forward(o), mods["post_attention_layernorm"].weight, eps)
            gate_up = mm.get("gate_up_proj")
            if gate_up is not None:
                act = ops.silu_mul(gate_up.forward(x))
            else:
                act = ops.silu_mul2(mm["gate_proj"].forward(x), mm["up_proj"].forward(x))
            nxt = layers[i + 1]._modules["input_layernorm"] if i + 1 < len(layers) else final
            x = ops.add_rms_norm_(h, mm["down_proj"].forward(act), nxt.weight, eps)
        return x

    def _decode_plan(self, ops, h: torch.Tensor):
        """The fused ops' DecodePlan (csrc/fused_ops.cpp: the layer loop of ``_forward_fused`` in
        one call) when every linear is on a kernel (GGUF block weights, int8, int4) and this batch
        is in the kernels' row range; else None. Built once and kept while the linears' cached kernel
        arguments and the norm weights stay the same objects, checked per step: any attribute
        set on a quantized linear (a buffer, ``use_kernel``, an instance-level ``forward`` as
        benchmarks install) drops its cached arguments (_QuantLinear.__setattr__), so the plan is
        rebuilt, or declined. Sliding windows and head counts are read at build time."""
        if fused.plan_disabled():
            return None
        got = self.__dict__.get("_plan")
        if got is not None:
            plan, mods, kargs, norms, limit = got
            if all(m._kargs is a for m, a in zip(mods, kargs)) and all(n.weight is w for n, w in norms):
                return plan if h.shape[0] <= limit else None
        self.__dict__["_plan"] = None
        layers = list(self.model.layers._modules.values())
        bf16 = h.dtype == torch.bfloat16
        mods, specs, norms = [], [], []

        def lin(m):
            fmt = getattr(m, "fmt", None)
            if fmt not in ("gguf", "int8", "int4") or m._ops is None or "forward" in m.__dict__:
                raise LookupError
            mods.append(m)
            return fmt, m.in_features, m._cached_args()

        try:
            for layer in layers:
                a, mlp = layer._modules["self_attn"], layer._modules["mlp"]
                am, mm = a._modules, mlp._modules
                qkv = [am["qkv_proj"]] if "qkv_proj" in am else [am["q_proj"], am["k_proj"], am["v_proj"]]
                gu = [mm["gate_up_proj"]] if "gate_up_proj" in mm else [mm["gate_proj"], mm["up_proj"]]
                ln1, ln2 = layer._modules["input_layernorm"], layer._modules["post_attention_layernorm"]
                norms += [(ln1, ln1.weight), (ln2, ln2.weight)]
                specs.append(([lin(m) for m in qkv], lin(am["o_proj"]), [lin(m) for m in gu], lin(mm["down_proj"]),
                              ln1.weight, ln2.weight, a.layer_idx, a.window or 0, a.scale))
        except LookupError:
            return None
        final = self.model._modules["norm"]
        norms.append((final, final.weight))
        a0 = layers[0]._modules["self_attn"]
        plan = ops.DecodePlan(specs, final.weight, self.config.rms_norm_eps, a0.num_heads, a0.num_kv_heads,
                              a0.head_dim)
        limit = min(m.max_kernel_rows_bf16 if bf16 else m.max_kernel_rows for m in mods)
        self.__dict__["_plan"] = (plan, mods, [m._kargs for m in mods], norms, limit)
        return plan if h.shape[0] <= limit else None

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[M, D] → [M, V] fp32 logits, only for the rows that need them."""
        return self.lm_head(hidden).float()

    # -- weights --------------------------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], *, dtype: torch.dtype,
                     device: torch.device | str,
                     on_linear: Callable[[str, nn.Linear], None] | None = None) -> int:
        """Assign checkpoint tensors to the (meta-device) parameters by name.

        Tensors already in ``dtype`` on ``device`` are used as they are (mmap-backed safetensors
        stay file-backed: no second copy). ``on_linear(name, module)`` runs as soon as a linear's
        weight and bias are both in place and may return a replacement module (e.g. a quantized
        linear), so peak memory holds at most one
        dense linear beyond the quantized model."""
        params = dict(self.named_parameters(remove_duplicate=False))
        expected = set(params)
        if self.config.tie_word_embeddings:
            expected.discard("lm_head.weight")
        seen: set[str] = set()
        in_place = 0
        modules = dict(self.named_modules())
        for name, tensor in weights:
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue  # tied: the head is the embedding (HF ignores a stored copy)
            if name not in params:
                if name.endswith("rotary_emb.inv_freq"):
                    continue  # non-persistent buffer saved by some old exporters
                raise ModelLoadError(f"unexpected tensor {name!r} in checkpoint (not a Qwen2 parameter)")
            if name in seen:
                raise ModelLoadError(f"tensor {name!r} appears twice in the checkpoint")
            p = params[name]
            if tuple(tensor.shape) != tuple(p.shape):
                raise ModelLoadError(f"tensor {name!r} has shape {tuple(tensor.shape)}, "
                                     f"config implies {tuple(p.shape)}")
            mod_name, leaf = name.rsplit(".", 1)
            mod = modules[mod_name]
            seen.add(name)
            if not isinstance(tensor, torch.Tensor):
                # a packed weight (GGUF blocks at their own precision): an embedding is replaced
                # now; a linear keeps it until its bias is in, then on_linear builds the module
                if isinstance(mod, nn.Embedding):
                    self._swap(mod_name, tensor.embedding(dtype), modules)
                else:
                    mod.packed_weight = tensor
                    del mod._parameters[leaf]
                    if on_linear is None:
                        raise ModelLoadError(f"{name}: a packed weight needs an on_linear to build its module")
                    if all(f"{mod_name}.{n}" in seen for n, q in mod.named_parameters(recurse=False) if q is not None):
                        self._swap(mod_name, on_linear(mod_name, mod), modules)
                continue
            value = tensor.to(device=device, dtype=dtype)
            if value is tensor:
                in_place += tensor.numel() * tensor.element_size()
            mod._parameters[leaf] = nn.Parameter(value, requires_grad=False)
            if on_linear is not None and isinstance(mod, nn.Linear):
                if all(f"{mod_name}.{n}" in seen for n, q in mod.named_parameters(recurse=False) if q is not None):
                    self._swap(mod_name, on_linear(mod_name, mod), modules)
        missing = sorted(expected - seen)
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise ModelLoadError(f"checkpoint is missing tensor(s): {', '.join(missing[:5])}{more}")
        if self.config.tie_word_embeddings:
            emb = self.model.embed_tokens
            if not isinstance(emb, nn.Embedding):  # packed table: the head shares its buffers
                self._swap("lm_head", emb.block_weight.linear(None), modules)
            else:
                self.lm_head.weight = emb.weight
                if on_linear is not None:
                    self._swap("lm_head", on_linear("lm_head", self.lm_head), modules)
        return in_place

    def fuse_qkv(self) -> None:
        """Fuse every layer's q/k/v projections (dense or quantized) into one, and gate with up."""
        for layer in self.model.layers:
            layer.self_attn.fuse_qkv(concat_linears)
            layer.mlp.fuse_gate_up(concat_linears)

    def _swap(self, name: str, new: nn.Module | None, modules: dict[str, nn.Module]) -> None:
        """Put ``new`` (e.g. a quantized linear) where module ``name`` was."""
        if new is None:
            return
        parent_name, _, leaf = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else self, leaf, new)
        modules[name] = new


def _decode_step_args(meta: AttentionMetadata, cache, h: torch.Tensor):
    """(slot_mapping, slots, slot_start, lens) when this step is decodes only, in one group, over
    a cache the fused ops read in place (fp32 / bf16 / fp16): one fused attention call per layer."""
    groups = meta.decode_groups
    if meta.prefills or len(groups) != 1 or groups[0].end - groups[0].start != h.shape[0] or not fused_cache(cache):
        return None
    slots, start = decode_slot_args(groups[0].slots)
    return meta.slot_mapping, slots, start, groups[0].lens


def concat_linears(mods: list[nn.Module]) -> nn.Module:
    """Stack linears with the same input along the output dimension (y = cat of their outputs).
    Quantized linears provide their own ``concat``; rows are independent in every format."""
    if hasattr(type(mods[0]), "concat"):
        return type(mods[0]).concat(mods)
    w = torch.cat([m.weight for m in mods])
    biases = [m.bias if m.bias is not None else torch.zeros(m.out_features, dtype=w.dtype, device=w.device)
              for m in mods]
    with torch.device("meta"):
        fused = nn.Linear(w.shape[1], w.shape[0], bias=any(m.bias is not None for m in mods))
    fused.weight = nn.Parameter(w, requires_grad=False)
    if fused.bias is not None:
        fused.bias = nn.Parameter(torch.cat(biases), requires_grad=False)
    return fused
