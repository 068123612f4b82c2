"""LLMEngine: add_request / abort_request / step over the scheduler, runner and output processor.

``step()`` = schedule → run the model → update sequences (tokens, token-level stops) → text and
stop strings → RequestOutputs for every request that changed. Single-threaded; AsyncLLM drives it
from a background thread.

Failures stay with the requests they belong to: an exception inside the model step fails the
requests scheduled in that step (their blocks are freed; their outputs carry ``error``), one in a
request's own post-processing (detokenization, stop strings) fails that request alone, and the
engine carries on. ``consecutive_step_failures`` counts model steps that failed in a row, so the
owner can tell a bad request from a broken device."""
from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field

import torch

from ..config import EngineConfig
from ..errors import ContextLengthError
from ..loader import LoadedModel, load
from ..outputs import CompletionOutput, OutputKind, RequestMetrics, RequestOutput
from ..sampling_params import SamplingParams
from .block_manager import BlockManager
from .memory import plan_kv_pool
from .model_runner import ModelRunner
from .output_processor import OutputProcessor
from .sampler import Sampler
from .scheduler import Scheduler
from .sequence import Sequence
from .spec_decode import make_spec_decoder
from .structured import GrammarCompiler

log = logging.getLogger("qwenrun")


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    metrics: RequestMetrics
    aborted: bool = False
    prompt_logprobs: list | None = field(default=None)
    output_kind: OutputKind = OutputKind.CUMULATIVE
    # delta outputs: how much of each sample (by index) has been handed out already
    sent_tokens: list[int] = field(default_factory=list)
    sent_text: list[int] = field(default_factory=list)
    sent_finish: list[bool] = field(default_factory=list)
    sent_prompt_logprobs: bool = False

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)


