"""The draft-model proposer: a smaller checkpoint of the same tokenizer proposes k tokens greedily.

The draft keeps its own KV pool and block manager (no prefix cache) and one *shadow* sequence per
target sequence: the target's tokens plus the draft's own last proposals. Before each target step
the shadow is synced to the target's tokens (the draft KV of rejected proposals is rolled back with
``BlockManager.truncate``), catches up on the tokens it has not computed (the prompt at first, then
the accepted run and the bonus token), and proposes k tokens in k batched draft forwards, each one
the draft's argmax (a deterministic proposal: verification in spec_decode.py keeps the target's
distribution exactly). Everything runs through the same ModelRunner as the target."""
from __future__ import annotations

import logging

from ..config import EngineConfig
from ..loader import PRESETS, load
from ..sampling_params import SamplingParams
from .block_manager import BlockManager
from .kv_cache import bytes_per_token, kv_storage_dtype
from .memory import GiB, plan_kv_pool
from .model_runner import ModelRunner
from .sampler import Sampler
from .scheduler import ScheduledSeq, SchedulerOutput
from .sequence import Sequence
from .spec_config import SpeculativeConfig

log = logging.getLogger("qwenrun")


class DraftModelProposer:
    def __init__(self, cfg: SpeculativeConfig, engine) -> None:
        from ..quant import quantizer_for

        tcfg: EngineConfig = engine.config
        self.target_vocab = engine.model_config.vocab_size
        dcfg = EngineConfig(model=cfg.model, dtype=cfg.dtype, device=tcfg.device, quantization=cfg.quantization,
                            block_size=tcfg.block_size, max_model_len=engine.max_model_len,
                            max_num_seqs=tcfg.max_num_seqs, max_num_batched_tokens=tcfg.max_num_batched_tokens,
                            enable_prefix_caching=False, num_threads=tcfg.num_threads,
                            random_weights=tcfg.random_weights and cfg.model in PRESETS)
        try:
            lm = load(dcfg, progress=False, on_linear=quantizer_for(dcfg))
        except (OSError, ValueError) as e:
            raise ValueError(f"speculative_config.model: cannot load the draft model {cfg.model!r}: {e}") from None
        ttok, dtok = engine.tokenizer, lm.tokenizer
        if ttok is not None and dtok is not None and len(ttok) != len(dtok):
            raise ValueError(f"speculative_config.model: the draft's tokenizer has {len(dtok)} tokens, the target's "
                             f"{len(ttok)}: a draft model must share the target's tokenizer")
        if ttok is not None and dtok is not None and ttok.encode("def f(x):\n    return x") != dtok.encode(
                "def f(x):\n    return x"):
            raise ValueError("speculative_config.model: the draft's tokenizer encodes text differently from the "
                             "target's: a draft model must share the target's tokenizer")
        # A pool holding as many tokens as the target's (the draft's tokens per byte are cheaper).
        kv_dtype = kv_storage_dtype(dcfg.kv_cache_dtype, lm.dtype, lm.device)
        m = lm.config
        per_tok = bytes_per_token(m.num_hidden_layers, m.num_key_value_heads, m.head_dim, kv_dtype)
        dcfg.kv_cache_memory = engine.plan.num_tokens * per_tok / GiB
        self.lm = lm
        self.plan = plan_kv_pool(dcfg, lm)
        self.bm = BlockManager(self.plan.num_blocks, dcfg.block_size, False)
        valid = len(ttok) if ttok is not None else None
        self.runner = ModelRunner(lm.model, self.plan.allocate(), Sampler(min(m.vocab_size, self.target_vocab), valid),
                                  lm.device, decode_gather_tokens=self.plan.decode_gather_tokens)
        self.params = SamplingParams(temperature=0, repetition_penalty=1.0, max_tokens=None)
        self.shadows: dict[int, tuple[Sequence, Sequence, int]] = {}  # seq_id -> (seq, shadow, synced length)
        log.info("draft model %s: %s", cfg.model, self.plan.report())

    def _sync(self, seq: Sequence) -> Sequence:
        entry = self.shadows.get(seq.seq_id)
        if entry is None:
            sh = Sequence(seq.request_id, 0, seq.token_ids, self.params)
            self.shadows[seq.seq_id] = (seq, sh, seq.num_tokens)
            return sh
        _, sh, synced = entry
        c = min(synced, seq.num_tokens)  # tokens up to here were the target's own: still equal
        limit = min(sh.num_tokens, seq.num_tokens)
        while c < limit and sh.token_ids[c] == seq.token_ids[c]:
            c += 1  # the accepted proposals
        sh.token_ids = list(seq.token_ids)
        sh.num_computed_tokens = min(sh.num_computed_tokens, c, seq.num_tokens - 1)
        self.bm.truncate(sh, sh.num_computed_tokens)
        self.shadows[seq.seq_id] = (seq, sh, seq.num_tokens)
        return sh

    def _drop(self, seq_id: int) -> None:
        _, sh, _ = self.shadows.pop(seq_id)
        self.bm.free_seq(sh)

    def propose(self, seqs: list[Sequence], ks: list[int]) -> list[list[int]]:
        for sid, (s, _, _) in list(self.shadows.items()):
            if s.is_finished:
                self._drop(sid)
        out: dict[int, list[int]] = {s.seq_id: [] for s in seqs}
        live: list[tuple[Sequence, Sequence, int]] = []
        for seq, k in zip(seqs, ks):
            sh = self._sync(seq)
            n = sh.num_tokens - sh.num_computed_tokens
            if not self.bm.can_allocate(sh, n + k):
                self._drop(seq.seq_id)  # the draft pool is full: this sequence decodes plainly
                continue
            live.append((seq, sh, k))
        step = 0
        while live:
            sched = SchedulerOutput()
            for _, sh, _ in live:
                n = sh.num_tokens - sh.num_computed_tokens
                self.bm.allocate(sh, n)
                sched.scheduled.append(ScheduledSeq(sh, sh.num_computed_tokens, n))
            sampled = self.runner.execute(sched)
            nxt = []
            for seq, sh, k in live:
                sh.num_computed_tokens = sh.num_tokens
                tok = sampled[sh.seq_id][0][0]
                if tok >= self.target_vocab:
                    continue  # outside the target's vocabulary: stop proposing here
                sh.token_ids.append(tok)
                out[seq.seq_id].append(tok)
                if step + 1 < k:
                    nxt.append((seq, sh, k))
            live = nxt
            step += 1
        return [out[s.seq_id] for s in seqs]

    def release(self, seq: Sequence) -> None:
        if seq.seq_id in self.shadows:
            self._drop(seq.seq_id)
