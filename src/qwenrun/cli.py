"""``qwenrun`` command line: serve, chat, generate, bench, pull.

Every engine flag can also be set through the environment as QWENRUN_<FLAG> (e.g.
QWENRUN_MAX_MODEL_LEN=8192). User mistakes print one line on stderr and exit 2, never a
traceback."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from .settings import DEFAULT_MODEL


def _env(name: str, default: Any = None) -> Any:
    return os.environ.get("QWENRUN_" + name.upper().replace("-", "_"), default)


def _opt_int(v: str | None) -> int | None:
    return None if v in (None, "", "none", "None") else int(v)


def _opt_float(v: str | None) -> float | None:
    return None if v in (None, "", "none", "None") else float(v)


def add_engine_args(p: argparse.ArgumentParser, model_optional: bool = True) -> None:
    if model_optional:
        p.add_argument("model", nargs="?", default=_env("model", DEFAULT_MODEL),
                       help=f"hub id, local directory, .gguf file or 'demo' (default {DEFAULT_MODEL})")
    else:
        p.add_argument("model", help="hub id, local directory, .gguf file or 'demo'")
    g = p.add_argument_group("engine")
    g.add_argument("--revision", default=_env("revision"), help="hub revision (or MODEL@REV)")
    g.add_argument("--dtype", default=_env("dtype", "auto"), choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--device", default=_env("device", "auto"), help="auto | cpu | cuda | cuda:N")
    g.add_argument("--quantization", "-q", default=_env("quantization", "auto"), choices=["auto", "none", "int8", "int4"],
                   help="weights: auto = a GGUF at its own block formats, other checkpoints dense (default); "
                        "none = dense; int8/int4 = qwenrun's formats (a GGUF is rounded a second time)")
    g.add_argument("--max-model-len", type=_opt_int, default=_opt_int(_env("max_model_len")),
                   help="context length (default: the model's)")
    g.add_argument("--kv-cache-dtype", default=_env("kv_cache_dtype", "auto"),
                   choices=["auto", "int8", "fp8", "bfloat16", "float16", "float32"],
                   help="auto = the model's dtype; int8 halves bf16 KV memory")
    g.add_argument("--kv-cache-memory", type=_opt_float, default=_opt_float(_env("kv_cache_memory")),
                   help="GiB for the KV pool (default: planned from free memory)")
    g.add_argument("--block-size", type=int, default=int(_env("block_size", 16)))
    g.add_argument("--max-num-seqs", type=int, default=int(_env("max_num_seqs", 64)))
    g.add_argument("--max-num-batched-tokens", type=int, default=int(_env("max_num_batched_tokens", 2048)))
    g.add_argument("--no-prefix-caching", action="store_true",
                   default=_env("no_prefix_caching", "0").lower() in ("1", "true", "yes"))
    g.add_argument("--seed", type=int, default=int(_env("seed", 0)))
    g.add_argument("--threads", type=_opt_int, default=_opt_int(_env("threads")), help="torch CPU threads")
    g.add_argument("--random-weights", action="store_true",
                   default=_env("random_weights", "0").lower() in ("1", "true", "yes"),
                   help="random weights at the model's shapes (speed and memory work)")
    g.add_argument("--speculative-config", default=_env("speculative_config"),
                   help='speculative decoding, as JSON: {"method": "ngram", "num_speculative_tokens": 4} or '
                        '{"method": "draft_model", "model": ..., "num_speculative_tokens": 4}')


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (unset values: the model's generation_config)")
    g.add_argument("--max-tokens", type=int, default=None)
    g.add_argument("--temperature", type=float, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=None)
    g.add_argument("--sampling-seed", type=int, default=None, help="seed of the request's sampler")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-turn tokens")


# -- subcommands ---------------------------------------------------------------------------------
def cmd_generate(args: argparse.Namespace) -> int:
    from .config import EngineConfig
    from .llm import load_llm
    from .settings import sampling_from_args

    params = sampling_from_args(args)  # validate before spending time on loading
    llm = load_llm(EngineConfig.from_args(args))
    prompt = args.prompt
    if args.chat:
        prompt = llm.apply_chat_template([{"role": "user", "content": prompt}])
    shown = 0
    out = None
    for out in llm.stream(prompt, params):
        text = out.outputs[0].text
        sys.stdout.write(text[shown:])
        sys.stdout.flush()
        shown = len(text)
    sys.stdout.write("\n")
    if out is not None and args.verbose:
        o = out.outputs[0]
        print(f"[{len(o.token_ids)} tokens, finish_reason={o.finish_reason}]", file=sys.stderr)
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    from .loader import resolve

    src = resolve(args.model, args.revision, progress=True)
    print(src.path)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from .chat_repl import run_repl
    from .settings import ChatConfig

    return run_repl(ChatConfig.from_args(args))


def cmd_serve(args: argparse.Namespace) -> int:
    from .settings import ServerConfig

    cfg = ServerConfig.from_args(args)
    if cfg.ray.replicas > 1 or cfg.ray.address is not None:
        try:
            from .server.ray_serve import serve_ray_main  # imports ray: only for --replicas > 1 / --ray-address
        except ImportError as e:
            raise ValueError(f"--replicas/--ray-address need Ray Serve: pip install 'qwenrun[ray]' ({e})") from None

        return serve_ray_main(cfg)
    from .server.app import serve_main

    return serve_main(cfg)


def cmd_bench(args: argparse.Namespace) -> int:
    if args.bench_kind == "serve":
        from .server.bench import bench_serve_main
        from .settings import ServeBenchConfig

        return bench_serve_main(ServeBenchConfig.from_args(args))
    from .bench import bench_main
    from .settings import BenchConfig

    return bench_main(BenchConfig.from_args(args))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qwenrun", description="Run Qwen1.5/Qwen2-architecture models fast.")
    p.add_argument("--log-level", default=_env("log_level", "WARNING"))
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="complete one prompt, streaming to stdout")
    add_engine_args(g)
    add_sampling_args(g)
    g.add_argument("--prompt", "-p", required=True)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    g.add_argument("--verbose", "-v", action="store_true")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="multi-turn chat REPL (local model, or --url of a server)")
    add_engine_args(c)
    add_sampling_args(c)
    c.add_argument("--url", default=_env("url"), help="chat with a running qwenrun/OpenAI server instead")
    c.add_argument("--api-key", default=_env("api_key", os.environ.get("OPENAI_API_KEY")))
    c.add_argument("--system", default=None, help="system prompt (default: the template's)")
    c.set_defaults(func=cmd_chat)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    add_engine_args(s)
    s.add_argument("--host", default=_env("host", "127.0.0.1"))
    s.add_argument("--port", type=int, default=int(_env("port", 8000)))
    s.add_argument("--api-key", default=_env("api_key"))
    s.add_argument("--served-model-name", default=_env("served_model_name"))
    s.add_argument("--max-waiting", type=int, default=int(_env("max_waiting", 256)),
                   help="queued requests beyond which new ones get 503")
    s.add_argument("--max-body-bytes", type=int, default=int(_env("max_body_bytes", 8 << 20)))
    s.add_argument("--shutdown-grace", type=float, default=float(_env("shutdown_grace", 10)),
                   help="seconds in-flight requests may finish after SIGTERM")
    s.add_argument("--chat-template", default=_env("chat_template"), metavar="FILE",
                   help="a Jinja chat template to use instead of the model's own (as vLLM's flag)")
    s.add_argument("--no-web-ui", action="store_true",
                   default=_env("no_web_ui", "0").lower() in ("1", "true", "yes"), help="do not serve the chat page at /")
    r = s.add_argument_group("many replicas (Ray Serve; pip install 'qwenrun[ray]')")
    r.add_argument("--replicas", type=int, default=int(_env("replicas", 1)),
                   help="engine replicas behind this one endpoint, each with its own KV cache (1: no Ray)")
    r.add_argument("--ray-address", default=_env("ray_address"),
                   help="join this Ray cluster (auto, host:6379, ray://host:10001); default: start a local one "
                        "(`local` starts one even for --replicas 1)")
    r.add_argument("--replica-cpus", type=_opt_float, default=_opt_float(_env("replica_cpus")),
                   help="CPUs Ray reserves per replica (fractions allowed; default: --threads, or 1)")
    r.add_argument("--replica-gpus", type=float, default=float(_env("replica_gpus", 0)),
                   help="GPUs per replica (1: one GPU each; 0: CPU)")
    lim = s.add_argument_group("cost caps per request (each answered with a 400 naming the flag)")
    lim.add_argument("--max-n", type=int, default=int(_env("max_n", 128)), help="samples per request")
    lim.add_argument("--max-logit-bias", type=int, default=int(_env("max_logit_bias", 300)),
                     help="logit_bias entries (OpenAI's limit: 300)")
    lim.add_argument("--max-stop", type=int, default=int(_env("max_stop", 32)), help="stop strings per request")
    lim.add_argument("--max-stop-length", type=int, default=int(_env("max_stop_length", 1024)),
                     help="characters per stop string")
    lim.add_argument("--max-logprobs", type=int, default=int(_env("max_logprobs", 20)),
                     help="top logprobs per token (at most 20)")
    lim.add_argument("--max-echo-logprob-tokens", type=int, default=int(_env("max_echo_logprob_tokens", 32768)),
                     help="n x prompt tokens of an echo + logprobs completion")
    s.set_defaults(func=cmd_serve)

    b = sub.add_parser("bench", help="benchmarks: latency | throughput | serve")
    bsub = b.add_subparsers(dest="bench_kind", required=True)
    for kind in ("latency", "throughput"):
        bk = bsub.add_parser(kind)
        add_engine_args(bk)
        bk.add_argument("--input-len", type=int, default=int(_env("bench_input_len", 512 if kind == "latency" else 128)))
        bk.add_argument("--output-len", type=int, default=int(_env("bench_output_len", 64)))
        bk.add_argument("--batch-sizes", default="1,4,16,64")
        bk.add_argument("--repeats", type=int, default=3)
        bk.add_argument("--warmup", type=int, default=1, help="untimed rounds before the timed ones")
        bk.set_defaults(func=cmd_bench)
    bs = bsub.add_parser("serve")
    bs.add_argument("--url", default="http://127.0.0.1:8000")
    bs.add_argument("--model", default=None)
    bs.add_argument("--api-key", default=_env("api_key"))
    bs.add_argument("--concurrency", default="1,4,16")
    bs.add_argument("--num-requests", type=int, default=None)
    bs.add_argument("--input-len", type=int, default=128)
    bs.add_argument("--output-len", type=int, default=64)
    bs.add_argument("--label", default="qwenrun")
    bs.set_defaults(func=cmd_bench)

    pl = sub.add_parser("pull", help="download a model into the HF cache, with progress")
    pl.add_argument("model")
    pl.add_argument("--revision", default=None)
    pl.set_defaults(func=cmd_pull)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.WARNING),
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, OSError) as e:  # user mistakes: one line, no traceback
        if args.log_level.upper() == "DEBUG":
            raise
        print(f"qwenrun: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