class LLMEngine:
    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None, progress: bool = True) -> None:
        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        from ..quant import quantizer_for  # local: quant pulls optional kernels

        self.loaded = loaded or load(config, progress=progress, on_linear=quantizer_for(config))
        lm = self.loaded
        self.model_config = lm.config
        self.tokenizer = lm.tokenizer
        self.generation_defaults = lm.generation_defaults
        self.plan = plan_kv_pool(config, lm)
        self.max_model_len = self.plan.max_model_len
        self.cache = self.plan.allocate()
        self.block_manager = BlockManager(self.plan.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs,
                                   max(config.max_num_batched_tokens, 1))
        valid_vocab = len(self.tokenizer) if self.tokenizer is not None else None
        self.runner = ModelRunner(lm.model, self.cache, Sampler(lm.config.vocab_size, valid_vocab), lm.device,
                                  decode_gather_tokens=self.plan.decode_gather_tokens)
        self.output_processor = OutputProcessor(self.tokenizer)
        self.requests: dict[str, Request] = {}
        self._rng = random.Random(config.seed)
        self._eos = frozenset(lm.generation_defaults.eos_token_id or lm.config.eos_token_id)
        self.structured = GrammarCompiler(self.tokenizer, lm.config.vocab_size, self._eos)
        self.stats = {"prompt_tokens": 0, "generation_tokens": 0, "finished": 0, "failed": 0}
        self.consecutive_step_failures = 0
        self.spec = make_spec_decoder(config.speculative_config, self)  # None: no speculation
        if self.spec is not None:
            self.scheduler.on_finish = self.spec.release

    # -- requests -----------------------------------------------------------------------------
    def encode_prompt(self, prompt: str | None, prompt_token_ids: list[int] | None) -> list[int]:
        if prompt_token_ids is None:
            if not isinstance(prompt, str):
                raise ValueError("a prompt must be a string or a list of token ids")
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass prompt_token_ids")
            prompt_token_ids = self.tokenizer.encode(prompt)
        if not isinstance(prompt_token_ids, (list, tuple)) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in prompt_token_ids):
            raise ValueError("prompt_token_ids must be a list of integers")
        if not prompt_token_ids:
            raise ValueError("the prompt is empty: give at least one token")
        vocab = self.model_config.vocab_size
        bad = [t for t in prompt_token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})")
        return list(prompt_token_ids)

    def check_fits(self, num_prompt: int, max_tokens: int | None) -> None:
        limit = self.max_model_len
        if num_prompt >= limit:
            raise ContextLengthError(f"the prompt has {num_prompt} tokens but the context is {limit} tokens "
                                     f"(at least one must be left to generate)")
        if max_tokens is not None and num_prompt + max_tokens > limit:
            raise ContextLengthError(f"the prompt ({num_prompt} tokens) plus max_tokens ({max_tokens}) is "
                                     f"{num_prompt + max_tokens}, more than the context of {limit} tokens")

    def add_request(self, request_id: str, prompt: str | None = None, params: SamplingParams | None = None,
                    prompt_token_ids: list[int] | None = None, arrival_time: float | None = None,
                    output_kind: OutputKind = OutputKind.CUMULATIVE) -> Request:
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        params = (params or SamplingParams()).resolve(self.generation_defaults)
        if params.stop_strings and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this model has none")
        vocab = self.model_config.vocab_size
        for name, ids in (("logit_bias", list(params.logit_bias or ())), ("stop_token_ids", params.stop_token_ids or ())):
            bad = [t for t in ids if t >= vocab]
            if bad:
                raise ValueError(f"{name}: token id {bad[0]} is outside the vocabulary [0, {vocab})")
        ids = self.encode_prompt(prompt, prompt_token_ids)
        self.check_fits(len(ids), params.max_tokens)
        so = params.structured_outputs
        if so is not None:
            self.structured.compile(so)  # ValueError naming the problem; cached after the first time
        base_seed = params.seed if params.seed is not None else self._rng.getrandbits(62)
        seqs = []
        for i in range(params.n):
            seq = Sequence(request_id, i, ids, params, self._eos, self.max_model_len)
            # Distinct but reproducible streams for the n samples of one seeded request.
            seq.seed = (base_seed + i * 0x9E3779B97F4A7C15) % (1 << 63)
            if so is not None:
                seq.grammar = self.structured.new_state(so)
            if i and self.config.enable_prefix_caching:
                # Share the prompt's KV blocks through the prefix cache (and its prompt logprobs,
                # which only the first sample computes: once per request, not once per sample).
                seq.wait_for = seqs[0]
            seqs.append(seq)
        for seq in seqs:
            self.scheduler.add(seq)
        req = Request(request_id, prompt, ids, params, seqs,
                      RequestMetrics(arrival_time=arrival_time or time.time()), output_kind=output_kind,
                      sent_tokens=[0] * params.n, sent_text=[0] * params.n, sent_finish=[False] * params.n)
        self.requests[request_id] = req
        self.stats["prompt_tokens"] += len(ids)
        return req

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free every block it holds; safe to call at any moment."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        req.aborted = True
        for seq in req.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq, "abort")
        return self._output(req)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # -- the step ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        t_step = time.perf_counter()  # the proposer's time counts in the step's cost
        if self.spec is not None:
            try:
                self.spec.propose(self.scheduler.running, self.max_model_len)
            except Exception:  # noqa: BLE001 - a proposer failure costs speed, never a request
                log.exception("speculative proposal failed; decoding this step without it")
                for seq in self.scheduler.running:
                    seq.spec_token_ids = []
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return []
        now = time.time()
        for s in sched.scheduled:
            req = self.requests.get(s.seq.request_id)
            if req is not None and req.metrics.first_scheduled_time is None:
                req.metrics.first_scheduled_time = now
        try:
            sampled = self.runner.execute(sched)
        except Exception as e:  # noqa: BLE001 - fail this step's requests, keep the engine
            self.consecutive_step_failures += 1
            rids = list(dict.fromkeys(s.seq.request_id for s in sched.scheduled))
            log.exception("the model step failed; failing the %d request(s) in it", len(rids))
            return [o for rid in rids if (o := self.fail_request(rid, f"the model step failed: {e!r}")) is not None]
        self.consecutive_step_failures = 0
        got = self.scheduler.update(sched, sampled)
        if self.spec is not None:
            self.spec.step_time(sched, time.perf_counter() - t_step)
            for s in sched.scheduled:
                if s.num_spec and s.seq.seq_id in sampled:
                    self.spec.observe(s.seq, s.num_spec, len(sampled[s.seq.seq_id]) - 1)
        changed: dict[str, Request] = {}
        failed: dict[str, str] = {}
        now = time.time()
        for seq, added in got:
            req = self.requests.get(seq.request_id)
            if req is None or req.request_id in failed:
                continue
            self.stats["generation_tokens"] += len(added)
            if seq.grammar is not None and seq.grammar.error is not None:
                failed[req.request_id] = f"structured output failed: {seq.grammar.error}"
                continue
            try:
                stop = self._process_text(seq, added)
                if stop is not None:
                    self.scheduler.finish(seq, "stop", stop)
                elif seq.is_finished:
                    self.output_processor.process(seq, [])  # flush held bytes
            except Exception as e:  # noqa: BLE001 - this request's text failed: fail it alone
                log.exception("post-processing request %s failed", req.request_id)
                failed[req.request_id] = f"post-processing failed: {e!r}"
                continue
            m = req.metrics
            m.first_token_time = m.first_token_time or now
            m.last_token_time = now
            changed[req.request_id] = req
        outputs = []
        for rid, why in failed.items():
            changed.pop(rid, None)
            if (o := self.fail_request(rid, why)) is not None:
                outputs.append(o)
        for req in changed.values():
            if req.finished:
                req.metrics.finished_time = now
                self.requests.pop(req.request_id, None)
                self.stats["finished"] += 1
            try:
                out = self._output(req)
            except Exception as e:  # noqa: BLE001
                log.exception("building the output of request %s failed", req.request_id)
                out = self.fail_request(req.request_id, f"building its output failed: {e!r}", req)
            if out is not None:
                outputs.append(out)
        return outputs

    def _process_text(self, seq: Sequence, added: list[int]) -> str | None:
        """Detokenize the step's tokens one at a time, checking stop strings after each: a stop
        string inside an accepted speculative run ends the sequence at that token, as plain
        decoding would have, and the tokens after it are taken back."""
        if len(added) == 1:  # plain decoding: one token, flushed if the sequence has finished
            return self.output_processor.process(seq, added)
        for j, tok in enumerate(added):
            last = j == len(added) - 1
            stop = self.output_processor.process(seq, [tok], final=last and seq.is_finished)
            if stop is not None:
                if not last:
                    n = len(added) - 1 - j
                    seq.drop_last_tokens(n)
                    self.stats["generation_tokens"] -= n
                    if seq.is_finished:  # a token-level stop after the stop string: the string came first
                        seq.finish_reason, seq.stop_reason = "stop", stop
                return stop
        return None

    def fail_request(self, request_id: str, message: str, req: Request | None = None) -> RequestOutput | None:
        """End a request with an error (its blocks freed); its last output carries ``error``."""
        req = self.requests.pop(request_id, None) or req
        if req is None:
            return None
        req.aborted = True
        for seq in req.seqs:
            self.scheduler.finish(seq, "error")
        self.stats["failed"] += 1
        return RequestOutput(request_id=req.request_id, prompt=req.prompt, prompt_token_ids=req.prompt_token_ids,
                             outputs=[CompletionOutput(index=s.index, text="", token_ids=[], finish_reason="error")
                                      for s in req.seqs],
                             finished=True, metrics=req.metrics, error=message)

    def _output(self, req: Request) -> RequestOutput | None:
        """The request's output in its kind: everything so far (cumulative), what is new since
        the last one (delta: slices only, never a copy of the history), or nothing until the end
        (final)."""
        kind = req.output_kind
        done = req.finished or req.aborted
        if kind is OutputKind.FINAL and not done:
            return None
        delta = kind is OutputKind.DELTA
        want_lp = req.params.logprobs is not None
        comps = []
        for seq in req.seqs:
            i = seq.index
            text_end = self.output_processor.visible_len(seq)
            t0 = req.sent_tokens[i] if delta else 0
            x0 = req.sent_text[i] if delta else 0
            n_out = seq.num_tokens - seq.prompt_len
            fin = seq.finish_reason if seq.is_finished else None
            if delta:
                if t0 == n_out and x0 == text_end and (fin is None or req.sent_finish[i]):
                    continue  # nothing new for this sample
                req.sent_tokens[i], req.sent_text[i], req.sent_finish[i] = n_out, text_end, fin is not None
            comps.append(CompletionOutput(
                index=i,
                text=self.output_processor.text_slice(seq, x0, text_end),
                token_ids=seq.token_ids[seq.prompt_len + t0:],
                cumulative_logprob=seq.cumulative_logprob if want_lp else None,
                logprobs=seq.logprobs[t0:] if want_lp else None,
                finish_reason=fin,
                stop_reason=seq.stop_reason,
            ))
        first = req.seqs[0]
        req.metrics.num_cached_tokens = first.num_cached_tokens
        plp = None
        if req.params.prompt_logprobs is not None and not (delta and req.sent_prompt_logprobs):
            plp = first.prompt_logprobs if delta else list(first.prompt_logprobs)
            req.sent_prompt_logprobs = True
        return RequestOutput(
            request_id=req.request_id, prompt=req.prompt, prompt_token_ids=req.prompt_token_ids,
            outputs=comps, finished=done, prompt_logprobs=plp,
            metrics=req.metrics, num_cached_tokens=first.num_cached_tokens)

    # -- introspection (metrics) -----------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def kv_usage(self) -> float:
        return self.block_manager.usage
