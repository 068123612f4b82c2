"""Cost caps on one request: what a single client may ask the engine to do, each a server flag.

Every cap is checked before the request reaches the engine and answered with a 400 that names the
field, the limit and the flag that raises it. Defaults follow OpenAI where it has a limit
(logit_bias 300 entries, top_logprobs 20) and vLLM's habits elsewhere; the stop-string caps bound
the per-token matching work and the streamed text held back while a stop string may be starting."""
from __future__ import annotations

from dataclasses import dataclass

from ..sampling_params import MAX_LOGPROBS
from .protocol import APIError


@dataclass(frozen=True)
class RequestLimits:
    max_n: int = 128  # samples per request (--max-n)
    max_logit_bias: int = 300  # logit_bias entries (--max-logit-bias), OpenAI's limit
    max_stop: int = 32  # stop strings per request (--max-stop)
    max_stop_length: int = 1024  # characters per stop string (--max-stop-length)
    max_logprobs: int = MAX_LOGPROBS  # top_logprobs / logprobs (--max-logprobs), at most 20
    # echo + logprobs returns every prompt token's logprobs in every one of the n choices:
    # n x prompt tokens (summed over a batch of prompts) is bounded (--max-echo-logprob-tokens).
    max_echo_logprob_tokens: int = 32768

    def __post_init__(self) -> None:
        for name in ("max_n", "max_logit_bias", "max_stop", "max_stop_length", "max_echo_logprob_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if not 0 <= self.max_logprobs <= MAX_LOGPROBS:
            raise ValueError(f"--max-logprobs must be in [0, {MAX_LOGPROBS}]")

    def check(self, *, n: int, logit_bias: dict | None, stop: str | list[str] | None, logprobs: int | None,
              logprobs_param: str = "logprobs") -> None:
        """Raise a 400 for the first cap the request exceeds."""
        if isinstance(n, int) and n > self.max_n:
            raise _over("n", f"n is {n}; this server allows at most {self.max_n} samples per request", "--max-n")
        if logit_bias and len(logit_bias) > self.max_logit_bias:
            raise _over("logit_bias", f"logit_bias has {len(logit_bias)} entries; at most {self.max_logit_bias} "
                                      "are allowed", "--max-logit-bias")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > self.max_stop:
            raise _over("stop", f"{len(stops)} stop strings were given; at most {self.max_stop} are allowed",
                        "--max-stop")
        long = [s for s in stops if isinstance(s, str) and len(s) > self.max_stop_length]
        if long:
            raise _over("stop", f"a stop string has {len(long[0])} characters; at most {self.max_stop_length} "
                                "are allowed", "--max-stop-length")
        if logprobs is not None and isinstance(logprobs, int) and logprobs > self.max_logprobs:
            raise _over(logprobs_param, f"{logprobs_param} is {logprobs}; at most {self.max_logprobs} logprobs "
                                        "per token are allowed", "--max-logprobs")

    def check_echo_logprobs(self, n: int, prompt_tokens: int) -> None:
        cost = n * prompt_tokens
        if cost > self.max_echo_logprob_tokens:
            raise _over("logprobs", f"echo with logprobs returns n x prompt tokens = {n} x {prompt_tokens} = {cost} "
                                    f"token logprobs; at most {self.max_echo_logprob_tokens} are allowed",
                        "--max-echo-logprob-tokens")


def _over(param: str, message: str, flag: str) -> APIError:
    return APIError(400, f"{message} (the server's {flag})", param=param, code="limit_exceeded")
